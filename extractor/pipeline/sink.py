"""Rows to the output store on a writer thread (`RowSink`), the progress bar (`Progress`), and the reader
thread that reads ahead of the backend (`prefetch`). Each is handed what it needs; none knows the `Run`."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from extractor.outputs import SCORED_STATUSES

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


class RowSink:
    """Builds and writes released rows on a thread of its own, `window` rows per append, counting them in
    `summary` and on `progress`. `put` takes what `to_rows` turns into rows (the predictor's triples, parsed and
    validated here, off the generating thread); `put_rows` takes rows already built (a Ray actor's)."""

    def __init__(self, writer, to_rows, window: int, summary: Summary, progress: Progress | None = None):
        import queue
        import threading
        self.writer, self.to_rows, self.window = writer, to_rows, window
        self.summary, self.progress = summary, progress
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._work, name="extractor-writer", daemon=True)
        self.thread.start()

    def put(self, triples) -> None:
        self._put("triples", triples)

    def put_rows(self, rows: list[dict]) -> None:
        self._put("rows", rows)

    def _put(self, kind: str, item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((kind, item))

    def skipped(self, n: int) -> None:
        if n:
            self.queue.put(("skipped", n))

    def close(self, raise_errors: bool = True) -> None:
        if not self._closed:
            self._closed = True
            self.queue.put(("end", None))
            self.thread.join()
        if raise_errors and self.error is not None:
            raise self.error

    def _work(self) -> None:
        pending: list[dict] = []
        while True:
            kind, item = self.queue.get()
            if self.error is not None:
                if kind == "end":
                    return
                continue
            try:
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
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.writer.write_batch(rows)
        self.summary.count(rows)
        if self.progress is not None:
            self.progress.written(len(rows))


class prefetch:
    """Iterate a generator on a background thread, up to `depth` items ahead (reading and rendering the
    next windows while the backend works). Exceptions surface in the consumer, where they happened."""

    def __init__(self, iterator, depth: int = 2):
        import queue
        import threading
        self.iterator = iterator
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="extractor-reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self._items()

    def __exit__(self, *exc):
        self._stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                self.thread.join(timeout=0.05)
        return False

    def _work(self) -> None:
        try:
            for item in self.iterator:
                if self._stop.is_set():
                    return
                self.queue.put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self.queue.put(("error", exc))
            return
        self.queue.put(("end", None))

    def _items(self):
        while True:
            kind, item = self.queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
