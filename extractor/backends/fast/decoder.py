"""FastDecoder: greedy decoding of many records after one shared prompt prefix, continuously batched over a
static cache, through the model's own forward. It composes the package's parts: KVCache (cache.py) holds the
K/V, ModelRunner (runner.py) runs the model's passes, a Scheduler (scheduler.py) decides each step; this file
is the loop that executes the scheduler's decisions with the runner, one step ahead of the host.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from extractor.backends.fast.cache import KVCache, VirtualPrefix
from extractor.backends.fast.families import FastPathError
from extractor.backends.fast.runner import ModelRunner
from extractor.backends.fast.scheduler import DecodeStep, PrefillChunk, Scheduler


class FastDecoder(ModelRunner, KVCache):
    """Greedy decoding of many suffixes after one shared prefix. `unique_len`: the longest suffix plus the
    most new tokens a record may get. Raises FastPathError at construction when the model's forward does not
    run on this path (checked on a short probe against the model's own forward)."""

    def __init__(self, model, prefix: list[int], slots: int, unique_len: int, eos_ids: list[int],
                 attention: str = "auto", prefill_tokens: int = 32768, compile: bool = False,
                 virtual: VirtualPrefix | None = None, adapters=None, compile_scope: str = "layers"):
        if adapters is not None and virtual is not None:
            raise FastPathError("mixed LoRA adapters and a prompt-learning adapter's virtual part in one decoder")
        self.slots, self.unique_len = slots, unique_len
        self.eos = np.array(sorted(set(eos_ids)) or [-1])
        self.prefill_tokens = prefill_tokens
        self._init_runner(model, attention, compile, compile_scope, adapters)  # ends with the probe
        self.prefix, self.virtual = list(prefix), virtual
        self._set_prefix(self.prefix)
        self._init_staging()
        self.stats = {"prefill_s": 0.0, "prefills": 0, "decode_s": 0.0, "steps": 0, "padded_rows": 0,
                      "collect_wait_s": 0.0, "mask_s": 0.0}
        self.trace: list | None = None  # a list: (rows, width, tokens, seconds) of each prefill chunk

    @torch.inference_mode()
    def generate(self, suffixes: list[list[int]], max_new, refill: int | None = None, constraint=None,
                 groups: list[int] | None = None):
        """Greedy outputs for each suffix (after the shared prefix), in input order: (tokens, finish_reason).
        All suffixes are known, so they enter in length order (each batched prefill pads little).
        groups: each suffix's adapter group (a decoder with mixed adapters)."""
        budgets = [max_new] * len(suffixes) if np.isscalar(max_new) else list(max_new)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        results: list = [None] * len(suffixes)
        items = ((i, suffixes[i], budgets[i]) if groups is None else (i, suffixes[i], budgets[i], groups[i])
                 for i in order)
        for key, tokens, reason in self.stream(items, refill, constraint, lookahead=len(suffixes)):
            results[key] = (tokens, reason)
        return results

    @torch.inference_mode()
    def stream(self, source, refill: int | None = None, constraint=None, lookahead: int | None = None):
        """Decode records pulled from `source` — (key, suffix, budget) triples, or (key, suffix, budget,
        adapter group) with mixed adapters — yielding (key, tokens, finish_reason) as each finishes. Records
        are pulled only when slots free up (at most `lookahead` waiting), admitted first come first served once
        `refill` slots are free (default: an eighth), and prefilled in length-sorted chunks. constraint:
        per-row token masks (constrain.batch.BatchConstraint)."""
        refill = refill or max(1, self.slots // 8)
        lookahead = lookahead or 2 * self.slots
        groups = self.groups if self._group is not None else None
        scheduler = Scheduler(iter(source), self.slots, self.unique_len, self.prefill_tokens, self.eos, groups,
                              refill, lookahead)
        yield from self._stream_pipelined(scheduler, constraint)

    def _stream_pipelined(self, scheduler: Scheduler, constraint=None):
        """The decode loop, one step ahead of the host: step k+1's forward pass is queued (its input tokens
        gathered on the GPU from step k's output) before step k's tokens are read back and booked, so the
        host's bookkeeping overlaps the GPU. A row that stops at EOS runs one step more than needed (its
        token is dropped); rows stopping on their budget are known ahead and never over-run.
        With a constraint, step k+1's argmax waits for its masks, which need step k's tokens: the host
        reads those, hands them to the constraint (its worker processes) and applies the masks while the
        GPU runs step k+1's forward pass, so the grammar's CPU work hides under it."""
        prev = None  # the decode step in flight and the parity of the buffers it uses
        parity = 0
        while True:
            scheduler.top_up()
            t0 = time.perf_counter()
            chunks = scheduler.admissions()
            if chunks:
                admitted = self._admit(chunks, scheduler, constraint)
                self.stats["prefill_s"] += time.perf_counter() - t0
                yield from self._finished(scheduler, admitted, constraint)
            step = scheduler.decode_step()
            current = logits = None
            t0 = time.perf_counter()
            if step is not None:
                logits = self._forward_step(step, prev[0] if prev is not None else None, parity)
                current = (step, parity)
                self.stats["steps"] += 1
                parity ^= 1
                if constraint is None:
                    self._pick(logits, current[1])
            finished = []
            if prev is not None:
                ran, par = prev
                booked = scheduler.book(ran, self._collect(par, len(ran.rows)))
                finished = list(self._finished(scheduler, booked, constraint))
            if current is not None and constraint is not None:
                # The grammar work starts before the caller sees the finished records (parsing, writing),
                # so that work overlaps it.
                apply = self._constrain(current[0], scheduler, constraint)
                yield from finished
                self._pick_masked(logits, current[1], apply)
            else:
                yield from finished
            self.stats["decode_s"] += time.perf_counter() - t0
            prev = current
            if prev is None and scheduler.idle():
                return

    # -- one step ahead of the host: two sets of staging buffers, used in turn ----------------------------
    def _init_staging(self) -> None:
        """Host staging and token buffers of a step, two sets used in turn (the pipelined loop has one step in
        flight while it stages the next)."""
        pinned = self.device.type == "cuda"
        staged = 4 if self.adapters is None else 5  # source, slot, position, last token (, group)
        self._stage = [torch.zeros(staged, self.slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._tok_dev = [torch.zeros(self.slots, dtype=torch.long, device=self.device) for _ in range(2)]
        self._tok_host = [torch.zeros(self.slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pinned else None

    def _forward_step(self, step: DecodeStep, prev: DecodeStep | None, parity: int):
        """Queue a decode step's forward pass (its rows packed into the smallest bucket that holds them)
        without waiting, and return its logits: a row that ran in `prev`, the step before, takes its input
        token from that step's output on the device; any other row its last token from the host. `_pick`
        queues the argmax, `_collect` reads the tokens back."""
        rows = step.rows
        n = len(rows)
        b = next(s for s in self.buckets if s >= n)
        self.stats["padded_rows"] += b - n
        src = np.full(n, -1, np.int64)
        if prev is not None:
            where = np.full(self.slots, -1, np.int64)
            where[prev.rows] = np.arange(len(prev.rows))
            key_then = np.full(self.slots, -2, np.int64)
            key_then[prev.rows] = prev.keys
            src = np.where(key_then[rows] == step.keys, where[rows], -1)
        stage = self._stage[parity][:, :b]
        if self._events is not None:
            self._events[parity].synchronize()  # the copy that last used this staging buffer is done
        stage[0, :n] = torch.from_numpy(src)
        stage[1, :n] = torch.from_numpy(rows)
        stage[2, :n] = torch.from_numpy(step.own + self.n_prefix)
        stage[3, :n] = torch.from_numpy(step.last)
        stage[0, n:], stage[1, n:], stage[2, n:], stage[3, n:] = -1, self.slots, self.n_prefix, 0
        if self._group is not None:  # each row's adapter group; padding rows base weights
            stage[4, :n], stage[4, n:] = torch.from_numpy(step.group), 0
        staged = stage.to(self.device, non_blocking=True)
        previous = self._tok_dev[parity ^ 1]
        self._ids[:b] = torch.where(staged[0] >= 0, previous[staged[0].clamp(min=0)], staged[3])
        self._slot[:b], self._pos[:b] = staged[1], staged[2]
        if self._group is not None:
            self._group[:b] = staged[4]
        self._decode(b)
        return self._logits[:n]

    def _pick(self, logits, parity: int) -> None:
        n = logits.shape[0]
        out = self._tok_dev[parity][:n]
        out.copy_(logits.argmax(-1))
        self._tok_host[parity][:n].copy_(out, non_blocking=True)
        if self._events is not None:
            self._events[parity].record()

    def _collect(self, parity: int, n: int) -> np.ndarray:
        if self._events is not None:
            t = time.perf_counter()
            self._events[parity].synchronize()
            self.stats["collect_wait_s"] += time.perf_counter() - t
        return self._tok_host[parity][:n].numpy().copy()

    def _admit(self, chunks: list[PrefillChunk], scheduler: Scheduler, constraint) -> np.ndarray:
        """Prefill each chunk into its slots and book its records' first tokens; returns the admitted slots."""
        for chunk in chunks:
            t0 = time.perf_counter()
            groups = None if self._group is None else chunk.groups
            logits = self._prefill(chunk.slots.tolist(), chunk.suffixes, groups)
            if constraint is not None:
                constraint.start(chunk.keys, chunk.budgets)
                constraint.mask_first(chunk.keys, logits, chunk.slots)
            first = logits.argmax(-1).cpu().numpy()
            if self.trace is not None:
                lengths = [len(s) for s in chunk.suffixes]
                self.trace.append((len(lengths), max(lengths), sum(lengths), time.perf_counter() - t0))
            self.stats["prefills"] += 1
            scheduler.take(chunk, first)
        return np.concatenate([chunk.slots for chunk in chunks])

    def _finished(self, scheduler: Scheduler, slots: np.ndarray, constraint):
        """Finish the rows that stopped (an EOS token) or ran out of budget or cache; free their slots."""
        for key, tokens, reason in scheduler.finish(slots):
            if constraint is not None:
                constraint.release(key)
            yield key, tokens, reason

    def _constrain(self, step: DecodeStep, scheduler: Scheduler, constraint):
        """Hand a step's rows (with the tokens they took in) to the constraint; returns its mask callable.
        Rows that finished at the step before (slot freed, or refilled) ran this step for nothing: the
        constraint skips them."""
        t = time.perf_counter()
        live = scheduler.live(step)
        apply = constraint.hook(scheduler.st.keys_of(live), scheduler.st.last[live], live)
        self.stats["mask_s"] += time.perf_counter() - t
        return lambda logits: apply(logits, step.rows)

    def _pick_masked(self, logits, parity: int, apply) -> None:
        """Mask a step's logits (waiting for the grammar work) and queue its argmax."""
        t = time.perf_counter()
        apply(logits)
        self._pick(logits, parity)
        self.stats["mask_s"] += time.perf_counter() - t
