"""The rejects file of a corpus read with --on-bad-record skip: one JSON line per bad record."""
from __future__ import annotations

import contextlib
import os
import tempfile

from extractor import jsonutil
from extractor.errors import output_error
from extractor.store import locations
from extractor.store.records import BadRecord


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
            return tempfile.TemporaryFile("w+", encoding="utf-8")
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
