"""A run's hold on the files it writes, for the run's whole life: each local output (and an explicit
--rejects) locked (`locks.py`), so a second run on it is refused at once; and, when the run fails before its
first row, what it created (an empty output, its manifest) removed again, so that the corrected rerun is not
told the output "already exists". A file that was there before the run is never removed."""
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
        """Outputs this run created and wrote no row to: gone again (best effort: the run's own error is the
        one to report)."""
        from extractor.pipeline.run import output_store
        for out in self.fresh:
            with contextlib.suppress(Exception):
                store = output_store(out)
                if store.is_empty():
                    store.clear()


def _anything_there(out: Location) -> bool:
    from extractor.pipeline.run import output_store
    return output_store(out).exists() or locations.exists(manifest_path(out))
