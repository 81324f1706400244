"""One output (file or object): the manifest and its run key, exactly-once resume, the sink its rows are
written through, the summary. Records become requests in `renderer.Renderer` and rows in `row_judge.RowJudge`;
what fills an output from the corpus is `one_pass.OnePass` (one output, or several of one corpus)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from extractor.backends.base import Backend
from extractor.errors import InputError, ManifestError
from extractor.pipeline.interrupt import CtrlC
from extractor.pipeline.lanes import Lane
from extractor.pipeline.options import RunOptions
from extractor.pipeline.sink import Progress, RowSink
from extractor.pipeline.summary import Summary
from extractor.store.corpus_path import corpus_identity, count_records
from extractor.store.locations import Location, exists, is_remote
from extractor.store.provenance import manifest_path, stamp
from extractor.store.records import id_key
from extractor.store.rejects import remove_stale
from extractor.store.writers import JournalOutput, StdoutOutput, is_stdout

MANIFEST_FORMAT = "extractor.manifest/1"


def output_for_adapter(out: Location, adapter: str | None, n_adapters: int) -> Location:
    """One output per adapter: preds.jsonl -> preds.<adapter>.jsonl when several adapters run."""
    if adapter is None or n_adapters == 1:
        return out
    suffixes = "".join(out.suffixes)
    return out.with_name(out.name[: -len(suffixes)] + f".{adapter}" + suffixes)


def run_key(task, backend: Backend, lane: Lane, opts: RunOptions) -> dict:
    """What must match for --resume to continue an output (the chunk settings only where they apply, so
    outputs written before chunking existed resume as they did)."""
    renderer = lane.renderer
    chunking = {"chunking": renderer.chunking.as_dict()} if opts.on_long == "chunk" else {}
    return {**task.provenance(), "backend": backend.identity(lane.adapter), "params": opts.params.as_dict(),
            "prompt_format": "chat" if renderer.builder.chat else "raw", "few_shot": renderer.builder.few_shot,
            "id_field": opts.id_field,
            "text_field": opts.text_field, "on_long": opts.on_long, "max_input_tokens": renderer.limit,
            "keep_fields": list(opts.keep_fields), "shard": list(opts.shard) if opts.shard else None,
            "corpus": corpus_identity(opts.corpus), **chunking}


def output_store(out):
    """How rows reach the output: appended to a local journal, or put as parts to an object store."""
    if is_remote(out):
        from extractor.store.parts import PartsOutput
        return PartsOutput(out)
    if is_stdout(out):
        return StdoutOutput(out)
    return JournalOutput(out)


class Run:
    """One output (file or object) of `task` decoded by `backend`: manifest, resume state, the sink its rows
    go to (made by its lane's judge), progress and summary."""

    def __init__(self, task, backend: Backend, lane: Lane, opts: RunOptions, out: Location, console=None,
                 ctrl_c: CtrlC | None = None, total: int | None = None):
        self.task, self.backend, self.lane = task, backend, lane
        self.opts = opts
        self.out = out
        self.store = output_store(out)
        self.console = console
        self.summary = Summary()
        self.ctrl_c = ctrl_c or CtrlC(console)  # shared by the outputs of one pass
        self.total = total  # records in the corpus (the progress bar's end), where already counted
        self.complete = False  # a Parquet output already converted: nothing left to do
        self.created = False  # this run wrote the manifest: a failure before any row leaves nothing behind

    def prepare(self, key: dict) -> set[int]:
        """Check or write the manifest; return the id keys already written."""
        self.store.settle()  # what a killed run left half done (an overwrite's old output aside: store/aside.py)
        if not is_remote(self.rejects_path()):  # and the hidden rejects file of a killed pass
            remove_stale(self.rejects_path())
        exists = self.store.exists()
        if exists and not (self.opts.resume or self.opts.overwrite):
            raise ManifestError(f"{self.out} already exists; pass --resume to continue it or --overwrite to start over")
        if exists and self.opts.resume:
            self._check_manifest(key)
        self._check_rejects(self.manifest if exists and self.opts.resume else None)
        if self.opts.overwrite and not self.opts.resume:
            self.store.replace()  # the old output kept aside until this run commits
            exists = False
        if exists:
            self.complete = self.store.finished()
            return self._done_ids()
        self.created = True
        self.manifest = {"format": MANIFEST_FORMAT, "run_key": key, "corpus": str(self.opts.corpus),
                         "prediction_schema": self.task.schema,  # a Parquet output's typed column
                         "output": str(self.out), "rejects": self._rejects_name(), **stamp(), "summary": None}
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
        except (OSError, ValueError, RecursionError):
            raise ManifestError(f"{mpath}: manifest is corrupt; use another --out or --overwrite") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{mpath}: not an extractor run manifest; use another --out or --overwrite")
        old = manifest.get("run_key")
        if not isinstance(old, dict):
            raise ManifestError(f"{mpath}: manifest is corrupt ('run_key' is {type(old).__name__}, not an object); "
                                "use another --out or --overwrite")
        if (key.get("corpus") or {}).get("stream"):
            raise ManifestError(f"{self.opts.corpus}: --resume needs to know the corpus is the one {self.out} was "
                                "made from, and a FIFO cannot be read twice to hash it; save the stream to a file "
                                "and resume from that file, or use --overwrite")
        diff = key_differences(old, key)
        if diff:
            raise ManifestError(f"{self.out}: --resume refused, this run differs from the one that wrote it in: "
                                f"{', '.join(diff)}; rerun with the same settings or use another --out")
        self.manifest = manifest

    def _rejects_name(self) -> str | None:
        return str(self.rejects_path()) if self.opts.on_bad == "skip" else None

    def _check_rejects(self, manifest: dict | None) -> None:
        """A rejects file already there is replaced only when the user says so (--overwrite), or by a
        --resume of the run that wrote it (it names the file in its manifest)."""
        if self.opts.on_bad != "skip" or self.opts.overwrite and not self.opts.resume:
            return
        if self.opts.shard and self.opts.rejects:
            return  # --gpus workers share the parent's --rejects, which the parent checked and holds
        path = self.rejects_path()
        if not exists(path):
            return
        ours = manifest is not None and manifest.get("rejects", str(self._default_rejects())) == str(path)
        if not ours:
            what = f"--rejects {path}" if self.opts.rejects else f"the rejects file {path}"
            raise ManifestError(f"{what} already exists; pass --overwrite to replace it or choose another "
                                "--rejects")

    def _done_ids(self) -> set[int]:
        """The ids already written. A row written twice (by hand, or by runs before outputs were locked) is
        dropped, the first of each id kept, and the file rewritten whole."""
        done: set[int] = set()
        duplicates = 0
        for source, line, row in self.store.done_rows(self.manifest, self.console):
            key = id_key(str(_row_field(row, "id", source, line)))
            if key in done:
                duplicates += 1
                continue
            done.add(key)
            self.summary.statuses[_row_field(row, "status", source, line)] += 1
            self.summary.count_chunks(row)
        if duplicates:
            self.store.rewrite(self.manifest, first_of_each_id(self.store.done_rows(self.manifest)))
            if self.console is not None:
                self.console.print(f"{self.out}: dropped {duplicates} duplicate row(s) (an id written more than "
                                   "once); kept the first row of each id", soft_wrap=True)
        self.summary.already_done = len(done)
        return done

    @contextmanager
    def writing(self) -> Iterator[RowSink]:
        """The sink this output's rows go to while the run works (with its writer, progress bar and clock): a
        writer thread that judges and writes them in input order, `window` rows per append (what a kill can
        lose). On a clean exit its last rows are written and the manifest gets the summary; after an error it
        is left unfinished, for --resume."""
        start = time.perf_counter()
        writer = self.store.appender(self.manifest)
        progress = self._progress(start)
        sink = RowSink(writer, self.lane.judge.rows, self.opts.window, self.summary, progress)
        try:
            try:
                yield sink
                sink.close()
            finally:
                sink.close(raise_errors=False)
                writer.close()
                if progress is not None:
                    progress.close()
                self.summary.elapsed = time.perf_counter() - start
        except BaseException:
            self._discard_if_empty()
            raise
        self.summary.interrupted = self._stop
        self._finish()
        if self.summary.interrupted:
            self.store.settle()  # stopped before its first row: an output it was to replace is back

    def _discard_if_empty(self) -> None:
        """A run that failed before writing a row leaves nothing behind (not an empty output and a manifest
        that the corrected command would have to --overwrite); an output it was to replace is back."""
        try:
            if self.created and self.summary.new == 0 and self.store.is_empty():
                self.store.clear()
                self.store.settle()
        except Exception:  # noqa: BLE001 - the error that stopped the run is the one to report
            pass

    @property
    def _stop(self) -> bool:
        return self.ctrl_c.requested

    def rejects_path(self) -> Location:
        return self.opts.rejects or self._default_rejects()

    def _default_rejects(self) -> Location:
        return self.out.with_name(self.out.name + ".rejects.jsonl")

    def _progress(self, start: float) -> "Progress | None":
        if self.opts.quiet:
            return None
        from tqdm import tqdm
        total = self.total if self.total is not None else count_records(self.opts.corpus)
        if self.opts.limit is not None:  # the bar counts this run's records only (Todo skips none)
            left = None if total is None else max(0, total - self.summary.already_done)
            total = self.opts.limit if left is None else min(self.opts.limit, left)
        bar = tqdm(total=total, unit="rec", desc=self.out.name, dynamic_ncols=True)
        return Progress(bar, self.summary, start)

    def _finish(self) -> None:
        self.manifest["summary"] = self.summary.as_dict()
        startup = self.backend.startup_record()
        if startup is not None:
            self.manifest["startup"] = startup
        self.manifest["finished"] = stamp()["created"]
        self.store.finish(self.manifest, complete=not self.summary.interrupted)


def key_differences(old: dict, new: dict) -> list[str]:
    """The run-key entries that differ, one level down where both sides are objects (`corpus.size`)."""
    diff = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            diff.append(k)
    return diff


def _row_field(row: dict, name: str, source: str, line: int):
    """A written row's `id` or `status`, which resuming needs; a row without it was not written by a run."""
    value = row.get(name)
    if isinstance(value, str) and value or name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return value
    what = "has no" if value is None else f"has a bad ({type(value).__name__})"
    raise InputError(f"{source}:{line}: row {what} '{name}' field; this output was not written by extractor run, "
                     "or was edited — fix the row, use another --out, or --overwrite")


def first_of_each_id(rows) -> "Iterator[dict]":
    seen: set[int] = set()
    for _, _, row in rows:
        key = id_key(str(row["id"]))
        if key not in seen:
            seen.add(key)
            yield row
