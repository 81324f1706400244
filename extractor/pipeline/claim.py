"""A run's hold on the files it writes, for the run's whole life: each local output (and an explicit
--rejects) locked (`locks.py`), so a second run on it is refused at once; and, when the run fails before its
first row, what it created (an empty output, its manifest) removed again, so that the corrected rerun is not
told the output "already exists", and an output it was to replace (--overwrite) put back. A file that was there
before the run is never removed."""
from __future__ import annotations

import contextlib

from extractor.store import locations
from extractor.store.locks import OutputLock
from extractor.store.provenance import manifest_path
from extractor.store.locations import Location


class Claim:
    """`with Claim(outputs, locked=[(path, flag), ...]):` around everything a run does with `outputs`."""

    def __init__(self, outputs: list[Location], locked: list[tuple[Location, str]]):
        self.outputs = outputs
        self.locked = locked
        self.fresh: list[Location] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Claim":
        try:
            seen = set()
            for path, flag in self.locked:
                if not locations.is_remote(path) and str(path) not in seen:  # a store has no lock (locks.py)
                    seen.add(str(path))
                    self._stack.enter_context(OutputLock(path, flag))
            for out in self.outputs:  # locked: finish what a killed run left half done (store/aside.py)
                _store(out).settle()
            self.fresh = [out for out in self.outputs if not _anything_there(out)]
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not issubclass(exc_type, SystemExit):
                self._remove_unwritten()
        finally:
            self._stack.close()

    def _remove_unwritten(self) -> None:
        """Outputs this run created and wrote no row to: gone again; outputs it was to replace and wrote no row
        to: back as they were (best effort: the run's own error is the one to report)."""
        for out in self.outputs:
            with contextlib.suppress(Exception):
                store = _store(out)
                if out in self.fresh and store.is_empty():
                    store.clear()
                store.settle()


def _store(out: Location):
    from extractor.pipeline.run import output_store
    return output_store(out)


def _anything_there(out: Location) -> bool:
    return _store(out).exists() or locations.exists(manifest_path(out))
