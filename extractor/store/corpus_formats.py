"""The readers of each corpus format, local or from an object store: JSONL (plain or gzip, standard input
included) line by line, Parquet and CSV in blocks. Each yields (line, source object), or a BadRecord for a
line that is no JSON; a file broken as a whole (truncated gzip, invalid Parquet) is one InputError."""
from __future__ import annotations

import contextlib
import gzip
import zlib

from extractor import jsonutil
from extractor.errors import InputError
from extractor.store import locations
from extractor.store.corpus_path import is_stdin
from extractor.store.records import BadRecord

BLOCK_ROWS = 4096  # rows per block read from a Parquet or CSV file


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


def iter_table(path: locations.Location, fmt: str, first_line: int):
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
        for chunk in frame.collect_batches(chunk_size=BLOCK_ROWS):
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
                batches = pq.ParquetFile(fh).iter_batches(batch_size=BLOCK_ROWS)
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
