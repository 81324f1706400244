"""The rejects file of a corpus read with --on-bad-record skip: one JSON line per bad record."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from pathlib import Path

from extractor import jsonutil
from extractor.errors import output_error
from extractor.store import locations
from extractor.store.records import BadRecord


class RejectsWriter:
    """Appends one JSON line per rejected record: source, line, id, reason and the raw text.

    The lines gather in a new hidden file beside it, which `close` renames over the rejects file: a
    rejects file that was there stays whole until this pass's replaces it, and a pass that fails (`discard`)
    leaves it as it was. A pass with no rejects removes the old file: every pass reads the whole corpus and
    rebuilds its rejects, so the old lines are stale.

    The hidden file is `.<rejects name>.<8 random characters>.partial`, held under an flock while its pass
    writes it (`--gpus` workers each write their own beside one rejects file). A killed pass leaves its file
    behind, unlocked: the next pass on that rejects file deletes it (`remove_stale`) before it starts."""

    def __init__(self, path: locations.Location):
        self.path = path
        self._fh = None
        self._staging: str | None = None  # the local file this pass's lines gather in
        self.count = 0
        if not locations.is_remote(path):
            remove_stale(path)

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
            return tempfile.TemporaryFile("w+", encoding="utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            # A new file of its own (O_EXCL): it can never be an existing file, an input included. Locked for this
            # pass's life; one a stale-file sweep locked and removed between its creation and our lock is made anew.
            fd, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=PARTIAL, dir=self.path.parent)
            if _lock(fd) and _same_file(fd, staging):
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # mkstemp's 0600: the rejects file gets the mode any new file gets
            os.fchmod(fd, 0o666 & ~_umask())
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
                os.replace(self._staging, self.path)  # still locked: no sweep can take it first
                self._fh.close()
        except OSError as exc:
            self.discard()
            raise output_error(self.path, exc) from None
        self._fh = self._staging = None

    def discard(self) -> None:
        """Drop this pass's lines; the rejects file stays as it was."""
        if self._staging is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._staging)
            self._staging = None
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


PARTIAL = ".partial"
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile's names


def staging_files(path: Path) -> list[Path]:
    """The hidden files passes on the rejects file `path` gather their lines in."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if n.startswith(prefix) and n.endswith(PARTIAL)
            and _RANDOM.fullmatch(n[len(prefix):-len(PARTIAL)])]


def remove_stale(path: Path) -> int:
    """Delete the hidden files of killed passes on `path` (no live pass holds their lock); returns how many."""
    removed = 0
    for staging in staging_files(path):
        try:
            fd = os.open(staging, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if _lock(fd) and _same_file(fd, staging):
                os.unlink(staging)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)  # the lock goes with it
    return removed


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _umask() -> int:
    """This process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
