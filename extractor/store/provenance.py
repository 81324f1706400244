"""Provenance for every result file: package version, git commit, time, host."""
from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from extractor import __version__

from extractor.store import locations


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from, when it is one."""
    root = Path(__file__).resolve().parents[2]  # the checkout holding the extractor package
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def stamp() -> dict:
    return {"package_version": __version__, "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version()}


def manifest_path(output: locations.Location) -> locations.Location:
    return output.with_name(output.name + ".manifest.json")


def read_manifest(output: locations.Location) -> dict | None:
    """The manifest beside a predictions file, or None when there is none or it is unreadable."""
    path = manifest_path(output)
    try:
        return json.loads(locations.read_text(path))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: locations.Location, obj) -> None:
    """Write to a temporary file, then rename: a reader sees the old or the new file, never half of one.
    An object store replaces an object in one request, which is as atomic."""
    from extractor.errors import output_error
    if locations.is_remote(path):
        locations.put(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(path, exc) from None


def check_writable(path: locations.Location) -> None:
    """Fail before loading a model when the output folder (or bucket) cannot be written."""
    from extractor.errors import output_error
    if locations.is_remote(path):
        locations.check_writable(path)
        return
    probe = path.with_name(f".{path.name}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise output_error(path.parent, exc, resumable=False) from None
