"""Hugging Face hub ids (`ORG/NAME[@revision]`) resolved offline, through the local cache.

vLLM, lm-eval and transformers users type hub ids; nothing here touches the network. The cache is read
as huggingface_hub lays it out: `<cache>/models--ORG--NAME/refs/<revision>` holds a commit hash and
`snapshots/<commit>/` the files. The cache folder is found as huggingface_hub finds it: HF_HUB_CACHE, else
HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. An existing local path
always wins over a hub id of the same spelling. Resolution happens in the CLI, before a backend is built:
backends only ever see local folders.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from extractor.errors import ModelError
from extractor.plugins import backend_class

# ORG/NAME as the hub allows them, then an optional @revision (a branch, tag or commit hash).
HUB_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubSource:
    """Where a hub id led: for the run manifest."""
    id: str
    revision: str
    commit: str
    snapshot: str

    def as_dict(self) -> dict:
        return {"id": self.id, "revision": self.revision, "commit": self.commit, "snapshot": self.snapshot}


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve(spec: str, what: str = "model") -> tuple[str, HubSource | None]:
    """A local folder as given (and None), or a cached hub id's snapshot folder and where it came from.
    Anything that is neither a local path nor shaped like a hub id is returned as given: the backend then
    reports the missing folder in its own words."""
    match = HUB_ID.match(spec)
    if Path(spec).exists() or match is None:
        return spec, None
    repo_id, revision = f"{match['org']}/{match['name']}", match["revision"] or "main"
    repo = cache_dir() / f"models--{match['org']}--{match['name']}"
    commit = _commit(repo, revision)
    if commit is None:
        raise ModelError(f"{what} '{spec}' is not a local folder, and {repo_id} at revision {revision} is not in "
                         f"the Hugging Face cache ({cache_dir()}); nothing is downloaded here: fetch it where "
                         f"there is network (hf download {repo_id} --revision {revision}) and copy the cache "
                         "folder here, or set HF_HUB_CACHE / HF_HOME to it")
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise ModelError(f"{what} '{spec}': the cache says revision {revision} is commit {commit}, but "
                         f"{snapshot} is missing; the download is incomplete — fetch it again")
    return str(snapshot), HubSource(repo_id, revision, commit, str(snapshot))


def _commit(repo: Path, revision: str) -> str | None:
    """The commit a revision names in the cache: a ref's file (branch, tag, refs/pr/N), or a commit hash
    (full, or an unambiguous prefix of at least 7) with a snapshot."""
    if any(part in ("", ".", "..") for part in revision.split("/")):
        return None  # a revision never climbs out of the repo's folder
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        return commit if COMMIT.match(commit) else None
    snapshots = repo / "snapshots"
    if COMMIT.match(revision) and (snapshots / revision).is_dir():
        return revision
    if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision) and snapshots.is_dir():
        found = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        if len(found) == 1:
            return found[0]
    return None


@dataclass(frozen=True)
class RunSources:
    """`run`'s --model and --adapter values as local folders, and where hub ids led (for the manifest)."""
    model: str
    adapters: tuple[str, ...]
    adapter_labels: dict  # a hub adapter's resolved folder name (its commit) -> the NAME of ORG/NAME
    hub: dict | None

    @classmethod
    def resolve(cls, model: str, adapters, backend: str) -> "RunSources":
        if backend_class(backend).model_source != "folder":  # a gold file (echo); served names (openai)
            return cls(model, tuple(adapters), {}, None)
        path, source = resolve(model)
        hub: dict = {"model": source.as_dict()} if source else {}
        folders, labels = [], {}
        for spec in adapters:
            folder, src = resolve(spec, "adapter")
            folders.append(folder)
            if src is not None:
                hub.setdefault("adapters", []).append(src.as_dict())
                labels[Path(folder).name] = src.id.split("/")[1]
        return cls(path, tuple(folders), labels, hub or None)
