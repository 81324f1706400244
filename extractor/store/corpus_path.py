"""What a corpus path is, before any record is read: its format (by name), whether it can be read as one
(a file, an object, or a FIFO of JSONL), whether it can be read once only (standard input, a FIFO), what tells
it from another corpus with the same ids, and how many records it holds when that is cheap to know."""
from __future__ import annotations

import hashlib
import os
import stat

from extractor.errors import InputError
from extractor.store import locations

STDIN = "-"  # the corpus read from standard input (JSONL), once
IDENTITY_BLOCK = 1 << 16


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
