"""read -> render -> generate -> parse/validate -> write, with a manifest and exactly-once resume.

Records are taken in windows (input order) and streamed through the backend, which may work on several
windows at once (hf's fast path refills its slots from the next window) or on one at a time (the default);
rows are put back in input order and written `window` at a time, appended, flushed and fsynced. A killed
run leaves at most a half-written last line, dropped on resume; ids already written under the same
manifest are skipped, so every input id ends up in the output exactly once. An output in an object store,
which cannot append, gets the same guarantee from part objects and a commit (`store/parts.py`).

The package is split by job, each module importing only those before it here:
`options.py` (`RunOptions`: a run's settings, the only carrier of them), `chunks.py` and `merge.py` (--on-long
chunk's splitting and merging), `renderer.py` (records -> prompts and token ids, under the long-input policy),
`row_judge.py` (model output -> rows), `lanes.py` (`Lane`: one output's renderer, adapter and judge; several
lanes' requests through one backend stream, each put back in its input order), `sink.py` (the writer thread,
the progress bar, the reader thread), `summary.py` (what the run did), `interrupt.py` (Ctrl-C), `run.py` (one
output: manifest, run key, resume, its sink), `one_pass.py` (one read of the corpus fills one output or
several), `predictor.py` (records -> rows in one call, outside `extractor run`), `preflight.py` (checks on the
tokenizer alone, before the weights load), `claim.py` (a run's locks on its outputs) and `config.py`
(`RunConfig`: `extractor run`'s settings, built once from the command line and passed down).
"""
from extractor.pipeline.lanes import Lane
from extractor.pipeline.one_pass import OnePass
from extractor.pipeline.options import RunOptions
from extractor.pipeline.predictor import Predictor
from extractor.pipeline.renderer import Renderer
from extractor.pipeline.row_judge import RowJudge
from extractor.pipeline.run import MANIFEST_FORMAT, Run, output_for_adapter, output_store, run_key
from extractor.pipeline.sink import Progress, RowSink, prefetch
from extractor.pipeline.summary import Summary
from extractor.results.rows import RESERVED

__all__ = ["MANIFEST_FORMAT", "RESERVED", "Lane", "OnePass", "Predictor", "Progress", "Renderer", "RowJudge",
           "RowSink", "Run", "RunOptions", "Summary", "output_for_adapter", "output_store", "prefetch", "run_key"]
