"""`--overwrite` without losing the output it replaces until the new run has one to show.

When an overwriting run starts, the old output's files (the output, its journal, its manifest) are moved into
a hidden folder beside them, `.<output>.replaced/`; the new run writes in their place. When the new run
completes (commits), the folder is deleted. When it ends having written no row (an error, Ctrl-C, or a kill
found by the next run), the old files are put back exactly as they were. A run that wrote rows and then
failed stays resumable, and the old files stay aside until a run of that output commits: a second
`--overwrite` replaces the unfinished output, never the old one kept aside.

Every step is a rename, and the folder's name says which step a kill interrupted, so the next run finishes
or undoes it (`settle`): `.replaced.tmp` (being moved aside: moved back), `.replaced` (aside: put back if the
new output holds no row), `.replaced.restoring` (being put back: finished), `.replaced.dropped` (being
deleted at the commit: finished). Object-store outputs are not moved aside (`parts.PartsOutput`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from extractor.errors import output_error

STATES = ("tmp", "restoring", "dropped")


class Aside:
    """The files of one local output, `paths` (the output first), and the folder they are moved aside to."""

    def __init__(self, paths: list[Path]):
        self.paths = list(dict.fromkeys(paths))  # a JSONL output is its own journal
        out = self.paths[0]
        self.folder = out.with_name(f".{out.name}.replaced")

    def _state(self, name: str) -> Path:
        return self.folder.with_name(f"{self.folder.name}.{name}")

    def held(self) -> bool:
        """Old files are aside (an overwrite has not committed yet)."""
        return self.folder.is_dir()

    def take(self) -> None:
        """Start an overwrite: the old files aside. Where old files are aside already (an overwrite that never
        committed), those are the last committed output: they stay, and the unfinished output goes."""
        try:
            if self.held():
                for path in self.paths:
                    path.unlink(missing_ok=True)
                return
            present = [p for p in self.paths if p.exists()]
            if not present:
                return
            staging = self._state("tmp")
            staging.mkdir(exist_ok=True)
            for path in present:
                os.replace(path, staging / path.name)
            os.replace(staging, self.folder)
        except OSError as exc:
            self.settle(lambda: False)  # a move cut short: the old files back where they were
            raise output_error(self.paths[0], exc, resumable=False) from None

    def put_back(self) -> None:
        """The old files back in place; the new run's files (which hold no row) go."""
        if not self.held():
            return
        for path in self.paths:  # new files the old output had no counterpart of
            if not (self.folder / path.name).exists():
                path.unlink(missing_ok=True)
        restoring = self._state("restoring")
        os.replace(self.folder, restoring)
        self._move_back(restoring)

    def drop(self) -> None:
        """The overwrite committed: the old files are deleted."""
        if not self.held():
            return
        dropped = self._state("dropped")
        os.replace(self.folder, dropped)
        self._delete(dropped)

    def settle(self, unwritten) -> None:
        """Finish or undo what a killed run left half done; put the old files back when `unwritten()` says the
        new output holds no row. Best effort: a folder that cannot be changed now is settled next time."""
        with contextlib.suppress(OSError):
            if self._state("tmp").is_dir():
                self._move_back(self._state("tmp"))
            if self._state("restoring").is_dir():
                self._move_back(self._state("restoring"))
            if self._state("dropped").is_dir():
                self._delete(self._state("dropped"))
            if self.held() and unwritten():
                self.put_back()

    def _move_back(self, folder: Path) -> None:
        for path in self.paths:
            kept = folder / path.name
            if kept.exists():
                os.replace(kept, path)
        folder.rmdir()

    def _delete(self, folder: Path) -> None:
        for path in self.paths:
            (folder / path.name).unlink(missing_ok=True)
        folder.rmdir()
