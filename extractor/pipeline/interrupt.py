"""Ctrl-C during a run: the first stops taking new records (what is in flight drains and is written), a second
stops at once. Its own object so that one handler can serve every output a single pass fills."""
from __future__ import annotations

import signal
import sys

NOTICE = "Ctrl-C: stopping after the records in flight (again to stop now); rerun with --resume to continue"


class CtrlC:
    """SIGINT while entered: `requested` turns True at the first, KeyboardInterrupt at the second."""

    def __init__(self, console=None):
        self.console = console
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> bool:
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
