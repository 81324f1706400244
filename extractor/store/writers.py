"""Append-safe output: JSONL appended per batch (flushed and fsynced), Parquet built from that journal.

A killed writer can leave at most one half-written last line; `drop_partial_tail` removes it before a
resume. Parquet cannot be appended to, so a `.parquet` output is journaled as JSONL while the run goes
and converted (to a temporary file, then renamed) when it completes. `JournalOutput` is that life cycle for
one local output; `parts.PartsOutput` is the same for an object store, which cannot append at all.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from extractor import jsonutil

from extractor.store import locations
from extractor.errors import InputError, OutputError, output_error
from extractor.store.provenance import manifest_path, write_json_atomic

# nested values stored as JSON text in Parquet (their keys vary from row to row: no one column type fits)
JSON_COLUMNS = ("prediction", "gold", "kept", "spans", "chunk_conflicts")
# Row flags present only in the rows they flag (`--on-long truncate`'s): a Parquet column of every row, null
# where absent, read back absent.
FLAG_COLUMNS = ("input_truncated",)
TYPED_TEXT = "prediction_json"  # beside a typed `prediction` column: the exact prediction as JSON text


def journal_path(out: Path) -> Path:
    """Where records are appended while a run goes: the output itself, or a JSONL beside a Parquet."""
    return out.with_name(out.name + ".partial.jsonl") if is_parquet(out) else out


def overwrite_aside(out: Path):
    """What --overwrite keeps of a local output until the new run commits (store/aside.py): the output, its journal
    and its manifest."""
    from extractor.store.aside import Aside
    return Aside([out, journal_path(out), manifest_path(out)])


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


class JsonlAppender:
    def __init__(self, path: Path, fsync: bool = True):
        self.path = path
        self.fsync = fsync
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "ab")
        except OSError as exc:
            raise output_error(path, exc, resumable=False) from None

    def write_batch(self, rows: Iterable[dict]) -> None:
        data = "".join(jsonutil.dumps(r) + "\n" for r in rows).encode("utf-8")
        if not data:
            return
        try:
            self._fh.write(data)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError as exc:  # e.g. disk full: at most a partial last line, dropped on resume
            raise output_error(self.path, exc) from None

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:  # the write that failed already raised a clear error
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_partial_tail(path: Path) -> int:
    """Truncate a last line that lacks its newline (a write cut by a kill). Returns bytes dropped."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Walk back to the previous newline in blocks.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line, object) for each line of a JSONL file the project wrote; a bad line is an InputError."""
    from extractor.store.corpus_formats import iter_jsonl
    from extractor.store.records import BadRecord
    for item in iter_jsonl(path):
        if isinstance(item, BadRecord):
            raise InputError(f"{item.source}:{item.line}: {item.reason}")
        if not isinstance(item[1], dict):
            raise InputError(f"{path}:{item[0]}: expected a JSON object, got {type(item[1]).__name__}")
        yield item


def iter_rows(path: locations.Location) -> Iterator[tuple[int, dict]]:
    """Rows of a JSONL or Parquet results file, local or in an object store (Parquet JSON columns decoded)."""
    if not is_parquet(path):
        yield from iter_jsonl_rows(path)
        return
    import pyarrow.parquet as pq
    with locations.open_read(path) as fh:
        try:
            pfile = pq.ParquetFile(fh)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for broken files
            raise InputError(f"{path}: cannot read Parquet ({exc})") from None
        line = 1
        for batch in pfile.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                if TYPED_TEXT in row:  # a typed prediction column: the exact value is its text
                    text = row.pop(TYPED_TEXT)
                    row["prediction"] = None if text is None else jsonutil.loads(text)
                for col in JSON_COLUMNS:
                    if isinstance(row.get(col), str):
                        row[col] = jsonutil.loads(row[col])
                for col in FLAG_COLUMNS:
                    if col in row and row[col] is None:
                        del row[col]
                yield line, row
                line += 1


