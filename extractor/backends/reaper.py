"""Engine processes that must not outlive the process that started them.

vLLM runs its engine core (and that core's GPU workers) in child processes. When `extractor run` is killed
with SIGKILL (a batch scheduler, the OOM killer, `kill -9`), nothing in the run gets to shut them down: seen on
an H200, the orphaned engine core kept 129 GiB of GPU memory, and the `--resume` that followed could not
start its own engine. `reap_on_exit()` starts a small watcher in its own session (a Ctrl-C in the terminal
does not reach it) that holds the read end of a pipe whose write end only this process holds: the pipe
closes when this process ends, however it ends, and the watcher then kills the processes it was handed —
each one only if it is still the same process (its start time is checked, so a reused pid is left alone).
Linux only (/proc); elsewhere nothing is watched.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The watcher: pids and start times on its first line, then wait for end of file (the parent is gone).
_WATCHER = r"""
import os, signal, sys
line = sys.stdin.readline()
sys.stdin.read()
for item in line.split():
    pid, start = item.split(":")
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[19] == start:
                os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (children, their children, ...) with its start time."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
                starts[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        if child in starts and child not in found:
            found[child] = starts[child]
            todo += parents.get(child, [])
    return found


def reap_on_exit() -> subprocess.Popen | None:
    """Kill this process's current descendants once it ends (call it after the engine has started them).
    Returns the watcher (None where there is nothing to watch, or no /proc)."""
    if not Path("/proc/self/stat").exists():
        return None
    children = descendants(os.getpid())
    if not children:
        return None
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER], stdin=subprocess.PIPE, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    watcher.stdin.write(" ".join(f"{pid}:{start}" for pid, start in children.items()) + "\n")
    watcher.stdin.flush()  # the pipe stays open, unread, until this process ends
    return watcher
