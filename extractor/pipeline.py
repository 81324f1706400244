"""read -> render -> generate -> parse/validate -> write, with a manifest and exactly-once resume.

Records are taken in windows (input order) and streamed through the backend, which may work on several
windows at once (hf's fast path refills its slots from the next window) or on one at a time (the default);
rows are put back in input order and written `window` at a time, appended, flushed and fsynced. A killed
run leaves at most a half-written last line, dropped on resume; ids already written under the same
manifest are skipped, so every input id ends up in the output exactly once. An output in an object store,
which cannot append, gets the same guarantee from part objects and a commit (`parts.py`).
"""
from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from extractor.backends.base import Backend, GenParams, Generation, Request
from extractor.corpus import CorpusReader, RejectsWriter, count_records, id_key
from extractor.errors import InputError, LongInputError, ManifestError
from extractor.outputs import SCORED_STATUSES, Validator, judge
from extractor.prompting import PromptBuilder
from extractor.provenance import manifest_path, stamp
from extractor.rows import RESERVED, error_row, keep_fields, prediction_row  # noqa: F401 - RESERVED re-exported
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


@dataclass
class Summary:
    statuses: Counter = field(default_factory=Counter)
    new: int = 0
    already_done: int = 0
    rejected: int = 0
    output_tokens: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    decoders: Counter = field(default_factory=Counter)  # records of this run per decoding path
    decoder_reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"records": sum(self.statuses.values()), "new_this_run": self.new,
                "already_done": self.already_done, "rejected_input": self.rejected,
                "statuses": dict(sorted(self.statuses.items())), "output_tokens_this_run": self.output_tokens,
                "elapsed_s": round(self.elapsed, 3),
                "records_per_s": round(self.new / self.elapsed, 3) if self.elapsed else None,
                "output_tokens_per_s": round(self.output_tokens / self.elapsed, 3) if self.elapsed else None,
                "interrupted": self.interrupted, "complete": not self.interrupted,
                **({"decoder": dict(sorted(self.decoders.items()))} if self.decoders else {}),
                **({"decoder_reason": "; ".join(self.decoder_reasons)} if self.decoder_reasons else {})}

    def count(self, rows: list[dict]) -> None:
        """Rows written by this run."""
        for row in rows:
            self.statuses[row["status"]] += 1
            self.output_tokens += row["output_tokens"] or 0
        self.new += len(rows)

    def count_decoders(self, triples) -> None:
        for _, gen, _ in triples:
            if gen is not None and gen.decoder:
                self.decoders[gen.decoder] += 1
                if gen.decoder_reason:
                    self.decoder_reasons[gen.decoder_reason] += 1


