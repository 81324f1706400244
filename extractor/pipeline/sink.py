"""Rows to the output store on a writer thread (`RowSink`), the progress bar (`Progress`), and the reader
thread that reads ahead of the backend (`prefetch`). Each is handed what it needs; none knows the `Run`."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from extractor.errors import ExtractorError
from extractor.results.judge import SCORED_STATUSES

if TYPE_CHECKING:
    from extractor.pipeline.summary import Summary


class Progress:
    """The progress bar: records written or skipped, with the rates and the invalid count of a summary."""

    def __init__(self, bar, summary: Summary, start: float):
        self.bar, self.summary, self.start = bar, summary, start

    def skipped(self, n: int) -> None:
        self.bar.update(n)

    def written(self, count: int) -> None:
        self.bar.update(count)
        secs = max(time.perf_counter() - self.start, 1e-9)
        s = self.summary
        invalid = sum(n for status, n in s.statuses.items() if status not in SCORED_STATUSES)
        self.bar.set_postfix_str(f"{s.new / secs:.1f} rec/s, {s.output_tokens / secs:.0f} tok/s, invalid {invalid}",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


class WorkerError(ExtractorError):
    """A writer or reader thread failed on something that is not an `ExtractorError` of its own: its
    one line, naming the thread, in the main thread (the original is its __cause__)."""


def handed_over(exc: BaseException, role: str) -> ExtractorError:
    """What a worker thread's failure becomes in the main thread: typed errors as they are, anything
    else one line that says the output can be resumed."""
    if isinstance(exc, ExtractorError):
        return exc
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    error = WorkerError(f"the {role} thread failed ({what[:300]}); the rows written before are kept — rerun "
                        "with --resume to continue")
    error.__cause__ = exc
    return error


POLL_S = 0.1  # how often a blocked hand-over looks again whether the other side has failed


class RowSink:
    """Builds and writes released rows on a thread of its own, `window` rows per append, counting them in
    `summary` and on `progress`. `put` takes what `to_rows` turns into rows (a lane's triples, judged here by its
    `RowJudge`, off the generating thread); `put_rows` takes rows already built (a Ray actor's).

    A failure stops the thread at once; every later (or blocked) hand-over raises it, so neither the
    producer nor the reader can wait on a writer that is gone."""

    def __init__(self, writer, to_rows, window: int, summary: Summary, progress: Progress | None = None):
        import queue
        import threading
        self.writer, self.to_rows, self.window = writer, to_rows, window
        self.summary, self.progress = summary, progress
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: ExtractorError | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._work, name="extractor-writer", daemon=True)
        self.thread.start()

    def put(self, triples) -> None:
        self._send(("triples", triples))

    def put_rows(self, rows: list[dict]) -> None:
        self._send(("rows", rows))

    def skipped(self, n: int) -> None:
        if n:
            self._send(("skipped", n))

    def _send(self, item) -> None:
        """Queue an item; raise the writer's error instead, even while waiting for room."""
        import queue
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():  # its error may have come just after the check above
                raise self.error or WorkerError("the writer thread has stopped; rerun with --resume to continue")
            try:
                self.queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def close(self, raise_errors: bool = True) -> None:
        """Write what is left and stop the thread (at once when it has failed)."""
        if not self._closed:
            self._closed = True
            try:
                self._send(("end", None))
            except ExtractorError:
                pass  # the thread has stopped already: its error is raised below
            self.thread.join()
        if raise_errors and self.error is not None:
            raise self.error

    def _work(self) -> None:
        pending: list[dict] = []
        try:
            while True:
                kind, item = self.queue.get()
                if kind in ("triples", "rows"):
                    pending.extend(self.to_rows(item) if kind == "triples" else item)
                    if len(pending) >= self.window:
                        self._write(pending)
                        pending = []
                elif kind == "skipped" and self.progress is not None:
                    self.progress.skipped(item)
                elif kind == "end":
                    self._write(pending)
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error = handed_over(exc, "writer")

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.writer.write_batch(rows)
        self.summary.count(rows)
        if self.progress is not None:
            self.progress.written(len(rows))


class prefetch:
    """Iterate a generator on a background thread, up to `depth` items ahead (reading and rendering the
    next windows while the backend works). Exceptions surface in the consumer, where they happened; a reader
    that does not stop within `grace_s` once the consumer has (blocked in a read) is left behind (a daemon)."""

    def __init__(self, iterator, depth: int = 2, grace_s: float = 5.0):
        import queue
        import threading
        self.iterator = iterator
        self.grace_s = grace_s
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="extractor-reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self._items()

    def __exit__(self, *exc):
        import queue
        import time
        self._stop.set()
        deadline = time.monotonic() + self.grace_s
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a reader waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)
        return False

    def _work(self) -> None:
        try:
            for item in self.iterator:
                if self._stop.is_set() or not self._put(("item", item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(("error", handed_over(exc, "reader")))
            return
        self._put(("end", None))

    def _put(self, entry) -> bool:
        """Queue an entry unless the consumer has gone (False then)."""
        import queue
        while not self._stop.is_set():
            try:
                self.queue.put(entry, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _items(self):
        import queue
        while True:
            try:
                kind, item = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise WorkerError("the reader thread stopped without a word; rerun with --resume to continue")
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
