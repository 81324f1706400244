"""Stream corpora of any size (JSONL, JSONL.gz, Parquet, CSV) as batches of records, memory flat.

Local paths and object-store URIs (`locations.py`) alike: a URI streams through its filesystem in blocks.

A record is a dict: `id` (str), `line` (1-based line or row number, for error messages), `values` (the
task's input fields) and `row` (the whole source object, for --keep-field). Bad records fail fast with
file:line, or with on_bad="skip" go to a rejects file with the reason; they are never silently dropped.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from extractor import jsonutil

from extractor.store import locations
from extractor.errors import InputError, output_error

SEED_CONTEXT_FIELD = "context"  # the seed's {context, target} lines
SEED_TARGET_FIELD = "target"
DEFAULT_BATCH = 4096
_SKIP_HINT = "; fix the record or pass --on-bad-record skip to write bad records to a rejects file"


STDIN = "-"  # the corpus read from standard input (JSONL), once


def is_stdin(path) -> bool:
    return not locations.is_remote(path) and str(path) == STDIN


def corpus_format(path: locations.Location) -> str:
    if is_stdin(path):
        return "jsonl"
    name = path.name.lower()
    for suffix, fmt in ((".jsonl.gz", "jsonl"), (".ndjson.gz", "jsonl"), (".jsonl", "jsonl"),
                        (".ndjson", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return fmt
    raise InputError(f"{path}: unknown corpus format; use .jsonl, .jsonl.gz, .parquet or .csv")


def check_corpus(path: locations.Location) -> str:
    """The corpus's format, once it is known to be readable as one: a file (or object) of a known format, or a
    FIFO (a named pipe) holding JSONL, read as the stream it is. Anything else is one InputError line."""
    if locations.is_remote(path):
        if not locations.is_file(path):
            raise InputError(f"{path}: no such file; check the corpus path")
        return corpus_format(path)
    if is_stdin(path):
        return "jsonl"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the corpus path") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc}); check the corpus path") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, not a corpus file; give the file inside it")
    fmt = corpus_format(path)
    if stat.S_ISREG(mode):
        return fmt
    if stat.S_ISFIFO(mode) and fmt == "jsonl":
        return fmt
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket or device"
    raise InputError(f"{path}: is {kind}, not a regular file; a {fmt} corpus is read with seeks — save it to a "
                     "file first (only a JSONL corpus can come from a FIFO)")


def is_stream(path: locations.Location) -> bool:
    """A local corpus that can be read once only (a FIFO): no counting, hashing or second reader."""
    if locations.is_remote(path):
        return False
    if is_stdin(path):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


IDENTITY_BLOCK = 1 << 16


def corpus_identity(path: locations.Location) -> dict:
    """What tells this corpus from another one with the same ids (a resume's run key): the resolved path, the
    size and a hash of the first and last 64 KiB (a change in the middle that keeps the size is not seen; a
    full hash would read a 100 GB corpus once more per run). An object: its size and the store's ETag or
    checksum. A FIFO cannot be read twice: only its path, and `stream`."""
    if locations.is_remote(path):
        return locations.fingerprint(path)
    if is_stdin(path):
        return {"path": STDIN, "stream": True}
    real = os.path.realpath(path)
    if is_stream(path):
        return {"path": real, "stream": True}
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(fh.read(IDENTITY_BLOCK))
        if size > IDENTITY_BLOCK:
            fh.seek(max(IDENTITY_BLOCK, size - IDENTITY_BLOCK))
            digest.update(fh.read(IDENTITY_BLOCK))
    return {"path": real, "size": size, "hash": digest.hexdigest()}


@dataclass
class BadRecord(Exception):
    """One bad input record: where it is and what is wrong."""

    source: str
    line: int
    reason: str
    raw: str = ""
    record_id: str | None = None

    def message(self) -> str:
        rid = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.source}:{self.line}{rid}: {self.reason}{_SKIP_HINT}"


@dataclass
class ReadStats:
    records: int = 0
    rejected: int = 0
    fields: dict = field(default_factory=dict)  # field name -> count of records having it
    # field name -> [records where it is a string, their total characters, records where it is an integer]:
    # what `suggest_columns` picks a text and an id column from
    shapes: dict = field(default_factory=dict)

    def count_row(self, row: dict) -> None:
        fields, shapes = self.fields, self.shapes
        for key, value in row.items():
            fields[key] = fields.get(key, 0) + 1
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                shape = shapes.setdefault(key, [0, 0, 0])
                if isinstance(value, str):
                    shape[0] += 1
                    shape[1] += len(value)
                else:
                    shape[2] += 1


ID_NAMES = ("id", "uuid", "key", "guid", "doc_id", "record_id")


def suggest_columns(stats: ReadStats, exclude=()) -> tuple[str | None, str | None]:
    """The likely text column (the string column with the longest values on average, present in most rows)
    and id column (a name like `id` or `*_id`, holding strings or integers in every row it is in)."""
    seen = max(stats.fields.values(), default=0)
    text, best = None, 0.0
    for name, (strings, chars, _) in stats.shapes.items():
        if name in exclude or strings < seen / 2:
            continue
        mean = chars / strings
        if mean > best:
            text, best = name, mean
    ids = [name for name, (strings, _, ints) in stats.shapes.items()
           if name != text and strings + ints == stats.fields[name]
           and (str(name).lower() in ID_NAMES or str(name).lower().endswith(("_id", "id")))]
    ids.sort(key=lambda name: (str(name).lower() not in ID_NAMES, -stats.fields[name]))
    return text, ids[0] if ids else None


class RejectsWriter:
    """Appends one JSON line per rejected record: source, line, id, reason and the raw text.

    The lines gather in a new hidden file beside it, which `close` renames over the rejects file: a
    rejects file that was there stays whole until this pass's replaces it, and a pass that fails (`discard`)
    leaves it as it was. A pass with no rejects removes the old file: every pass reads the whole corpus and
    rebuilds its rejects, so the old lines are stale."""

    def __init__(self, path: locations.Location):
        self.path = path
        self._fh = None
        self._staging: str | None = None  # the local file this pass's lines gather in
        self.count = 0

    def write(self, bad: BadRecord) -> None:
        row = {"source": bad.source, "line": bad.line, "id": bad.record_id, "reason": bad.reason,
               "raw": bad.raw[:10_000]}
        try:
            if self._fh is None:
                self._fh = self._open()
            self._fh.write(jsonutil.dumps(row) + "\n")
            self._fh.flush()
        except OSError as exc:  # e.g. disk full: the old rejects file is untouched, the output's rows are kept
            self.discard()
            raise output_error(self.path, exc) from None
        self.count += 1

    def _open(self):
        if locations.is_remote(self.path):
            # An object cannot be appended to: the lines gather in a local file, uploaded on close. A killed run
            # loses them, and loses nothing: every pass reads the whole corpus and rebuilds its rejects.
            import tempfile
            return tempfile.TemporaryFile("w+", encoding="utf-8")
        import tempfile
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A new file of its own (O_EXCL): it can never be an existing file, an input included.
        fd, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self._staging = staging
        return open(fd, "w", encoding="utf-8")

    def close(self) -> None:
        """This pass's rejects become the rejects file (none: the old file is removed)."""
        if self._fh is None:
            locations.remove(self.path)
            return
        try:
            if locations.is_remote(self.path):
                self._fh.seek(0)
                locations.put(self.path, self._fh.read().encode("utf-8"))
                self._fh.close()
            else:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self._staging, self.path)
        except OSError as exc:
            self.discard()
            raise output_error(self.path, exc) from None
        self._fh = None

    def discard(self) -> None:
        """Drop this pass's lines; the rejects file stays as it was."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._staging is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._staging)
            self._staging = None


def id_key(record_id: str) -> int:
    """A 64-bit digest of an id: sets of these keep memory small for millions of ids."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "little")