class Predictor:
    """Records -> output rows for one task and backend. Shared by `run` and by training's F1 evaluation."""

    def __init__(self, task, backend: Backend, params: GenParams, on_long: str = "fail",
                 max_input_tokens: int | None = None, keep_fields: tuple = (), few_shot: int | None = None):
        self.task = task
        self.backend = backend
        self.params = params
        self.builder = PromptBuilder(task, backend.tokenizer, few_shot)
        self.validator = Validator(task.schema)
        self.on_long = on_long
        self.limit = max_input_tokens or backend.max_input_tokens(params)
        self.keep_fields = keep_fields
        self.adapter: str | None = None  # the label output rows carry
        self.adapter_key: str | None = None  # the backend's name of it, sent with every request
        if params.constrained:
            if not backend.supports_constrained:
                raise InputError(f"backend '{backend.name}' does not support --constrained")
            from extractor.constrain.grammar import check_expressible
            check_expressible(task.schema)

    def predict(self, records: list[dict]) -> list[dict]:
        """Output rows for one batch of records, in order (training's evaluation, Ray workers)."""
        return [row for triples in self.stream([records]) for row in self.rows(triples)]

    def stream(self, windows):
        """Windows of records in; lists of (record, generation, skip_reason) out, in input order, as the
        backend finishes them (rows are built from these by `rows`, off the generating thread). The backend
        may work on several windows at once (hf's fast path keeps its slots full across windows)."""
        waiting: dict[int, tuple] = {}
        in_flight: dict[int, dict] = {}  # records sent and not yet released, by sequence number
        seq_counter = iter(range(1 << 62))
        next_out = 0

        def requests():
            for records in windows:
                prompts, skipped = self._prompts(records)
                ids = self._token_ids(prompts, skipped)
                batch = []
                for i, rec in enumerate(records):
                    seq = next(seq_counter)
                    in_flight[seq] = rec
                    if i in skipped:
                        waiting[seq] = (rec, None, skipped[i])
                    else:
                        batch.append(Request(prompts[i], rec["id"], {"seq": seq, "ids": ids[i]},
                                             adapter=self.adapter_key))
                yield batch

        for pairs in self.backend.generate_stream(requests(), self.params, self.task.schema, self.probes()):
            for request, gen in pairs:
                seq = request.options["seq"]
                waiting[seq] = (in_flight[seq], gen, None)
            released = []
            while next_out in waiting:
                released.append(waiting.pop(next_out))
                del in_flight[next_out]
                next_out += 1
            if released:
                yield released
        tail = [waiting.pop(k) for k in sorted(waiting)]  # skipped records after the last generation
        if tail:
            yield tail

    def _token_ids(self, prompts: list[str], skipped: dict) -> list:
        """Prompt token ids, encoded here in one batched call per window for backends that take them (the
        backend then encodes nothing itself); None where the backend encodes itself."""
        encode = getattr(self.backend, "encode_batch", None)
        if encode is None:
            return [None] * len(prompts)
        todo = [i for i in range(len(prompts)) if i not in skipped]
        ids: list = [None] * len(prompts)
        for i, e in zip(todo, encode([prompts[i] for i in todo])):
            ids[i] = e
        return ids

    def rows(self, triples) -> list[dict]:
        return [self._row(rec, gen, skip) for rec, gen, skip in triples]

    def probes(self) -> list[str]:
        """The prompt rendered with placeholder values: where they differ, the task's shared prefix ends."""
        fields = self.task.spec.input_fields
        return [self.builder.build({f: probe for f in fields}) for probe in ("0", "A", "中", "{", " x")]

    def _prompts(self, records: list[dict]) -> tuple[list[str], dict[int, str]]:
        prompts = [self.builder.build(r["values"], where=f"record {r['id']}") for r in records]
        skipped: dict[int, str] = {}
        if self.limit is None:
            return prompts, skipped
        lengths = self.backend.count_tokens(prompts)
        for i, n in enumerate(lengths):
            if n <= self.limit:
                continue
            message = f"record {records[i]['id']}: prompt has {n} tokens, more than the limit {self.limit}"
            if self.on_long == "fail":
                raise LongInputError(f"{message}; pass --on-long truncate or --on-long skip, or raise "
                                     "--max-input-tokens")
            if self.on_long == "skip":
                skipped[i] = f"{message}; skipped (--on-long skip)"
            else:
                prompts[i] = self._truncate(records[i], n)
        return prompts, skipped

    def _truncate(self, record: dict, n_tokens: int) -> str:
        """Cut the record's first input field until the whole prompt fits the limit."""
        field0 = self.task.spec.input_fields[0]
        values = dict(record["values"])
        over = n_tokens - self.limit
        for _ in range(4):
            text_tokens = self.backend.count_tokens([values[field0]])[0]
            values[field0] = self.backend.truncate_tokens(values[field0], text_tokens - over - 2)
            prompt = self.builder.build(values)
            over = self.backend.count_tokens([prompt])[0] - self.limit
            if over <= 0:
                return prompt
        raise LongInputError(f"record {record['id']}: the prompt without its text is already longer than "
                             f"{self.limit} tokens; raise --max-input-tokens or shorten the task's prompt")

    def _row(self, rec: dict, gen: Generation | None, skip_reason: str | None) -> dict:
        if gen is None or gen.error:
            row = error_row(rec["id"], self.task.name, skip_reason or gen.error, self.adapter,
                            gen.prompt_tokens if gen else None)
        else:
            row = prediction_row(rec["id"], self.task.name, gen, judge(gen.text, gen.finish_reason, self.validator),
                                 self.adapter)
        return keep_fields(row, rec["row"], self.keep_fields)


