"""read -> render -> generate -> parse/validate -> write, with a manifest and exactly-once resume.

Records are taken in windows (input order) and streamed through the backend, which may work on several
windows at once (hf's fast path refills its slots from the next window) or on one at a time (the default);
rows are put back in input order and written `window` at a time, appended, flushed and fsynced. A killed
run leaves at most a half-written last line, dropped on resume; ids already written under the same
manifest are skipped, so every input id ends up in the output exactly once. An output in an object store,
which cannot append, gets the same guarantee from part objects and a commit (`parts.py`).

The package is split by job: `predictor.py` (records -> rows), `lanes.py` (several predictors' requests,
one adapter each, through one backend stream, each put back in its input order), `run.py` (one output:
manifest, run key, resume, windows), `one_pass.py` (several outputs, one per adapter, filled by one read of
the corpus and one stream), `interrupt.py` (Ctrl-C), `summary.py` (what the run did), `sink.py` (the writer
thread, the progress bar, the reader thread) and `config.py` (`RunConfig`: `extractor run`'s settings, built
once from the command line and passed down).
"""
from extractor.pipeline.one_pass import OnePass
from extractor.pipeline.predictor import Predictor
from extractor.pipeline.run import MANIFEST_FORMAT, Run, RunOptions, output_for_adapter, output_store, run_key
from extractor.pipeline.sink import Progress, RowSink, prefetch
from extractor.pipeline.summary import Summary
from extractor.results.rows import RESERVED

__all__ = ["MANIFEST_FORMAT", "RESERVED", "OnePass", "Predictor", "Progress", "RowSink", "Run", "RunOptions", "Summary",
           "output_for_adapter", "output_store", "prefetch", "run_key"]