def seed_passage(context: str) -> str:
    """The passage inside a seed context `Instruction: …\\nInput: <question>\\n\\n<passage>\\nAnswer: `."""
    body = context.split("\nInput: ", 1)[-1]
    body = body.rsplit("\nAnswer:", 1)[0]
    return body.split("\n\n", 1)[1] if "\n\n" in body else body


class CorpusReader:
    """Iterates batches of records from one corpus file, checking every record."""

    def __init__(self, path: str | locations.Location, input_fields=("text",), id_field: str = "id",
                 text_field: str | None = None, on_bad: str = "fail", rejects: RejectsWriter | None = None,
                 batch_size: int = DEFAULT_BATCH, check_duplicates: bool = True):
        self.path = locations.target(path)
        self.format = check_corpus(self.path)
        self.input_fields = list(input_fields)
        self.field_map = input_columns(self.input_fields, text_field)
        self.id_field = id_field
        self.on_bad = on_bad
        self.rejects = rejects
        self.batch_size = batch_size
        self.check_duplicates = check_duplicates
        self.stats = ReadStats()
        self._seen: set[int] = set()

    def __iter__(self) -> Iterator[list[dict]]:
        batch = []
        for item in self._rows():
            record = self._to_record(item)
            if record is None:
                continue
            batch.append(record)
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _to_record(self, item) -> dict | None:
        try:
            if isinstance(item, BadRecord):
                raise item
            line, row = item
            return self._check(line, row)
        except BadRecord as bad:
            self._reject(bad)
            return None

    def _reject(self, bad: BadRecord) -> None:
        if self.on_bad != "skip":
            raise InputError(bad.message())
        self.stats.rejected += 1
        if self.rejects is not None:
            self.rejects.write(bad)

    def _check(self, line: int, row) -> dict:
        src = str(self.path)
        if isinstance(row, dict):
            self.stats.count_row(row)
        try:
            record = check_record(row, self.field_map, self.id_field, line)
        except RecordProblem as problem:
            raise BadRecord(src, line, problem.reason, _raw(row), problem.record_id) from None
        if self.check_duplicates:
            key = id_key(record["id"])
            if key in self._seen:
                raise BadRecord(src, line, f"duplicate id '{record['id']}'; ids must be unique "
                                "(or drop the id field to number records by line)", _raw(row), record["id"])
            self._seen.add(key)
        self.stats.records += 1
        return record

    def _rows(self):
        if self.format == "jsonl":
            yield from iter_jsonl(self.path)
        elif self.format == "parquet":
            yield from _iter_table(self.path, "parquet", first_line=1)
        else:
            yield from _iter_table(self.path, "csv", first_line=2)  # line 1 is the header


