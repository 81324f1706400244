"""Outputs of one corpus filled by one read of it: one output, or several, one per adapter (`extractor run
--adapter A --adapter B` on a backend that mixes adapters in one stream). The corpus is read and each record
rendered and tokenized once, and every output's requests go through one backend stream, so the engine neither
switches between runs nor drains at the end of each. Each output is still a `Run` of its own (manifest and
run key, exactly-once --resume, rejects, summary, progress bar), with the rows a run of that adapter alone
writes, in the same order; one Ctrl-C stops them all. `OnePass.execute` is the one way records get from the
corpus to the outputs."""
from __future__ import annotations

from contextlib import ExitStack

from extractor.backends.base import Backend
from extractor.pipeline.interrupt import CtrlC
from extractor.pipeline.lanes import Lane, stream_lanes
from extractor.pipeline.options import RunOptions
from extractor.pipeline.run import Run
from extractor.pipeline.sink import RowSink, prefetch
from extractor.pipeline.summary import Summary
from extractor.store.corpus import CorpusReader
from extractor.store.corpus_path import count_records
from extractor.store.locations import Location
from extractor.store.records import id_key
from extractor.store.rejects import RejectsWriter


class OnePass:
    """One `Run` per (lane, output), of `task` decoded by `backend`, executed together."""

    def __init__(self, task, backend: Backend, lanes: list[Lane], opts: RunOptions, outs: list[Location],
                 console=None, total: int | None = None):
        self.task, self.backend, self.opts = task, backend, opts
        self.ctrl_c = CtrlC(console)
        if total is None and not opts.quiet:
            total = count_records(opts.corpus)  # counted once for every progress bar
        self.runs = [Run(task, backend, lane, opts, out, console, self.ctrl_c, total)
                     for lane, out in zip(lanes, outs)]

    def prepare(self, keys: list[dict]) -> list[set[int]]:
        """Every output's manifest checked or written before any work; the id keys each has written."""
        return [run.prepare(key) for run, key in zip(self.runs, keys)]

    def execute(self, dones: list[set[int]]) -> list[Summary]:
        """Request each record only for the outputs still missing it (a complete output takes no part). Rows go
        to each output's writer thread (`Run.writing`); Ctrl-C stops taking new records and drains what is in
        flight."""
        todo = [(run, done) for run, done in zip(self.runs, dones) if not run.complete]
        if todo:
            with self.ctrl_c, ExitStack() as outputs:
                sinks = [outputs.enter_context(run.writing()) for run, _ in todo]
                self._produce([run for run, _ in todo], [done for _, done in todo], sinks)
        return [run.summary for run in self.runs]

    def _produce(self, runs: list[Run], dones: list[set[int]], sinks: list[RowSink]) -> None:
        """Fill `runs` from one read of the corpus (windows read on a thread ahead of the backend): each record
        rendered and tokenized once and requested once per output that has not written it; each output's rows
        reach its sink in input order. Stops at Ctrl-C, or when every output has its --limit."""
        opts = self.opts
        rejects = RejectsTee([run.rejects_path() for run in runs]) if opts.on_bad == "skip" else None
        reader = CorpusReader(opts.corpus, self.task.spec.input_fields, opts.id_field, opts.text_field,
                              opts.on_bad, rejects, batch_size=opts.window)
        todos = [Todo(done, opts.limit, sink) for done, sink in zip(dones, sinks)]

        def windows():
            for window in shard_windows(reader, opts.shard):
                shares = [todo(window) for todo in todos]
                if any(shares):
                    yield window, shares
                if self.ctrl_c.requested or all(todo.full for todo in todos):
                    return
        try:
            with prefetch(windows()) as stream:
                lanes = [run.lane for run in runs]
                for lane, triples in stream_lanes(self.backend, opts.params, self.task.constraint_schema, lanes, stream):
                    runs[lane].summary.count_decoders(triples)
                    sinks[lane].put(triples)
        except BaseException:
            if rejects is not None:
                rejects.discard()
            raise
        finally:
            for run in runs:
                run.summary.rejected = reader.stats.rejected
        if rejects is not None:
            rejects.close()


class Todo:
    """One output's share of each reading window: the records it has not written yet, within --limit; without
    a limit the others go to its progress bar as skipped (its end is then the corpus's size)."""

    def __init__(self, done: set[int], limit: int | None, sink: RowSink):
        self.done, self.limit, self.sink = done, limit, sink
        self.sent = 0

    def __call__(self, window: list[dict]) -> list[dict]:
        todo = [r for r in window if id_key(r["id"]) not in self.done]
        if self.limit is not None:
            todo = todo[: max(0, self.limit - self.sent)]
        self.sent += len(todo)
        if self.limit is None:  # with --limit the bar counts new records only, up to the limit
            self.sink.skipped(len(window) - len(todo))
        return todo

    @property
    def full(self) -> bool:
        return self.limit is not None and self.sent >= self.limit


def shard_windows(reader, shard: tuple[int, int] | None):
    """The reader's windows; with --shard k/n only record i mod n == k of them (counting good records)."""
    index = 0
    for window in reader:
        if shard:
            k, n = shard
            window, index = [r for i, r in enumerate(window, index) if i % n == k], index + len(window)
        yield window


class RejectsTee:
    """Rejected input records to every output's rejects file (one file where they share one), each rebuilt
    from the input on every pass: replaced when the pass ends, left as it was when the pass fails."""

    def __init__(self, paths: list[Location]):
        self.writers = [RejectsWriter(path) for path in {str(p): p for p in paths}.values()]

    def write(self, bad) -> None:
        for writer in self.writers:
            writer.write(bad)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def discard(self) -> None:
        for writer in self.writers:
            writer.discard()