def jsonl_to_parquet(src: Path, dest: locations.Location, batch_size: int = 8192, prediction_schema=None) -> int:
    """Convert a results journal to Parquet atomically; nested columns become JSON text (the prediction also a
    typed column where `prediction_schema`, the task's JSON Schema, can be expressed: arrow_types.py)."""
    return write_parquet((row for _, row in iter_jsonl_rows(src)), dest, batch_size, prediction_schema)


def write_jsonl(rows: Iterable[dict], dest: locations.Location) -> int:
    """Results rows to a JSONL file or object that appears whole (locations.atomic_writer)."""
    count = 0
    with locations.atomic_writer(dest) as fh:
        for row in rows:
            fh.write((jsonutil.dumps(row) + "\n").encode("utf-8"))
            count += 1
    return count


def write_parquet(rows: Iterable[dict], dest: locations.Location, batch_size: int = 8192,
                  prediction_schema=None) -> int:
    """Results rows to a Parquet file or object that appears whole (locations.atomic_writer). With the task's
    `prediction_schema`, where expressible, `prediction` is a typed column and `prediction_json` its text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from extractor.store.arrow_types import arrow_type, compile_type
    node = compile_type(prediction_schema)[0] if prediction_schema is not None else None
    typed = (node, arrow_type(node)) if node is not None else None
    writer = None
    count = 0
    with locations.atomic_writer(dest) as fh:
        try:
            batch: list[dict] = []
            for row in rows:
                batch.append(_flatten(row, typed))
                if len(batch) >= batch_size:
                    writer = _write(batch, fh, writer, pa, pq, typed)
                    count += len(batch)
                    batch = []
            if batch or writer is None:
                writer = _write(batch, fh, writer, pa, pq, typed)
                count += len(batch)
        finally:
            if writer is not None:
                writer.close()
    return count


def write_rows(rows: Iterable[dict], dest: locations.Location, prediction_schema=None) -> int:
    """Results rows to `dest` whole: Parquet (the prediction typed by the task's schema) or JSONL, by its name."""
    if is_parquet(dest):
        return write_parquet(rows, dest, prediction_schema=prediction_schema)
    return write_jsonl(rows, dest)


def _flatten(row: dict, typed=None) -> dict:
    out = dict(row)
    results = "id" in out and "status" in out
    if results:  # a results row: its flags are columns of every row
        for col in FLAG_COLUMNS:
            out.setdefault(col, None)
    if typed is not None and results:  # the exact value as text; the typed view where it fits exactly
        from extractor.store.arrow_types import conforms
        value = out.get("prediction")
        out[TYPED_TEXT] = None if value is None else jsonutil.dumps(value)
        out["prediction"] = value if conforms(value, typed[0]) else None
    for col in JSON_COLUMNS:
        if col in out and out[col] is not None and not (typed is not None and results and col == "prediction"):
            out[col] = jsonutil.dumps(out[col])
    return out


def _write(batch, sink, writer, pa, pq, typed=None):
    if typed is not None and batch and "prediction" in batch[0]:
        values = [row.pop("prediction") for row in batch]
        table = pa.Table.from_pylist(batch).append_column(pa.field("prediction", typed[1]),
                                                          pa.array(values, type=typed[1]))
    else:
        table = pa.Table.from_pylist(batch)
    if writer is None:
        schema = table.schema
        for col in FLAG_COLUMNS:  # all null in the first batch: typed as the flag it is, not as null
            i = schema.get_field_index(col)
            if i >= 0 and schema.field(i).type == pa.null():
                schema = schema.set(i, pa.field(col, pa.bool_()))
        table = table.cast(schema)
        writer = pq.ParquetWriter(sink, table.schema)
    elif table.schema != writer.schema:
        table = table.cast(writer.schema)
    writer.write_table(table)
    return writer


STDOUT = "-"  # `--out -`: JSONL rows on standard output


def is_stdout(path) -> bool:
    return not locations.is_remote(path) and str(path) == STDOUT


class StdoutOutput:
    """`--out -`: rows as JSONL lines on stdout, each window flushed as it is written. Nothing to resume, so
    no manifest (the summary goes to stderr) and never anything already there."""

    def __init__(self, out):
        self.out = out

    def exists(self) -> bool:
        return False

    def is_empty(self) -> bool:
        return True

    def clear(self) -> None:
        pass

    def replace(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def write_manifest(self, manifest: dict) -> None:
        pass

    def finished(self) -> bool:
        return False

    def appender(self, manifest: dict) -> "StdoutAppender":
        return StdoutAppender()

    def finish(self, manifest: dict, complete: bool) -> None:
        pass


class StdoutAppender:
    def __init__(self):
        import sys
        self.stream = sys.stdout.buffer

    def write_batch(self, rows: Iterable[dict]) -> None:
        data = "".join(jsonutil.dumps(r) + "\n" for r in rows).encode("utf-8")
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError:
            raise OutputError("--out -: stdout was closed (the reader of the pipe exited) before the run ended; "
                              "the rows after it are lost — rerun, writing to a file to be able to --resume") from None

    def close(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


class JournalOutput:
    """A local output's life cycle: rows appended to a journal (the output itself, or a JSONL beside a
    Parquet output, converted when the run completes), and its manifest beside it."""

    def __init__(self, out: Path):
        self.out = out
        self.journal = journal_path(out)
        self.manifest_path = manifest_path(out)

    def exists(self) -> bool:
        return self.journal.exists() or self.out.exists()

    def clear(self) -> None:
        for path in (self.out, self.journal, self.manifest_path):
            path.unlink(missing_ok=True)

    def _aside(self):
        return overwrite_aside(self.out)

    def replace(self) -> None:
        """--overwrite: the old output moved aside (`aside.py`), kept until this run commits."""
        self._aside().take()

    def settle(self) -> None:
        """Finish what a killed run left half done; an overwrite that wrote no row gives the old output back."""
        self._aside().settle(self.is_empty)

    def manifest_text(self) -> str:
        return self.manifest_path.read_text(encoding="utf-8")

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def finished(self) -> bool:
        """A Parquet output already converted: nothing is left to append to."""
        return is_parquet(self.out) and self.out.exists() and not self.journal.exists()

    def done_rows(self, manifest: dict, console=None) -> Iterator[tuple[str, int, dict]]:
        """(file, line, row) for each row already written."""
        dropped = drop_partial_tail(self.journal) if self.journal.exists() else 0
        if dropped and console:
            console.print(f"dropped a half-written last line ({dropped} bytes) from {self.journal}", soft_wrap=True)
        source = self.journal if self.journal.exists() else self.out
        for line, row in iter_rows(source):
            yield str(source), line, row

    def rewrite(self, manifest: dict, rows: Iterable[dict]) -> None:
        """Replace the rows already written (read from the file being replaced, which stays whole until the
        new one is complete)."""
        source = self.journal if self.journal.exists() else self.out
        try:
            write_rows(rows, source, manifest.get("prediction_schema"))
        except OSError as exc:
            raise output_error(source, exc) from None

    def is_empty(self) -> bool:
        """No row written yet (nothing in the journal, no converted output)."""
        journal_empty = not self.journal.exists() or self.journal.stat().st_size == 0
        return journal_empty and (self.journal == self.out or not self.out.exists())

    def appender(self, manifest: dict) -> JsonlAppender:
        return JsonlAppender(self.journal)

    def finish(self, manifest: dict, complete: bool) -> None:
        """The run's end: complete, it commits (a Parquet output converted, an output it replaced deleted);
        either way the manifest gets the summary."""
        if complete and is_parquet(self.out):
            self._convert(manifest.get("prediction_schema"))
        if complete:
            aside = self._aside()
            try:
                aside.drop()
            except OSError as exc:
                raise output_error(aside.folder, exc) from None
        self.write_manifest(manifest)

    def _convert(self, prediction_schema=None) -> None:
        """The journal to Parquet (a temporary file renamed into place); the journal goes only once the Parquet
        file is whole, so a failure (disk full) loses nothing and --resume converts again."""
        import pyarrow as pa
        try:
            jsonl_to_parquet(self.journal, self.out, prediction_schema=prediction_schema)
        except (OSError, pa.ArrowException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
            raise OutputError(f"cannot write {self.out}: {reason}; the rows are kept in {self.journal} — fix it "
                              "and rerun with --resume to convert them") from None
        self.journal.unlink()
