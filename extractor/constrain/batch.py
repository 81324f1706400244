"""Grammar masks for FastDecoder's packed rows, kept per cache slot on the GPU.

The grammar work (each row's matcher, its mask in a host table row per slot, closing mode) is a RowEngine's
(rows.py): in this process, or spread over worker processes (workers.py). Here: only changed mask rows
travel to the device table; a step's masks are gathered from it by slot, mid-character rows take theirs
from a small table of such masks, closing rows get their forced token. The worker processes and threads
are this module's, kept per grammar across runs (`shard_pool`, `thread_pool`)."""
from __future__ import annotations

import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from extractor.constrain.grammar import Grammar
from extractor.constrain.rows import RowEngine, StepMasks
from extractor.constrain.workers import ShardPool, auto_workers

_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Grammar -> {"threads": ..., "shards": ...}


def thread_pool(grammar: Grammar) -> ThreadPoolExecutor | None:
    """Threads for batched matcher work (one pool per grammar, kept while it lives); None on 1-2 cores."""
    pools = _POOLS.setdefault(grammar, {})
    if "threads" not in pools:
        workers = min(8, (os.cpu_count() or 1) - 1)
        pools["threads"] = ThreadPoolExecutor(workers, thread_name_prefix="grammar") if workers >= 2 else None
    return pools["threads"]


def shard_pool(grammar: Grammar, n: int) -> ShardPool:
    """Worker processes holding this grammar, started on first use and kept while the grammar lives; a
    different count, or a failed worker, starts new ones."""
    pools = _POOLS.setdefault(grammar, {})
    pool = pools.get("shards")
    if pool is None or pool.n != n or pool.broken:
        pools["shards"] = pool = ShardPool(grammar.spec, n)
    return pool


