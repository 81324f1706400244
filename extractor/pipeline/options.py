"""`RunOptions`: one run's settings, the only carrier of them below the command line. Everything that reads a
setting (the renderer, the judge, the run, the run key) reads it here; nothing takes one of them as an argument
of its own as well, so a setting cannot say one thing in one place and another elsewhere."""
from __future__ import annotations

from dataclasses import dataclass

from extractor.backends.base import GenParams
from extractor.pipeline.chunks import ChunkSettings
from extractor.store.locations import Location


@dataclass
class RunOptions:
    corpus: Location | None  # None: records handed in and rows handed back (`Predictor`), no corpus read
    out: Location | None  # None: likewise, no output written
    params: GenParams
    id_field: str = "id"
    text_field: str | None = None
    keep_fields: tuple = ()
    on_bad: str = "fail"
    rejects: Location | None = None
    resume: bool = False
    overwrite: bool = False
    on_long: str = "fail"
    chunking: ChunkSettings | None = None  # chunk size and overlap under on_long chunk (None: the task's)
    max_input_tokens: int | None = None  # None: the backend's limit for the adapter requested
    few_shot: int | None = None  # the first N of the task's few-shot examples (None: all)
    window: int = 256
    quiet: bool = False
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (k, n): only records whose index mod n is k