def input_columns(input_fields, text_field: str | None = None) -> dict[str, str]:
    """Task input field -> corpus column: each its own name, except that --text-field renames the column
    feeding the first."""
    columns = {f: f for f in input_fields}
    if text_field:
        columns[list(input_fields)[0]] = text_field
    return columns


class RecordProblem(ValueError):
    """What is wrong with one source object as a record (and its id, when it has a usable one)."""

    def __init__(self, reason: str, record_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.record_id = record_id


def check_record(row, field_map: dict, id_field: str = "id", line: int = 0, ids_required: bool = False) -> dict:
    """The record checks, for every reader (`CorpusReader`, the Ray actors): a source object -> a record
    {id, line, values, row}, or RecordProblem. `field_map` maps each task input field to its column; without
    an id field the id is the line number, unless `ids_required` (a Ray read, which sees no line numbers)."""
    if not isinstance(row, dict):
        raise RecordProblem(f"expected a JSON object, got {type(row).__name__}")
    record_id = _record_id(row, id_field, line, ids_required)
    values = {}
    for task_field, column in field_map.items():
        value = row.get(column)
        if value is None and column == "text" and SEED_CONTEXT_FIELD in row:
            value = _seed_text(row, record_id)
        if value is None:
            raise RecordProblem(f"missing field '{column}' (fields present: {', '.join(map(str, row)) or 'none'}); "
                                "choose one with --text-field", record_id)
        if not isinstance(value, str):
            raise RecordProblem(f"field '{column}' must be a string, got {type(value).__name__}", record_id)
        values[task_field] = value
    return {"id": record_id, "line": line, "values": values, "row": row}


def _record_id(row: dict, id_field: str, line: int, ids_required: bool) -> str:
    value = row.get(id_field)
    if value is None:
        if ids_required:
            raise RecordProblem(f"missing id field '{id_field}' (a Ray run needs ids in the data)")
        return str(line)  # deterministic: the 1-based line (or row) number
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordProblem(f"id field '{id_field}' must be a string or integer, got {type(value).__name__}")
    return str(value)


def _seed_text(row: dict, record_id: str) -> str:
    context = row[SEED_CONTEXT_FIELD]
    if not isinstance(context, str):
        raise RecordProblem(f"field '{SEED_CONTEXT_FIELD}' must be a string", record_id)
    return seed_passage(context)


def _raw(row) -> str:
    try:
        return jsonutil.dumps(row)
    except (TypeError, ValueError):
        return repr(row)


def open_binary(path: locations.Location):
    if is_stdin(path):
        import sys
        return contextlib.nullcontext(sys.stdin.buffer)  # read, not closed: the process owns stdin
    if not path.name.lower().endswith(".gz"):
        return locations.open_read(path)
    if not locations.is_remote(path):
        return gzip.open(path, "rb")
    return _RemoteGzip(locations.open_read(path))


class _RemoteGzip(gzip.GzipFile):
    """gzip over an object's stream that closes the stream with itself (GzipFile leaves a given one open)."""

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def iter_jsonl(path: locations.Location):
    """Yields (line, object) or a BadRecord per non-blank line; a broken file raises InputError."""
    src = str(path)
    line = 0
    remote = locations.translated(path, "read") if locations.is_remote(path) else contextlib.nullcontext()
    try:
        with remote, open_binary(path) as fh:
            for line, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                yield _parse_line(src, line, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{src}:{line + 1}: compressed file is truncated or corrupt ({exc}); "
                         "re-download or re-compress it") from None


def _parse_line(src: str, line: int, raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(src, line, f"invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8",
                         raw[:200].decode("utf-8", "replace"))
    try:
        return line, jsonutil.loads(text)
    except (ValueError, RecursionError) as exc:
        return BadRecord(src, line, f"malformed JSON ({str(exc).splitlines()[0][:120]})", text.strip()[:10_000])


def _iter_table(path: locations.Location, fmt: str, first_line: int):
    if locations.is_remote(path):
        yield from _iter_remote_table(path, fmt, first_line)
        return
    import polars as pl
    try:
        if fmt == "parquet":
            frame = pl.scan_parquet(path)
        else:
            frame = pl.scan_csv(path, infer_schema=False)
        line = first_line
        for chunk in frame.collect_batches(chunk_size=DEFAULT_BATCH):
            for row in chunk.iter_rows(named=True):
                yield line, row
                line += 1
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read {fmt} ({first[:200]}); check the file is a valid {fmt} file") \
            from None


def _iter_remote_table(path: locations.Remote, fmt: str, first_line: int):
    """Parquet row groups or CSV blocks streamed from the store with pyarrow (polars reads local files only
    through its own cloud client, with other credentials rules). CSV columns stay text, as the local reader
    reads them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    line = first_line
    with locations.translated(path, "read"), locations.open_read(path) as fh:
        try:
            if fmt == "parquet":
                batches = pq.ParquetFile(fh).iter_batches(batch_size=DEFAULT_BATCH)
            else:
                import csv
                import io
                text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
                header = next(csv.reader(text), [])
                text.detach()  # leaves fh open for the reader below
                fh.seek(0)
                batches = pacsv.open_csv(fh, convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=True,
                    null_values=[""]))
            for batch in batches:
                for row in batch.to_pylist():
                    yield line, row
                    line += 1
        except (pa.ArrowException, UnicodeDecodeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{path}: cannot read {fmt} ({first[:200]}); check the file is a valid {fmt} "
                             "file") from None


def count_records(path: locations.Location) -> int | None:
    """Total records when cheap to know (Parquet metadata, uncompressed local JSONL line count)."""
    fmt = corpus_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            with locations.open_read(path) as fh:
                return pq.ParquetFile(fh).metadata.num_rows
        except Exception:  # noqa: BLE001 - a broken file is reported by the reader itself
            return None
    if locations.is_remote(path) or is_stream(path):
        return None  # counting lines would read the whole object once more (a FIFO: its only reading)
    if fmt == "jsonl" and not path.name.endswith(".gz"):
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return None
