"""Grammar work in worker processes: each worker owns the rows of the cache slots `slot % workers == i`,
runs a RowEngine for them and writes their masks into one host table in shared memory. xgrammar's calls
hold the GIL, so threads gave the per-step grammar work little parallelism; processes do (issue 6: with
1,024 rows a step's grammar work took twice the GPU's step in one process).

The main process sends each worker its rows' tokens as soon as a step's rows are known and collects the
answers after queueing the GPU's forward pass, so the grammar work of a step runs under it."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import traceback
import weakref
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait

import numpy as np

from extractor.constrain_rows import StepMasks
from extractor.errors import ExtractorError


def auto_workers() -> int:
    """Worker processes for `--constrained` on the fast path: EXTRACTOR_GRAMMAR_WORKERS, else one per two
    cores beyond four (the main process and the run's reader, writer and tokenizer threads), at most 6;
    0 (grammar work in this process) on small machines."""
    env = os.environ.get("EXTRACTOR_GRAMMAR_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise WorkerError(f"EXTRACTOR_GRAMMAR_WORKERS={env!r} is not a whole number; "
                              "set it to 0 (no worker processes) or a count such as 4") from None
    return max(0, min(6, ((os.cpu_count() or 1) - 4) // 2))


class WorkerError(ExtractorError):
    """A grammar worker failed or is gone (one line: what, and how to go on)."""


HINT = ("rerun (with --resume, keeping what was written), or set EXTRACTOR_GRAMMAR_WORKERS=0 to keep grammar "
        "work in one process")


class ShardPool:
    """`n` worker processes holding the grammar, started once and kept with the Grammar across runs. One
    BatchConstraint uses the pool at a time (`reset` at its start)."""

    def __init__(self, spec: tuple, n: int):
        self.n = n
        self.conns, self.procs = [], []
        for _ in range(n):
            conn, proc = _start_worker()
            conn.send(spec)
            self.conns.append(conn)
            self.procs.append(proc)
        for conn in self.conns:
            _answer(conn)  # ("ready",) once the worker has compiled the grammar
        self.shm = None
        self.table: np.ndarray | None = None
        self.owner: dict = {}   # request -> worker
        self.releases: list[list] = [[] for _ in range(n)]
        self.stats: list[dict] = [{} for _ in range(n)]
        self.segments: list = []  # every table's shared memory (an old one may still be viewed: closed at the end)
        self._finalizer = weakref.finalize(self, _shutdown, self.conns, self.procs, self.segments)

    def reset(self) -> None:
        for conn in self.conns:
            conn.send(("reset",))
        self.owner.clear()
        self.releases = [[] for _ in range(self.n)]
        self.stats = [{} for _ in range(self.n)]

    def host_table(self, rows: int, words: int) -> np.ndarray:
        """The shared host mask table, with at least `rows` rows (grown by copying; workers reattach)."""
        if self.table is not None and self.table.shape[0] >= rows and self.table.shape[1] == words:
            return self.table
        rows = max(rows, 64, 0 if self.table is None else 2 * self.table.shape[0])
        shm = shared_memory.SharedMemory(create=True, size=rows * words * 4)
        table = np.ndarray((rows, words), dtype=np.int32, buffer=shm.buf)
        table[:] = -1
        if self.table is not None and self.table.shape[1] == words:
            table[: self.table.shape[0]] = self.table
        old, self.shm, self.table = self.shm, shm, table
        self.segments.append(shm)
        for conn in self.conns:
            conn.send(("table", shm.name, rows, words))
        if old is not None:
            old.unlink()  # the name goes; the memory stays mapped until every view of it is closed
        return table

    def release(self, request) -> None:
        worker = self.owner.pop(request, None)
        if worker is not None:
            self.releases[worker].append(request)

    def first(self, requests, budgets, slots) -> StepMasks:
        parts = self._split(requests, slots, budgets)
        for w, (reqs, slots_w, budgets_w) in parts.items():
            for r in reqs:
                self.owner[r] = w
            self._send(w, ("first", self._take_releases(w), reqs, budgets_w, slots_w))
        return self.gather(list(parts))

    def send_step(self, requests, tokens, slots) -> list[int]:
        """Send each worker its rows' previous tokens; returns the workers to `gather` from."""
        parts = self._split(requests, slots, tokens)
        for w, (reqs, slots_w, tokens_w) in parts.items():
            self._send(w, ("step", self._take_releases(w), reqs, tokens_w, slots_w))
        return list(parts)

    def gather(self, workers: list[int], each=None) -> StepMasks:
        """The workers' answers, merged; `each(answer)` runs on each as it arrives (uploading its rows
        while slower workers still compute)."""
        changed, mids, new_mids, forced = [], [], {}, {}
        waiting = {self.conns[w]: w for w in workers}
        while waiting:
            for conn in connection_wait(list(waiting)):
                w = waiting.pop(conn)
                result, self.stats[w] = _answer(conn)
                if each is not None:
                    each(result)
                changed += result.changed
                mids += result.mids
                new_mids.update(result.new_mids)
                forced.update(result.forced)
        return StepMasks(changed, mids, new_mids, forced)

    def merged_stats(self) -> dict:
        total: dict = {}
        for stats in self.stats:
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def _split(self, requests, slots, values) -> dict:
        """Worker -> (its requests, slots, values): the slots `slot % n == worker`."""
        slots = np.asarray(slots, dtype=np.int64)
        values = np.asarray(values, dtype=np.int64)
        worker = slots % self.n
        parts = {}
        for w in range(self.n):
            idx = np.flatnonzero(worker == w)
            if len(idx):
                parts[w] = ([requests[i] for i in idx.tolist()], slots[idx].tolist(), values[idx].tolist())
        return parts

    def _take_releases(self, worker: int) -> list:
        taken, self.releases[worker] = self.releases[worker], []
        return taken

    def _send(self, worker: int, message) -> None:
        try:
            self.conns[worker].send(message)
        except (BrokenPipeError, OSError):
            raise WorkerError(f"grammar worker {worker} is gone (exit code {self.procs[worker].poll()}); "
                              f"{HINT}") from None


def _start_worker():
    """A fresh interpreter running this module, talking over a socket pair. Not multiprocessing's spawn:
    that re-imports the caller's main script in the child, which breaks scripts without a main guard; nor
    fork: the parent may hold CUDA and many threads."""
    ours, theirs = mp.Pipe()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `extractor` imports from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "extractor.constrain_workers", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
    theirs.close()  # the child holds its end; a child that dies makes our recv raise EOFError
    return ours, proc


def _answer(conn):
    try:
        message = conn.recv()
    except EOFError:
        raise WorkerError(f"a grammar worker exited without answering; {HINT}") from None
    if message[0] == "error":
        last = message[1].strip().splitlines()[-1]
        raise WorkerError(f"a grammar worker failed ({last}); {HINT}")
    return message[1:]


def _shutdown(conns, procs, shms) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
    for i, shm in enumerate(shms):
        try:
            if i == len(shms) - 1:
                shm.unlink()
            shm.close()
        except (FileNotFoundError, BufferError):  # already gone, or a numpy view still alive: freed at exit
            pass


def _serve(conn, spec) -> None:
    """A worker: build the grammar, then answer messages until told to stop."""
    try:
        from extractor.constrain import Grammar
        from extractor.constrain_rows import RowEngine
        engine = RowEngine(Grammar(*spec), threads=1)
        conn.send(("ready", None))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    shm = None
    while True:
        message = conn.recv()
        kind = message[0]
        try:
            if kind == "stop":
                break
            if kind == "reset":
                engine.reset()
            elif kind == "table":
                shm = _attach(shm, engine, *message[1:])
            elif kind == "first":
                _, releases, reqs, budgets, slots = message
                for r in releases:
                    engine.release(r)
                engine.start(reqs, budgets)
                conn.send(("ok", engine.first(reqs, slots), engine.stats))
            elif kind == "step":
                _, releases, reqs, tokens, slots = message
                for r in releases:
                    engine.release(r)
                conn.send(("ok", engine.step(reqs, tokens, slots), engine.stats))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    if shm is not None:
        shm.close()


def _attach(old, engine, name: str, rows: int, words: int):
    shm = shared_memory.SharedMemory(name=name)
    # The parent owns the segment and unlinks it; this interpreter's resource tracker, which registered it
    # on attaching, would unlink it (and warn) when this worker exits.
    from multiprocessing import resource_tracker
    resource_tracker.unregister(shm._name, "shared_memory")
    engine.set_host(np.ndarray((rows, words), dtype=np.int32, buffer=shm.buf))
    if old is not None:
        old.close()
    return shm


if __name__ == "__main__":
    _connection = Connection(int(sys.argv[1]))
    _serve(_connection, _connection.recv())
