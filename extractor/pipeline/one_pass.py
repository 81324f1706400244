"""Several outputs of one corpus, one per adapter, filled by a single pass (`extractor run --adapter A
--adapter B` on a backend that mixes adapters in one stream): the corpus is read and each record rendered
and tokenized once, and every adapter's requests go through one backend stream, so the engine neither
switches between runs nor drains at the end of each. Each output is still a `Run` of its own (manifest and
run key, exactly-once --resume, rejects, summary, progress bar), with the rows a run of that adapter alone
writes, in the same order; one Ctrl-C stops them all."""
from __future__ import annotations

from contextlib import ExitStack

from extractor.store.corpus_path import count_records
from extractor.pipeline.interrupt import CtrlC
from extractor.pipeline.predictor import Predictor
from extractor.pipeline.run import Run, RunOptions, produce
from extractor.pipeline.summary import Summary
from extractor.store.locations import Location


class OnePass:
    """One `Run` per (predictor, output), executed together."""

    def __init__(self, predictors: list[Predictor], opts: RunOptions, outs: list[Location], console=None,
                 total: int | None = None):
        self.ctrl_c = CtrlC(console)
        if total is None and not opts.quiet:
            total = count_records(opts.corpus)  # counted once for every progress bar
        self.runs = [Run(p, opts, out, console, self.ctrl_c, total) for p, out in zip(predictors, outs)]

    def prepare(self, keys: list[dict]) -> list[set[int]]:
        """Every output's manifest checked or written before any work; the id keys each has written."""
        return [run.prepare(key) for run, key in zip(self.runs, keys)]

    def execute(self, dones: list[set[int]]) -> list[Summary]:
        """Request each record only for the outputs still missing it (a complete output takes no part)."""
        todo = [(run, done) for run, done in zip(self.runs, dones) if not run.complete]
        if todo:
            with self.ctrl_c, ExitStack() as outputs:
                sinks = [outputs.enter_context(run.writing()) for run, _ in todo]
                produce([run for run, _ in todo], [done for _, done in todo], sinks)
        return [run.summary for run in self.runs]
