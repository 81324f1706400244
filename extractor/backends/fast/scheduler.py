"""Which records enter which slots and when, which rows decode, and when a record is done: the decisions of one
`FastDecoder.stream` call, made as plain data the decoder executes (numpy only: no model, no device).

A step's decision comes in two parts, because the second depends on what the first's prefill returns (a
record's first token may be its EOS): `admissions()` says which waiting records are prefilled into which free
slots, in which chunks (`PrefillChunk`); after those chunks' first tokens are booked, `decode_step()` says
which rows run the next decode step, at which cache positions, with which input tokens (`DecodeStep`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefillChunk:
    """Records prefilled together in one pass: `items[i]`, a (key, suffix, budget) or (key, suffix, budget,
    adapter group) item, enters slot `slots[i]`; suffixes in ascending length (little padding)."""
    slots: np.ndarray
    items: list

    @property
    def keys(self) -> list:
        return [it[0] for it in self.items]

    @property
    def suffixes(self) -> list[list[int]]:
        return [it[1] for it in self.items]

    @property
    def budgets(self) -> list:
        return [it[2] for it in self.items]

    @property
    def groups(self) -> list[int]:
        return [it[3] for it in self.items]


@dataclass(frozen=True)
class DecodeStep:
    """One decode step for `rows` (slots): each writes its cache position `own` and takes `last` as its input
    token unless it ran the step before (then that step's output, on the device); `group`: each row's adapter
    group. `keys`: the record each row held at launch, so a token coming back for a row whose slot was freed
    and refilled since is dropped."""
    rows: np.ndarray
    keys: np.ndarray
    own: np.ndarray
    last: np.ndarray
    group: np.ndarray


def chunk_size(lengths: list[int], prefill_tokens: int) -> int:
    """How many of these (ascending) suffixes the next prefill chunk takes: at most `prefill_tokens`
    padded tokens; once it holds a few thousand (enough for the matmuls to run at full rate) it also
    stops before padding passes 4%, since padding is computed like real tokens."""
    take, real = 1, lengths[0]
    while take < len(lengths) and lengths[take] * (take + 1) <= prefill_tokens:
        padded = lengths[take] * (take + 1)
        if padded >= prefill_tokens * 3 // 8 and padded - real - lengths[take] > 0.04 * padded:
            break
        real += lengths[take]
        take += 1
    return take


class SlotState:
    """Per-slot bookkeeping as numpy arrays, so a step's updates are vectorized over the live rows."""

    def __init__(self, slots: int):
        self.key_index = np.full(slots, -1)  # index into self.keys of the record in each slot (-1: free)
        self.keys: dict[int, object] = {}
        self._next = 0
        self.own = np.zeros(slots, np.int64)    # tokens in the slot's cache
        self.count = np.zeros(slots, np.int64)  # tokens generated
        self.last = np.zeros(slots, np.int64)
        self.budget = np.zeros(slots, np.int64)
        self.group = np.zeros(slots, np.int64)  # adapter group (mixed adapters; else 0)
        self.out = np.zeros((slots, 64), np.int64)

    def take(self, slots: np.ndarray, chunk, first: np.ndarray, groups: list[int] | None = None) -> None:
        need = max(int(it[2]) for it in chunk)
        if need > self.out.shape[1]:
            self.out = np.concatenate([self.out, np.zeros((len(self.out), need - self.out.shape[1]), np.int64)], 1)
        for s, it in zip(slots.tolist(), chunk):
            self.keys[self._next] = it[0]
            self.key_index[s] = self._next
            self._next += 1
        self.own[slots] = [len(it[1]) for it in chunk]
        self.budget[slots] = [int(it[2]) for it in chunk]
        self.count[slots] = 1
        self.last[slots] = first
        self.out[slots, 0] = first
        if groups is not None:
            self.group[slots] = groups

    def record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Book one decoded token for each of these slots."""
        self.out[slots, self.count[slots]] = tokens
        self.count[slots] += 1
        self.own[slots] += 1
        self.last[slots] = tokens

    def keys_of(self, slots: np.ndarray) -> list:
        return [self.keys[i] for i in self.key_index[slots].tolist()]

    def free(self, slot: int) -> None:
        del self.keys[int(self.key_index[slot])]
        self.key_index[slot] = -1


class Scheduler:
    """The slots of one stream of records. Records are pulled from `source` only while fewer than `lookahead`
    wait; admitted first come first served once `refill` slots are free (or all are, or all waiting records
    fit); each runs until its EOS, its budget or the end of its slot (`unique_len` positions).
    `groups`: the decoder's adapter group count (mixed adapters; None: items carry no group)."""

    def __init__(self, source, slots: int, unique_len: int, prefill_tokens: int, eos: np.ndarray,
                 groups: int | None, refill: int, lookahead: int):
        self.source, self.slots, self.unique_len = source, slots, unique_len
        self.prefill_tokens, self.eos, self.groups = prefill_tokens, eos, groups
        self.refill, self.lookahead = refill, lookahead
        self.waiting: deque = deque()
        self.exhausted = False
        self.st = SlotState(slots)
        self.launched = np.zeros(slots, np.int64)  # tokens each row will hold once its launched steps are read
        self.next_own = np.zeros(slots, np.int64)  # cache position the row's next launched step writes

    def top_up(self) -> None:
        """Pull records until `lookahead` wait or the source is exhausted."""
        while not self.exhausted and len(self.waiting) < self.lookahead:
            item = next(self.source, None)
            if item is None:
                self.exhausted = True
                return
            self._check_fits(item)
            self.waiting.append(item)

    def _check_fits(self, item) -> None:
        if self.groups is not None and not (len(item) == 4 and 0 <= item[3] < self.groups):
            raise ValueError(f"record {item[0]}: a decoder with {self.groups} adapter groups takes (key, suffix, "
                             "budget, group) items")
        if len(item[1]) + int(item[2]) > self.unique_len:
            raise ValueError(f"record {item[0]}: {len(item[1])} tokens plus a budget of {item[2]} exceed the "
                             f"decoder's unique_len {self.unique_len}")

    def admissions(self) -> list[PrefillChunk]:
        """The records to prefill now (taken off the waiting queue), in chunks of at most `prefill_tokens`
        padded tokens, sorted by length; none until enough slots are free."""
        free = np.flatnonzero(self.st.key_index < 0)
        if not self.waiting or not (len(free) >= min(self.refill, len(self.waiting)) or len(free) == self.slots):
            return []
        batch = sorted((self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))),
                       key=lambda it: len(it[1]))
        chunks, at = [], 0
        while batch:
            take = chunk_size([len(it[1]) for it in batch[:self.prefill_tokens]], self.prefill_tokens)
            chunks.append(PrefillChunk(free[at: at + take], batch[:take]))
            batch, at = batch[take:], at + take
        return chunks

    def take(self, chunk: PrefillChunk, first: np.ndarray) -> None:
        """A prefilled chunk's records hold their slots, each with its first token."""
        self.st.take(chunk.slots, chunk.items, first, None if self.groups is None else chunk.groups)
        self.launched[chunk.slots] = 1
        self.next_own[chunk.slots] = self.st.own[chunk.slots]

    def decode_step(self) -> DecodeStep | None:
        """The rows that run the next decode step (holding a record, with budget left after their launched
        steps, and room in their slot), marked launched; None when no row does."""
        st = self.st
        rows = np.flatnonzero((st.key_index >= 0) & (self.launched < st.budget) & (self.next_own < self.unique_len))
        if not len(rows):
            return None
        step = DecodeStep(rows, st.key_index[rows].copy(), self.next_own[rows], st.last[rows], st.group[rows])
        self.launched[rows] += 1
        self.next_own[rows] += 1
        return step

    def live(self, step: DecodeStep) -> np.ndarray:
        """The step's rows that still hold the record they ran for."""
        return step.rows[self.st.key_index[step.rows] == step.keys]

    def book(self, step: DecodeStep, tokens: np.ndarray) -> np.ndarray:
        """A step's tokens, read back, for the rows still holding their record; returns those rows."""
        same = self.st.key_index[step.rows] == step.keys
        self.st.record(step.rows[same], tokens[same])
        return step.rows[same]

    def finish(self, slots: np.ndarray):
        """The records of these slots that stopped (an EOS token) or ran out of budget or cache, as (key,
        tokens, finish_reason); each slot is freed once its record is taken."""
        st = self.st
        toks = st.last[slots]
        stop = np.isin(toks, self.eos)
        length = ~stop & ((st.count[slots] >= st.budget[slots]) | (st.own[slots] >= self.unique_len))
        done = stop | length
        for s, is_stop in zip(slots[done].tolist(), stop[done].tolist()):
            yield st.keys[st.key_index[s]], st.out[s, : st.count[s]].tolist(), "stop" if is_stop else "length"
            st.free(s)

    def idle(self) -> bool:
        """Nothing waits, the source is exhausted and no slot holds a record."""
        return not self.waiting and self.exhausted and not (self.st.key_index >= 0).any()