def output_for_adapter(out: Location, adapter: str | None, n_adapters: int) -> Location:
    """One output per adapter: preds.jsonl -> preds.<adapter>.jsonl when several adapters run."""
    if adapter is None or n_adapters == 1:
        return out
    suffixes = "".join(out.suffixes)
    return out.with_name(out.name[: -len(suffixes)] + f".{adapter}" + suffixes)


def run_key(task, backend: Backend, predictor: Predictor, opts: RunOptions) -> dict:
    """What must match for --resume to continue an output."""
    return {**task.provenance(), "backend": backend.identity(), "params": opts.params.as_dict(),
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


class Progress:
    """The progress bar: records written or skipped, with the rates and the invalid count of a summary."""

    def __init__(self, bar, summary: Summary, start: float):
        self.bar, self.summary, self.start = bar, summary, start

    def skipped(self, n: int) -> None:
        self.bar.update(n)

    def written(self, count: int) -> None:
        self.bar.update(count)
        secs = max(time.perf_counter() - self.start, 1e-9)
        s = self.summary
        invalid = sum(n for status, n in s.statuses.items() if status not in SCORED_STATUSES)
        self.bar.set_postfix_str(f"{s.new / secs:.1f} rec/s, {s.output_tokens / secs:.0f} tok/s, invalid {invalid}",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


class RowSink:
    """Builds and writes released rows on a thread of its own, `window` rows per append, counting them in
    `summary` and on `progress`. `put` takes what `to_rows` turns into rows (the predictor's triples, parsed and
    validated here, off the generating thread); `put_rows` takes rows already built (a Ray actor's)."""

    def __init__(self, writer, to_rows, window: int, summary: Summary, progress: Progress | None = None):
        import queue
        import threading
        self.writer, self.to_rows, self.window = writer, to_rows, window
        self.summary, self.progress = summary, progress
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._work, name="extractor-writer", daemon=True)
        self.thread.start()

    def put(self, triples) -> None:
        self._put("triples", triples)

    def put_rows(self, rows: list[dict]) -> None:
        self._put("rows", rows)

    def _put(self, kind: str, item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((kind, item))

    def skipped(self, n: int) -> None:
        if n:
            self.queue.put(("skipped", n))

    def close(self, raise_errors: bool = True) -> None:
        if not self._closed:
            self._closed = True
            self.queue.put(("end", None))
            self.thread.join()
        if raise_errors and self.error is not None:
            raise self.error

    def _work(self) -> None:
        pending: list[dict] = []
        while True:
            kind, item = self.queue.get()
            if self.error is not None:
                if kind == "end":
                    return
                continue
            try:
                if kind in ("triples", "rows"):
                    pending.extend(self.to_rows(item) if kind == "triples" else item)
                    if len(pending) >= self.window:
                        self._write(pending)
                        pending = []
                elif kind == "skipped" and self.progress is not None:
                    self.progress.skipped(item)
                elif kind == "end":
                    self._write(pending)
                    return
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.writer.write_batch(rows)
        self.summary.count(rows)
        if self.progress is not None:
            self.progress.written(len(rows))


class prefetch:
    """Iterate a generator on a background thread, up to `depth` items ahead (reading and rendering the
    next windows while the backend works). Exceptions surface in the consumer, where they happened."""

    def __init__(self, iterator, depth: int = 2):
        import queue
        import threading
        self.iterator = iterator
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="extractor-reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self._items()

    def __exit__(self, *exc):
        self._stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                self.thread.join(timeout=0.05)
        return False

    def _work(self) -> None:
        try:
            for item in self.iterator:
                if self._stop.is_set():
                    return
                self.queue.put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self.queue.put(("error", exc))
            return
        self.queue.put(("end", None))

    def _items(self):
        while True:
            kind, item = self.queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
