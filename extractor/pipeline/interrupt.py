"""Ctrl-C during a run: the first stops the run after the backend's current step (rows finished so far are
written; the rest is redone by --resume), a second stops at once. Its own object so that one handler can serve
every output a single pass fills.

SIGINT is process-wide, and so is its request: `stop_requested` is what the generation stream looks at
(`lanes.stream_lanes`), however many outputs share it. A backend may have pulled far more requests than one
window (hf's fast path keeps its slots full), so waiting for what is in flight could take as long as the run."""
from __future__ import annotations

import signal
import sys

NOTICE = ("Ctrl-C: stopping after the current step, keeping the rows finished so far (again to stop at once); "
          "rerun with --resume to continue")
_ACTIVE: list["CtrlC"] = []  # the handlers in force


def stop_requested() -> bool:
    """Whether Ctrl-C has been pressed during the run in force."""
    return any(c.requested for c in _ACTIVE)


class CtrlC:
    """SIGINT while entered: `requested` turns True at the first, KeyboardInterrupt at the second."""

    def __init__(self, console=None):
        self.console = console
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self)
        signal.signal(signal.SIGINT, self._previous)
        return False

    def _on_sigint(self, *_) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        # Said even under --quiet (like an error): the run is about to end early, and how to continue.
        if self.console is not None and not self.console.quiet:
            self.console.print(NOTICE, highlight=False)
        else:
            print(NOTICE, file=sys.stderr, flush=True)
