"""Refuse, before any work, a file a command would write that is one of its own inputs.

Inputs include the task's own files (task file, schema, referenced schemas), wherever --tasks-dir put them.
A file is known as the operating system knows it: by its resolved path (symlinks, `./x` and `x`, `..`) and,
where it exists, by device and inode (a hard link has another path but the same inode). A run writes more than
its `--out`: the manifest, the Parquet journal, the lock and the temporary files beside each, and the rejects
file; every one of them is checked, so that `--out corpus` with a Parquet journal named like the corpus is
caught as surely as `--out corpus.jsonl` itself.
"""
from __future__ import annotations

import os
from pathlib import Path

from extractor.store import locations
from extractor.errors import InputError

MAX_FOLDER_FILES = 10_000  # a model folder is a few dozen files; a huge tree is not walked whole


class FileSet:
    """Labelled files, found again by path or by inode."""

    def __init__(self):
        self.paths: dict[str, str] = {}
        self.inodes: dict[tuple[int, int], str] = {}

    def add(self, label: str, location: locations.Location) -> None:
        key = _path_key(location)
        self.paths.setdefault(key, label)
        node = _inode(location)
        if node is not None:
            self.inodes.setdefault(node, label)

    def add_folder(self, label: str, folder: Path) -> None:
        """Every file under a folder (a model's weights, tokenizer and config)."""
        for count, path in enumerate(folder.rglob("*")):
            if count >= MAX_FOLDER_FILES:
                return
            if path.is_file():
                self.add(f"{label} ({path.name})", path)

    def find(self, location: locations.Location) -> str | None:
        label = self.paths.get(_path_key(location))
        if label is not None:
            return label
        node = _inode(location)
        return self.inodes.get(node) if node is not None else None


def task_files(task) -> list[tuple[str, Path]]:
    """A loaded task's files, each with its label: the task file, its schema, and every schema file the schema
    references (the registry's file URIs; all inside the task folder). Templates live in the task file."""
    from urllib.parse import unquote, urlsplit
    found = [(f"the task file of --task {task.name} ({task.prompt_path})", Path(task.prompt_path)),
             (f"the schema of --task {task.name} ({task.schema_path})", Path(task.schema_path))]
    for uri in task.registry.registry:
        parts = urlsplit(uri)
        if parts.scheme == "file" and parts.netloc in ("", "localhost"):
            path = Path(unquote(parts.path))
            if path.is_file():
                found.append((f"a schema file of --task {task.name} ({path})", path))
    return found


def written_beside(out: locations.Location) -> list[tuple[str, locations.Location]]:
    """What a run writes for the output `out`, besides `out` itself."""
    from extractor.store.locks import lock_path
    from extractor.store.provenance import manifest_path
    from extractor.store.writers import journal_path, overwrite_aside
    manifest = manifest_path(out)
    found = [("manifest", manifest), ("manifest's temporary file", manifest.with_name(manifest.name + ".tmp")),
             ("temporary file", out.with_name(out.name + ".tmp")),
             ("write probe", out.with_name(f".{out.name}.probe"))]
    if not locations.is_remote(out):
        found.append(("lock file", lock_path(out)))
        journal = journal_path(out)
        if journal != out:
            found.append(("journal", journal))
        aside = overwrite_aside(out)  # what --overwrite keeps, then deletes at the commit
        found += [("copy kept aside by --overwrite", aside.folder / path.name) for path in aside.paths]
    return found


def rejects_written(rejects: locations.Location) -> list[tuple[str, locations.Location]]:
    """Besides the rejects file, its lock (its lines gather in a new file of a name of its own)."""
    from extractor.store.locks import lock_path
    return [] if locations.is_remote(rejects) else [("lock file", lock_path(rejects))]


def refuse_overlaps(writes: list[tuple[str, locations.Location, list]], inputs: FileSet) -> None:
    """`writes`: (flag, path, [(what, derived path)]) for each file a command writes. InputError when one is
    an input, or when two of them are the same file."""
    written = FileSet()
    for flag, path, beside in writes:
        for what, location in [(None, path), *beside]:
            clash = inputs.find(location) or written.find(location)
            if clash is not None:
                where = f"{flag} {path}" if what is None else f"{flag} {path}: its {what} {location}"
                raise InputError(f"{where} is {clash}; the run would overwrite it — choose another {flag}")
        written.add(f"the {flag} file {path}", path)
        for what, location in beside:
            written.add(f"the {what} of {flag} {path}", location)


def refuse_overwriting_inputs(outputs: dict[str, locations.Location], inputs: dict[str, locations.Location],
                              task=None) -> None:
    """eval, compare, validate: refuse, before anything is written, an output that is one of the inputs (the
    task's files included)."""
    known = FileSet()
    for name, path in inputs.items():
        known.add(f"the {name} file {path}", path)
    for label, path in task_files(task) if task is not None else ():
        known.add(label, path)
    for name, out in outputs.items():
        clash = known.find(out)
        if clash is not None:
            raise InputError(f"{name} {out}: is {clash}; writing there would destroy it — choose another path")


def _path_key(location: locations.Location) -> str:
    if locations.is_remote(location):
        return "remote:" + str(location).rstrip("/")
    return os.path.realpath(location)


def _inode(location: locations.Location) -> tuple[int, int] | None:
    if locations.is_remote(location):
        return None
    try:
        st = os.stat(location)
    except OSError:
        return None
    return st.st_dev, st.st_ino
