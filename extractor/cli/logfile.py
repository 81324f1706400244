"""`--log-file PATH`: every line the process writes to stderr is also appended to PATH.

Progress bars redraw a line with carriage returns: the file gets only each line's final state (the bar as it
ends), not every redraw. The terminal (or whatever stderr is) sees exactly what it saw before."""
from __future__ import annotations

import sys
import time

from extractor.errors import InputError


class _Tee:
    def __init__(self, stream, log):
        self._stream, self._log, self._line = stream, log, ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._line += text
        *done, self._line = self._line.split("\n")
        for line in done:
            self._log.write(line.rsplit("\r", 1)[-1] + "\n")
        if done:
            self._log.flush()
        if "\r" in self._line:  # a redraw: keep only the newest state of the line
            self._line = self._line.rsplit("\r", 1)[-1]
        return n

    def flush(self) -> None:
        self._stream.flush()

    def close_log(self) -> None:
        if self._line.strip():
            self._log.write(self._line + "\n")
        self._line = ""
        self._log.close()

    def __getattr__(self, name):  # isatty, fileno, encoding: the real stream's, so output looks the same
        return getattr(self._stream, name)


def tee_stderr(path: str) -> None:
    """Append stderr's lines to `path` until the command ends (the error line of a failing command
    included: it is printed before the root context closes)."""
    import click
    try:
        log = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--log-file {path}: cannot open for appending ({exc.strerror or exc}); choose another "
                         "path") from None
    log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} extractor {' '.join(sys.argv[1:])}\n")
    log.flush()  # nothing left in the buffer for a forked child to write again
    tee = _Tee(sys.stderr, log)
    sys.stderr = tee

    def restore():
        if sys.stderr is tee:
            sys.stderr = tee._stream
        tee.close_log()
    click.get_current_context().find_root().call_on_close(restore)
