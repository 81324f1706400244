"""An exclusive lock on a local output for a run's whole life: `flock` on `<output>.lock` beside it.

The kernel drops an flock when its holder's last descriptor closes, so a killed run (SIGKILL included) leaves
no stale lock: at most a stale lock *file*, which the next run takes over. The lock file holds the holder's
pid, for the message the second run gets. Releasing removes the file; a run that finds the file replaced
between opening and locking it (an earlier holder released and removed it meanwhile) opens it again, so two
runs can never each hold a lock on a different file of the same name.

Object-store outputs (s3://, gs://, az://) have no such lock: a store offers no lock a killed process releases.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from extractor.errors import ExtractorError, output_error


class OutputBusyError(ExtractorError):
    """Another run holds the lock on an output."""


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


class OutputLock:
    """`with OutputLock(path, "--out"):` holds the lock on `path` or raises OutputBusyError at once."""

    def __init__(self, target: Path, flag: str = "--out"):
        self.target, self.flag = target, flag
        self.path = lock_path(target)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while self.fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise OutputBusyError(f"{self.target} is being written by another extractor run (pid {holder}); "
                                      f"wait for it or choose another {self.flag}") from None
            if _same_file(fd, self.path):
                _write_pid(fd)
                self.fd = fd
            else:  # released and removed by its last holder after we opened it: take the current one
                os.close(fd)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise output_error(self.path, exc, resumable=False) from None

    def release(self) -> None:
        """Remove the lock file while still holding it (nobody else can have it), then let go."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)
        except OSError:  # a folder made read-only meanwhile: the lock still goes with the descriptor
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _write_pid(fd: int) -> None:
    """For the message a second run gets; the lock is the flock, so a full disk only costs the pid."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
