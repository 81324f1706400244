"""Exactly-once output on an object store, which cannot append: one part object per window, then a commit.

While a run goes, each window of rows is one object `<out>.parts/part-NNNNNNNN.jsonl`, put in one request
(so it is whole or absent; a kill cannot tear it). The manifest beside the output says which of two states
holds, and with it where the rows are:

- not committed: the parts are the rows; an output object, if any, is stale and is rewritten at commit;
- committed: the output object is the rows; any parts are leftovers of a cut-short step and are deleted.

Commit (the run completed): write the output from the parts in order (an upload the store shows only once
complete) → manifest says committed → delete the parts. A `--resume` that finds more to do after a commit
first copies the output into part 0, then says not committed in the manifest, and goes on from part 1. A
kill between any two steps leaves one of the two states, each with every row exactly once.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from extractor import jsonutil

from extractor.store import locations
from extractor.errors import ManifestError
from extractor.store.provenance import manifest_path, write_json_atomic
from extractor.store.writers import iter_rows, write_jsonl, write_rows

_PART = re.compile(r"^part-(\d{8})\.jsonl$")


class PartsOutput:
    """The object-store counterpart of writers.JournalOutput (same methods, same meaning)."""

    def __init__(self, out: locations.Remote):
        self.out = out
        self.folder = out.with_name(out.name + ".parts")
        self.manifest_path = manifest_path(out)
        self._next = 0

    def exists(self) -> bool:
        return locations.exists(self.out) or bool(self._parts())

    def clear(self) -> None:
        for part in self._parts():
            locations.remove(part)
        locations.remove(self.out)
        locations.remove(self.manifest_path)

    def replace(self) -> None:
        """--overwrite: an object store's output is cleared, not moved aside (a move is a copy of every object)."""
        self.clear()

    def settle(self) -> None:
        pass  # nothing is moved aside in a store

    def manifest_text(self) -> str:
        return locations.read_text(self.manifest_path)

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def finished(self) -> bool:
        return False  # a committed output can still be continued (part 0 takes its rows)

    def done_rows(self, manifest: dict, console=None) -> Iterator[tuple[str, int, dict]]:
        """(object, line, row) for each row already written."""
        parts = self._parts()
        if manifest.get("committed"):
            if not locations.exists(self.out):
                raise ManifestError(f"{self.manifest_path} says the run was committed, but {self.out} is gone; "
                                    "use --overwrite to start over")
            for part in parts:  # leftovers: parts already in the output, or a part 0 not yet taken over
                locations.remove(part)
            self._next = 0
            for line, row in iter_rows(self.out):
                yield str(self.out), line, row
            return
        self._next = _number(parts[-1]) + 1 if parts else 0
        for part in parts:
            for line, row in iter_rows(part):
                yield str(part), line, row

    def rewrite(self, manifest: dict, rows: Iterable[dict]) -> None:
        """Replace the rows already written: committed as the output object (the parts, if any, deleted
        after the manifest says so), which a --resume then continues from part 0 as after any commit."""
        self._commit(manifest, list(rows), self._parts())  # rows read whole before the output is replaced
        self._next = 0

    def is_empty(self) -> bool:
        return not self._parts() and not locations.exists(self.out)

    def appender(self, manifest: dict) -> "PartWriter":
        return PartWriter(self, manifest)

    def finish(self, manifest: dict, complete: bool) -> None:
        parts = self._parts()
        if not complete or (manifest.get("committed") and not parts):
            self.write_manifest(manifest)
            return
        self._commit(manifest, (row for part in parts for _, row in iter_rows(part)), parts)

    def _commit(self, manifest: dict, rows: Iterable[dict], parts: list) -> None:
        """The rows as the output object, then the manifest says committed, then the parts go (in this order:
        a kill at any point leaves one of the two states a resume knows)."""
        write_rows(rows, self.out, manifest.get("prediction_schema"))
        manifest["committed"] = True
        self.write_manifest(manifest)
        for part in parts:
            locations.remove(part)

    def uncommit(self, manifest: dict) -> None:
        """More rows for a committed output: its rows become part 0, then the parts are the rows again."""
        write_jsonl((row for _, row in iter_rows(self.out)), self._part(0))
        manifest["committed"] = False
        self.write_manifest(manifest)
        self._next = 1

    def put_part(self, rows: list[dict]) -> None:
        data = "".join(jsonutil.dumps(r) + "\n" for r in rows).encode("utf-8")
        locations.put(self._part(self._next), data)
        self._next += 1

    def _part(self, n: int) -> locations.Remote:
        return self.folder.child(f"part-{n:08d}.jsonl")

    def _parts(self) -> list[locations.Remote]:
        parts = [p for p in locations.listing(self.folder) if _PART.match(p.name)]
        return sorted(parts, key=_number)


class PartWriter:
    """`write_batch` as JsonlAppender's: one window's rows, durable when it returns."""

    def __init__(self, output: PartsOutput, manifest: dict):
        self.output, self.manifest = output, manifest

    def write_batch(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.manifest.get("committed"):
            self.output.uncommit(self.manifest)
        self.output.put_part(rows)

    def close(self) -> None:
        pass


def _number(part: locations.Remote) -> int:
    return int(_PART.match(part.name).group(1))
