"""A model folder's weights read ahead: at the command's start its weight files are asked into the page cache,
in the background, while the process imports torch and transformers (2-3 s on a CPU box, 6-9 s on the GPU
machines measured). A folder not read since the machine started (a fresh machine, tonight's new checkpoint)
then loads from memory instead of from the disk.

Only a hint to the kernel (posix_fadvise WILLNEED, in a thread): nothing is copied into this process and
nothing can fail a run. Skipped where the weights would take more than half the memory the kernel says is
available (they would push each other out of the cache), where the platform has no posix_fadvise, and where
EXTRACTOR_READAHEAD=0.
"""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from extractor.backends.model_files import weight_files
from extractor.errors import ModelError

# One WILLNEED per 2 MB: Linux reads ahead at most a few MB per call (8 MB on this project's machine; a call
# for a whole 1 GB file read 8 MB of it), so the file is asked for in pieces.
CHUNK = 2 << 20
SHARE_OF_AVAILABLE = 0.5
OFF = "EXTRACTOR_READAHEAD"


def available_memory() -> int | None:
    """Bytes the kernel can hand out without swapping (MemAvailable); None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_ahead(folder: str | Path) -> threading.Thread | None:
    """Start reading `folder`'s weight files into the page cache; the thread doing it, or None where skipped
    (see the module's docstring). A folder the later checks refuse is skipped quietly: they say why."""
    if os.environ.get(OFF) == "0" or not hasattr(os, "posix_fadvise"):
        return None
    try:
        found = [(f, f.stat()) for f in weight_files(Path(folder))]
    except (OSError, ModelError):
        return None
    if not all(stat.S_ISREG(st.st_mode) for _, st in found):  # a FIFO would block its open; the checks refuse it
        return None
    files = [(f, st.st_size) for f, st in found]
    available = available_memory()
    if not files or available is None or sum(size for _, size in files) > available * SHARE_OF_AVAILABLE:
        return None
    thread = threading.Thread(target=_advise, args=(files,), name="weights-read-ahead", daemon=True)
    thread.start()
    return thread


def _advise(files: list[tuple[Path, int]]) -> None:
    for file, size in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            for offset in range(0, size, CHUNK):
                os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # a hint only: the load reads the file itself and reports what is wrong with it
        finally:
            os.close(fd)
