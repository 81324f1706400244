"""`echo`: returns each record's gold output instantly (re-scoring, and measuring the CPU pipeline).

--model points at a gold file ({id, gold} lines) or a predictions file, whose `raw` text (and finish
reason) is returned verbatim, so a run re-parses another run's outputs. Unknown ids echo `{}`.
EXTRACTOR_ECHO_LATENCY_S (seconds per call, default 0) stands in for a model's time, so that work spreads over
several workers as it would with a real model (the Ray cluster tests).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from extractor import jsonutil
from extractor.backends.base import STOP, Backend, GenParams, Generation, Request
from extractor.errors import ModelError


class EchoBackend(Backend):
    name = "echo"
    supports_constrained = True  # its outputs are gold, which already match the schema
    mixes_adapters = True  # it ignores adapters (its outputs are gold): any mix in one stream
    model_source = "gold file"

    def __init__(self, model: str, **_):
        from extractor.store.writers import iter_rows
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"echo backend: --model must be a gold file, '{model}' is not a file")
        self.path = path
        self.texts: dict[str, tuple[str, str]] = {}
        for line, row in iter_rows(path):
            rid = str(row.get("id", line))
            if isinstance(row.get("raw"), str):
                self.texts[rid] = (row["raw"], row.get("finish_reason") or STOP)
            else:
                self.texts[rid] = (jsonutil.dumps(row.get("gold", row.get("prediction"))), STOP)

    def identity(self, adapter: str | None = None) -> dict:
        return {"backend": self.name, "gold": str(self.path.resolve()), "size": self.path.stat().st_size}

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        latency = float(os.environ.get("EXTRACTOR_ECHO_LATENCY_S", "0") or 0)
        if latency > 0:
            time.sleep(latency)
        out = []
        for r in requests:
            text, finish = self.texts.get(r.record_id, ("{}", STOP))
            out.append(Generation(text, len(r.prompt), len(text), finish))
        return out
