"""One output (file or object): the manifest and its run key, exactly-once resume, the windows still to do,
Ctrl-C, the summary. Rows are written by `sink.RowSink`; records become rows in `predictor.Predictor`."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from extractor.backends.base import Backend, GenParams
from extractor.corpus import CorpusReader, RejectsWriter, count_records, id_key
from extractor.errors import ManifestError
from extractor.pipeline.predictor import Predictor
from extractor.pipeline.sink import Progress, RowSink, prefetch
from extractor.pipeline.summary import Summary
from extractor.provenance import manifest_path, stamp
from extractor.storage import Location, is_remote, remove
from extractor.writers import JournalOutput

MANIFEST_FORMAT = "extractor.manifest/1"


@dataclass
class RunOptions:
    corpus: Location
    out: Location
    params: GenParams
    id_field: str = "id"
    text_field: str | None = None
    keep_fields: tuple = ()
    on_bad: str = "fail"
    rejects: Location | None = None
    resume: bool = False
    overwrite: bool = False
    on_long: str = "fail"
    max_input_tokens: int | None = None
    window: int = 256
    quiet: bool = False
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (k, n): only records whose index mod n is k


def output_for_adapter(out: Location, adapter: str | None, n_adapters: int) -> Location:
    """One output per adapter: preds.jsonl -> preds.<adapter>.jsonl when several adapters run."""
    if adapter is None or n_adapters == 1:
        return out
    suffixes = "".join(out.suffixes)
    return out.with_name(out.name[: -len(suffixes)] + f".{adapter}" + suffixes)


def run_key(task, backend: Backend, predictor: Predictor, opts: RunOptions) -> dict:
    """What must match for --resume to continue an output."""
    return {**task.provenance(), "backend": backend.identity(predictor.adapter_key), "params": opts.params.as_dict(),
            "prompt_format": "chat" if predictor.builder.chat else "raw", "few_shot": predictor.builder.few_shot,
            "id_field": opts.id_field,
            "text_field": opts.text_field, "on_long": opts.on_long, "max_input_tokens": predictor.limit,
            "keep_fields": list(opts.keep_fields), "shard": list(opts.shard) if opts.shard else None}


def output_store(out):
    """How rows reach the output: appended to a local journal, or put as parts to an object store."""
    if is_remote(out):
        from extractor.parts import PartsOutput
        return PartsOutput(out)
    return JournalOutput(out)


class Run:
    """One output (file or object): manifest, resume state, windows, progress and summary."""

    def __init__(self, predictor: Predictor, opts: RunOptions, out: Location, console=None):
        self.p = predictor
        self.opts = opts
        self.out = out
        self.store = output_store(out)
        self.console = console
        self.summary = Summary()
        self._stop = False
        self.complete = False  # a Parquet output already converted: nothing left to do

    def prepare(self, key: dict) -> set[int]:
        """Check or write the manifest; return the id keys already written."""
        exists = self.store.exists()
        if exists and not (self.opts.resume or self.opts.overwrite):
            raise ManifestError(f"{self.out} already exists; pass --resume to continue it or --overwrite to start over")
        if self.opts.overwrite and not self.opts.resume:
            self.store.clear()
            exists = False
        if exists:
            self._check_manifest(key)
            self.complete = self.store.finished()
            return self._done_ids()
        self.manifest = {"format": MANIFEST_FORMAT, "run_key": key, "corpus": str(self.opts.corpus),
                         "output": str(self.out), **stamp(), "summary": None}
        self.store.write_manifest(self.manifest)
        return set()

    def _check_manifest(self, key: dict) -> None:
        import json
        mpath = manifest_path(self.out)
        try:
            manifest = json.loads(self.store.manifest_text())
        except FileNotFoundError:
            raise ManifestError(f"{self.out} exists but has no manifest ({mpath.name}); it was not written by "
                                "extractor run — use another --out or --overwrite") from None
        except (OSError, ValueError):
            raise ManifestError(f"{mpath}: manifest is corrupt; use another --out or --overwrite") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{mpath}: not an extractor run manifest; use another --out or --overwrite")
        old = manifest.get("run_key", {})
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if diff:
            raise ManifestError(f"{self.out}: --resume refused, this run differs from the one that wrote it in: "
                                f"{', '.join(diff)}; rerun with the same settings or use another --out")
        self.manifest = manifest

    def _done_ids(self) -> set[int]:
        done: set[int] = set()
        for row in self.store.done_rows(self.manifest, self.console):
            done.add(id_key(str(row["id"])))
            self.summary.statuses[row["status"]] += 1
        self.summary.already_done = len(done)
        return done

    def execute(self, done: set[int]) -> Summary:
        """Rows go to a writer thread (`RowSink`) that parses, validates and writes them in input order,
        `window` rows per append (what a kill can lose); Ctrl-C stops taking new records and drains what is in
        flight. Where the rows come from is `_produce`'s (here: the corpus, read on a thread ahead of the
        backend, which keeps the GPU busy in between)."""
        if self.complete:
            return self.summary
        start = time.perf_counter()
        progress = self._progress(start)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        writer = self.store.appender(self.manifest)
        sink = RowSink(writer, self.p.rows, self.opts.window, self.summary, progress)
        try:
            self._produce(done, sink)
            sink.close()
        finally:
            sink.close(raise_errors=False)
            writer.close()
            signal.signal(signal.SIGINT, previous)
            if progress is not None:
                progress.close()
            self.summary.elapsed = time.perf_counter() - start
        self.summary.interrupted = self._stop
        self._finish()
        return self.summary

    def _produce(self, done: set[int], sink: "RowSink") -> None:
        """Read the corpus (windows on a thread ahead of the backend), generate, hand the rows to the sink."""
        rejects = RejectsWriter(self._rejects_path()) if self.opts.on_bad == "skip" else None
        if rejects is not None:
            remove(rejects.path)  # derived from the input: rebuilt on every pass
        reader = CorpusReader(self.opts.corpus, self.p.task.spec.input_fields, self.opts.id_field,
                              self.opts.text_field, self.opts.on_bad, rejects, batch_size=self.opts.window)
        try:
            with prefetch(self._windows(reader, done, sink)) as windows:
                for triples in self.p.stream(windows):
                    self.summary.count_decoders(triples)
                    sink.put(triples)
        finally:
            if rejects is not None:
                rejects.close()
            self.summary.rejected = reader.stats.rejected

    def _windows(self, reader, done: set[int], sink: "RowSink"):
        """Windows of records still to do (this shard's, not yet written, within --limit), until Ctrl-C."""
        index = 0
        sent = 0
        for window in reader:
            if self.opts.shard:
                k, n = self.opts.shard
                window, index = [r for i, r in enumerate(window, index) if i % n == k], index + len(window)
            todo = [r for r in window if id_key(r["id"]) not in done]
            if self.opts.limit is not None:
                todo = todo[: max(0, self.opts.limit - sent)]
            sent += len(todo)
            sink.skipped(len(window) - len(todo))
            if todo:
                yield todo
            if self._stop or (self.opts.limit is not None and sent >= self.opts.limit):
                return

    def _rejects_path(self) -> Location:
        return self.opts.rejects or self.out.with_name(self.out.name + ".rejects.jsonl")

    def _on_sigint(self, *_):
        if self._stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop = True
        if self.console:
            self.console.print("Ctrl-C: stopping after the current batch (again to stop now)")

    def _progress(self, start: float) -> "Progress | None":
        if self.opts.quiet:
            return None
        from tqdm import tqdm
        bar = tqdm(total=count_records(self.opts.corpus), unit="rec", desc=self.out.name, dynamic_ncols=True)
        return Progress(bar, self.summary, start)

    def _finish(self) -> None:
        self.manifest["summary"] = self.summary.as_dict()
        self.manifest["finished"] = stamp()["created"]
        self.store.finish(self.manifest, complete=not self.summary.interrupted)