class BatchConstraint:
    """`workers`: grammar worker processes ("auto": workers.auto_workers; 0: this process).
    Interface used by FastDecoder: start, mask_first, hook, release."""

    def __init__(self, grammar: Grammar, workers="auto"):
        self.g = grammar
        n = auto_workers() if workers == "auto" else int(workers)
        self.shards = shard_pool(grammar, n) if n > 0 else None
        if self.shards is not None:
            self.shards.reset()
            self.engine = None
        else:
            self.engine = RowEngine(grammar, pool=thread_pool(grammar))
        self.workers = n if self.shards is not None else 0
        self.device_table = None
        self.rows = 0  # slots the tables hold
        self.device = None
        self.cuda = False
        self._budgets: dict = {}  # started, waiting for their slots (mask_first)
        self.mid_masks: dict[bytes, np.ndarray] = {}
        self.mid_rows: dict[bytes, int] = {}
        self.mid_table = None
        self._events: dict = {}
        # This process's side: main_s (gathering and applying masks), upload_s (host rows to the device),
        # bitmask_s (the apply kernel's launch), wait_s (waiting for workers, uploads included).
        self.main = {"main_s": 0.0, "upload_s": 0.0, "bitmask_s": 0.0, "wait_s": 0.0, "uploaded_rows": 0}

    @property
    def stats(self) -> dict:
        """The engines' counters and CPU seconds (summed over workers), plus this process's own (self.main)
        and the number of workers."""
        base = dict(self.engine.stats) if self.engine is not None else self.shards.merged_stats()
        base.update(self.main, workers=self.workers)
        return base

    def start(self, requests, budgets) -> None:
        if self.engine is not None:
            self.engine.start(requests, budgets)
        else:
            self._budgets.update(zip(requests, budgets))

    def release(self, request) -> None:
        if self.engine is not None:
            self.engine.release(request)
        else:
            self._budgets.pop(request, None)
            self.shards.release(request)

    def mask_first(self, requests, logits, slots) -> None:
        """Masks for newly admitted records' first tokens (logits in the order of `requests`)."""
        slots = [int(s) for s in slots]
        self._table(max(slots) + 1, logits.device)
        if self.engine is not None:
            masks = self.engine.first(requests, slots)
            self._upload(masks.changed)
        else:
            budgets = [self._budgets.pop(r) for r in requests]
            masks = self._wait(lambda: self.shards.first(requests, budgets, slots, each=self._upload_staged))
        self._apply(masks, slots, logits)

    def hook(self, requests, last_tokens, slots):
        """A callable for the decode step: take in each row's previous token, then mask the new logits.
        With workers, the rows go to them now, so their work overlaps what the caller does next (queueing
        the forward pass). `apply(logits, logit_slots)`: logits rows belong to `logit_slots` (default: these
        slots; rows of other slots are left unmasked but for their slot's table row)."""
        tokens = [int(t) for t in last_tokens]
        slots = [int(s) for s in slots]
        if slots:
            self._table(max(slots) + 1, self.device)
        sent = self.shards.send_step(requests, tokens, slots) if self.shards is not None else None

        def apply(logits, logit_slots=None):
            if self.engine is not None:
                masks = self.engine.step(requests, tokens, slots)
                self._upload(masks.changed)
            else:
                masks = self._wait(lambda: self.shards.gather(sent, each=self._upload_staged))
            self._apply(masks, slots if logit_slots is None else [int(s) for s in logit_slots], logits)
        return apply

    def _wait(self, call) -> StepMasks:
        t = time.perf_counter()
        try:
            return call()
        finally:
            self.main["wait_s"] += time.perf_counter() - t

    # -- device side -----------------------------------------------------------------------------------
    def _table(self, slots: int, device) -> None:
        """Host and device mask tables with a row per cache slot."""
        import torch
        if self.rows >= slots:
            return
        self.device = device
        self.cuda = device.type == "cuda"
        words = self.g.allocate_bitmask(1).shape[1]
        rows = max(slots, 64, 2 * self.rows)
        if self.shards is not None:
            self.shards.ensure_rows(rows, words, pin=self.cuda)  # the workers hold the host rows
        else:
            self.engine.grow_table(rows, words)
        self.rows = rows
        grown = torch.full((rows, words), -1, dtype=torch.int32, device=device)
        if self.device_table is not None:
            grown[: self.device_table.shape[0]] = self.device_table
        self.device_table = grown

    def _to_device(self, values, dtype=np.int64):
        """Host data on the device without waiting for the GPU: through pinned memory from torch's caching
        host allocator, which keeps a block until the copy that reads it has run."""
        import torch
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype))
        if not self.cuda:
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _upload(self, changed: list[int]) -> None:
        """Refilled rows of this process's engine's table to the device table (asynchronously)."""
        import torch
        if not changed:
            return
        t = time.perf_counter()
        slots = np.asarray(changed, dtype=np.int64)
        self.main["uploaded_rows"] += len(slots)
        host = self.engine.host
        rows = torch.empty((len(slots), host.shape[1]), dtype=torch.int32, pin_memory=self.cuda)
        torch.index_select(torch.from_numpy(host), 0, torch.from_numpy(slots), out=rows)  # one host copy
        self.device_table.index_copy_(0, self._to_device(slots), rows.to(self.device, non_blocking=True))
        self.main["upload_s"] += time.perf_counter() - t

    def _upload_staged(self, worker: int, buffer: int, rows: np.ndarray, result: StepMasks):
        """A worker's changed rows, from its staging buffer, to the device table; returns the event that
        says when the buffer has been read (None off CUDA, where the copy is done on return)."""
        import torch
        if not result.changed:
            return None
        t = time.perf_counter()
        self.main["uploaded_rows"] += len(result.changed)
        src = torch.from_numpy(rows)
        self.device_table.index_copy_(0, self._to_device(result.changed), src.to(self.device, non_blocking=self.cuda))
        event = None
        if self.cuda:  # one event per worker and buffer, recorded again each time
            event = self._events.setdefault((worker, buffer), torch.cuda.Event())
            event.record()
        self.main["upload_s"] += time.perf_counter() - t
        return event

    def _apply(self, result: StepMasks, slots: list[int], logits) -> None:
        import torch
        t = time.perf_counter()
        self.mid_masks.update(result.new_mids)
        masks = self.device_table.index_select(0, self._to_device(slots))
        position = {s: i for i, s in enumerate(slots)} if (result.mids or result.forced) else {}
        if result.mids:
            at = self._to_device([position[s] for s, _ in result.mids])
            masks[at] = self._mid_masks_on_device([p for _, p in result.mids])
        t1 = time.perf_counter()
        self.g.xgr.apply_token_bitmask_inplace(logits, masks, vocab_size=self.g.vocab_size)
        self.main["bitmask_s"] += time.perf_counter() - t1
        if result.forced:
            at = self._to_device([position[s] for s in result.forced])
            logits[at] = torch.finfo(logits.dtype).min
            logits[at, self._to_device(list(result.forced.values()))] = 0
        self.main["main_s"] += time.perf_counter() - t

    def _mid_masks_on_device(self, pendings: list[bytes]):
        """The mid-character masks for these pending bytes (device rows), copied up on first use."""
        import torch
        index = []
        for pending in pendings:
            row = self.mid_rows.get(pending)
            if row is None:
                row = len(self.mid_rows)
                if self.mid_table is None or row >= self.mid_table.shape[0]:
                    grown = torch.zeros((max(64, 2 * row), self.device_table.shape[1]), dtype=torch.int32,
                                        device=self.device)
                    if self.mid_table is not None:
                        grown[: self.mid_table.shape[0]] = self.mid_table
                    self.mid_table = grown
                self.mid_table[row].copy_(self._to_device(self.mid_masks[pending], np.int32))
                self.mid_rows[pending] = row
            index.append(row)
        return self.mid_table.index_select(0, self._to_device(index))
