"""Weights read ahead (backends/readahead.py): a folder's weight files come into the page cache in the background,
checked by what the kernel says this process read from the disk (/proc/self/io)."""
import json
import os
from pathlib import Path

import pytest

from extractor.backends.readahead import OFF, available_memory, read_ahead

IO = Path("/proc/self/io")
pytestmark = pytest.mark.skipif(not IO.exists() or not hasattr(os, "posix_fadvise"),
                                reason="needs Linux's /proc/self/io and posix_fadvise")


def disk_reads() -> int:
    """Bytes this process has had read from storage (page-cache hits do not count)."""
    return int(next(line for line in IO.read_text().splitlines() if line.startswith("read_bytes")).split()[1])


def evict(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages first, or the kernel keeps them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(file: Path) -> int:
    """Bytes read from the disk while reading `file` through."""
    before = disk_reads()
    with file.open("rb", buffering=0) as f:
        while f.read(1 << 22):
            pass
    return disk_reads() - before


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(32 << 20))
    return tmp_path


def test_weights_come_from_memory_after_reading_ahead(folder):
    weights = folder / "model.safetensors"
    evict(weights)
    if read_all(weights) < (16 << 20):
        pytest.skip("this filesystem keeps the file in memory whatever is asked (tmpfs?)")
    evict(weights)
    thread = read_ahead(folder)
    assert thread is not None and thread.daemon
    thread.join(30)
    assert read_all(weights) < (2 << 20)  # the pages were asked for ahead: at most what was still in flight


def test_skipped_when_turned_off(folder, monkeypatch):
    monkeypatch.setenv(OFF, "0")
    assert read_ahead(folder) is None


def test_skipped_when_the_weights_would_crowd_memory(tmp_path):
    available = available_memory()
    assert available and available > 0
    with (tmp_path / "model.safetensors").open("wb") as f:  # sparse: a size, no data
        f.truncate(available)
    assert read_ahead(tmp_path) is None


def test_a_folder_the_checks_will_refuse_is_skipped_quietly(tmp_path):
    assert read_ahead(tmp_path / "missing") is None
    assert read_ahead(tmp_path) is None  # no weight files
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere"}}))
    assert read_ahead(tmp_path) is None  # an index naming a shard outside the folder
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    assert read_ahead(tmp_path) is None
    (tmp_path / "model.safetensors.index.json").unlink()
    os.mkfifo(tmp_path / "model-00001.safetensors")  # opening it to read would wait for a writer forever
    assert read_ahead(tmp_path) is None
