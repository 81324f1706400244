"""Grammar work in worker processes: each worker owns the rows of the cache slots `slot % workers == i`,
runs a RowEngine for them and writes their masks into one host table in shared memory. xgrammar's calls
hold the GIL, so threads gave the per-step grammar work little parallelism; processes do (measured on an H200: with
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

from extractor.constrain.grammar import Grammar
from extractor.constrain.rows import RowEngine, StepMasks
from extractor.errors import ExtractorError


def auto_workers() -> int:
    """Worker processes for `--constrained` on the fast path: EXTRACTOR_GRAMMAR_WORKERS, else one per
    core beyond four (the main process and the run's reader, writer and tokenizer threads), at most 12;
    0 (grammar work in this process) below eight cores. On one H100/H200 machine (16 cores), 1,024 rows
    of a JSON schema: 10 workers cost 17% of throughput, 6 workers 25%, none 42% (docs/benchmarks.md)."""
    env = os.environ.get("EXTRACTOR_GRAMMAR_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise WorkerError(f"EXTRACTOR_GRAMMAR_WORKERS={env!r} is not a whole number; "
                              "set it to 0 (no worker processes) or a count such as 4") from None
    cores = os.cpu_count() or 1
    return 0 if cores < 8 else min(12, cores - 4)


class WorkerError(ExtractorError):
    """A grammar worker failed or is gone (one line: what, and how to go on)."""


HINT = ("rerun (with --resume, keeping what was written), or set EXTRACTOR_GRAMMAR_WORKERS=0 to keep grammar "
        "work in one process")


class ShardPool:
    """`n` worker processes holding the grammar, started once and kept for the Grammar across runs
    (batch.shard_pool). One BatchConstraint uses the pool at a time (`reset` at its start).

    Each worker keeps its rows' masks in a table of its own and copies the rows a message changed into its
    staging area, two buffers in shared memory used in turn; the parent uploads them from there (pinned
    with cudaHostRegister on CUDA, so the copy runs asynchronously), and waits for a buffer's last upload
    before handing it out again."""

    def __init__(self, spec: tuple, n: int):
        self.n = n
        self.conns, self.procs = [], []
        self.segments: list = []  # every staging segment (an old one may still be viewed: closed at the end)
        self.registered: list = []  # host pointers registered with CUDA
        # Set up before the workers start, so that a failed start stops the ones already running.
        self._finalizer = weakref.finalize(self, _shutdown, self.conns, self.procs, self.segments, self.registered)
        for _ in range(n):
            conn, proc = _start_worker()
            conn.send(spec)
            self.conns.append(conn)
            self.procs.append(proc)
        try:
            for conn in self.conns:
                _answer(conn)  # ("ready",) once the worker has compiled the grammar
        except WorkerError:
            self._finalizer()
            raise
        self.rows = self.words = 0
        self.staging: list = []  # per worker: [2, cap, words] int32 over shared memory
        self.parity = [0] * n
        self.guards: list = [[None, None] for _ in range(n)]  # per worker and buffer: the last upload's event
        self.unanswered = [0] * n  # messages sent to each worker and not answered yet
        self.broken = False  # a worker failed or is gone: batch.shard_pool starts a new pool
        self.owner: dict = {}   # request -> worker
        self.releases: list[list] = [[] for _ in range(n)]
        self.stats: list[dict] = [{} for _ in range(n)]

    def reset(self) -> None:
        """A fresh start for a new BatchConstraint: answers a stopped run never collected (its caller quit
        mid-step) are read and dropped first."""
        for w, conn in enumerate(self.conns):
            while self.unanswered[w]:
                self._answer(w)
            conn.send(("reset",))
        self.owner.clear()
        self.releases = [[] for _ in range(self.n)]
        self.stats = [{} for _ in range(self.n)]

    def ensure_rows(self, rows: int, words: int, pin: bool) -> None:
        """Room for `rows` slots (the caller's growth policy: BatchConstraint._table): workers grow their
        tables; staging areas sized for the slots each owns."""
        if rows <= self.rows and words == self.words:
            return
        cap = -(-rows // self.n)  # slots one worker owns at most (slot % n == worker)
        self.staging = []
        for w, conn in enumerate(self.conns):
            shm = shared_memory.SharedMemory(create=True, size=2 * cap * words * 4)
            self.segments.append(shm)
            view = np.ndarray((2, cap, words), dtype=np.int32, buffer=shm.buf)
            if pin:
                self.registered.append(_pin(view))
            self.staging.append(view)
            conn.send(("table", rows, words, shm.name, cap))
        for conn, shm in zip(self.conns, self.segments[-self.n:]):
            _answer(conn)  # ("attached",)
            shm.unlink()  # both processes have it mapped: the name is no longer needed
        self.rows, self.words = rows, words
        self.guards = [[None, None] for _ in range(self.n)]

    def release(self, request) -> None:
        worker = self.owner.pop(request, None)
        if worker is not None:
            self.releases[worker].append(request)

    def first(self, requests, budgets, slots, each=None) -> StepMasks:
        parts = self._split(requests, slots, budgets)
        for w, (reqs, slots_w, budgets_w) in parts.items():
            for r in reqs:
                self.owner[r] = w
            self._send(w, "first", reqs, budgets_w, slots_w)
        return self.gather(list(parts), each)

    def send_step(self, requests, tokens, slots) -> list[int]:
        """Send each worker its rows' previous tokens; returns the workers to `gather` from."""
        parts = self._split(requests, slots, tokens)
        for w, (reqs, slots_w, tokens_w) in parts.items():
            self._send(w, "step", reqs, tokens_w, slots_w)
        return list(parts)

    def gather(self, workers: list[int], each=None) -> StepMasks:
        """The workers' answers, merged. `each(worker, buffer, answer)` runs on each as it arrives (it
        uploads the answer's changed rows, staged in that worker's `buffer`, while slower workers still
        compute) and returns what to wait for before the buffer is written again (or None)."""
        changed, mids, new_mids, forced = [], [], {}, {}
        waiting = {self.conns[w]: w for w in workers}
        while waiting:
            for conn in connection_wait(list(waiting)):
                w = waiting.pop(conn)
                result, self.stats[w] = self._answer(w)
                buffer = self.parity[w] ^ 1  # the one the message used
                if each is not None:
                    self.guards[w][buffer] = each(w, buffer, self.staging[w][buffer][: len(result.changed)], result)
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

    def _send(self, worker: int, kind: str, *payload) -> None:
        """A message using the worker's next staging buffer, once that buffer's last upload has run."""
        buffer = self.parity[worker]
        guard = self.guards[worker][buffer]
        if guard is not None:
            guard.synchronize()
            self.guards[worker][buffer] = None
        self.parity[worker] ^= 1
        try:
            self.conns[worker].send((kind, buffer, self._take_releases(worker), *payload))
            self.unanswered[worker] += 1
        except (BrokenPipeError, OSError):
            self.broken = True
            raise WorkerError(f"grammar worker {worker} is gone (exit code {self.procs[worker].poll()}); "
                              f"{HINT}") from None

    def _answer(self, worker: int):
        try:
            answer = _answer(self.conns[worker])
        except WorkerError:
            self.broken = True
            raise
        self.unanswered[worker] -= 1
        return answer


def _pin(view: np.ndarray) -> int:
    """Page-lock a shared-memory view for CUDA (cudaHostRegister): uploads from it run asynchronously."""
    import torch
    ptr = view.ctypes.data
    status = torch.cuda.cudart().cudaHostRegister(ptr, view.nbytes, 0)
    if int(status) != 0:
        raise WorkerError(f"cannot page-lock the grammar workers' staging memory (CUDA error {int(status)}); "
                          "set EXTRACTOR_GRAMMAR_WORKERS=0 to keep grammar work in one process")
    return ptr


def _start_worker():
    """A fresh interpreter running this module, talking over a socket pair. Not multiprocessing's spawn:
    that re-imports the caller's main script in the child, which breaks scripts without a main guard; nor
    fork: the parent may hold CUDA and many threads."""
    ours, theirs = mp.Pipe()
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # extractor/
    root = os.path.dirname(package)  # where `extractor` imports from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "extractor.constrain.workers", str(theirs.fileno())],
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


def _shutdown(conns, procs, shms, registered) -> None:
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
    if registered:
        try:
            import torch
            for ptr in registered:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # noqa: BLE001 - at exit the CUDA context may already be gone; nothing to keep
            pass
    for shm in shms:
        try:
            shm.close()
        except BufferError:  # a numpy view is still alive: the mapping goes at exit
            pass


def _serve(conn, spec) -> None:
    """A worker: build the grammar, then answer messages until told to stop."""
    try:
        engine = RowEngine(Grammar(*spec), threads=1)
        conn.send(("ready", None))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    staging = shm = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        kind = message[0]
        try:
            if kind == "stop":
                break
            if kind == "reset":
                engine.reset()
            elif kind == "table":
                shm, staging = _attach(shm, engine, *message[1:])
                conn.send(("attached", None))
            elif kind in ("first", "step"):
                _, buffer, releases, reqs, values, slots = message
                for r in releases:
                    engine.release(r)
                if kind == "first":
                    engine.start(reqs, values)
                    result = engine.first(reqs, slots)
                else:
                    result = engine.step(reqs, values, slots)
                changed = np.asarray(result.changed, dtype=np.int64)
                np.take(engine.host, changed, axis=0, out=staging[buffer, : len(changed)])
                conn.send(("ok", result, engine.stats))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    if shm is not None:
        shm.close()


def _attach(old, engine, rows: int, words: int, name: str, cap: int):
    """A bigger mask table of this worker's own (rows copied over) and the parent's new staging area."""
    engine.grow_table(rows, words)
    shm = shared_memory.SharedMemory(name=name)
    # The parent owns the segment; this interpreter's resource tracker, which registered it on attaching,
    # would unlink it (and warn) when this worker exits.
    from multiprocessing import resource_tracker
    resource_tracker.unregister(shm._name, "shared_memory")
    if old is not None:
        old.close()
    return shm, np.ndarray((2, cap, words), dtype=np.int32, buffer=shm.buf)


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    _connection = Connection(int(sys.argv[1]))
    try:
        _spec = _connection.recv()
    except (EOFError, OSError):  # the parent went away before sending the grammar
        sys.exit(0)
    _serve(_connection, _spec)
