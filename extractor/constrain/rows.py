"""The host side of batched constrained decoding: each row's grammar state and its mask, written into a
host table with one row per cache slot. No device work here: BatchConstraint (batch.py) uploads
and applies the masks, with this engine in its own process or one engine per worker process
(workers.py), so that the rows' Python and xgrammar work runs in parallel.

Each step, rows whose new token is ordinary text inside a free-form string keep their mask (the grammar
state does not change: see Grammar._init_string_fast_path) and only queue the token for their matcher;
the other rows accept their tokens and get new masks in one batched xgrammar call. Closing mode is
SchemaLogitsProcessor's (backends/hf_constrain.py): a row closes once its remaining budget is about its
closing cost plus one array item. Costs are simulated only when a row could have to close soon: a token
raises the cost by at most `item_cost`, so after a check the next one waits for the slack to run out, and
inside a free string the cost is computed once."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from extractor.constrain.grammar import Grammar, JsonScanner, PackedAllowed, utf8_missing, utf8_tail


class StepMasks(NamedTuple):
    """What one step changed, for the device side: host table rows to upload, slots whose mask is a
    mid-character one (pending bytes), mid-character masks this engine has not announced yet, and the
    token each closing row must take."""
    changed: list      # slots whose host table row was refilled (ascending, each once)
    mids: list         # (slot, pending bytes)
    new_mids: dict     # pending bytes -> mask words
    forced: dict       # slot -> token


class _Row:
    """One record's grammar state."""
    __slots__ = ("matcher", "budget", "used", "tokens", "scanner", "closing", "next_check", "fast",
                 "deferred", "fast_cost", "pending", "watch")

    def __init__(self, matcher, budget: int, watch: int):
        self.matcher, self.budget, self.used = matcher, int(budget), 0
        self.watch = watch  # remaining budget at which closing-cost checks start
        self.tokens: list[int] = []
        self.scanner: JsonScanner | None = None  # built once the row nears its budget
        self.closing = False
        self.next_check = 0
        self.fast = False  # inside a free string: the mask is the cached one, tokens wait in `deferred`
        self.deferred: list[int] = []
        self.fast_cost: int | None = None  # closing cost from inside this string (the same all along it)
        self.pending = b""  # bytes of an unfinished character (fast rows only): its mask is a mid mask


class RowEngine:
    """Grammar state of the rows one process owns; masks go to `host` ([rows, words] int32, numpy)."""

    def __init__(self, grammar: Grammar, threads="auto", pool=None):
        self.g = grammar
        self.batch = grammar.xgr.BatchGrammarMatcher(threads)
        self.pool = pool
        self.host: np.ndarray | None = None
        self._host_t = None  # the same memory as a torch tensor, for xgrammar
        self.rows: dict = {}
        self.announced: set = set()  # mid-character masks already sent to the device side
        self.started = 0
        self.stats = _fresh_stats()

    def grow_table(self, rows: int, words: int) -> None:
        """A host mask table of `rows` rows, the rows already held copied over."""
        import torch
        table = np.full((rows, words), -1, dtype=np.int32)
        if self.host is not None and self.host.shape[1] == words:
            table[: self.host.shape[0]] = self.host
        self.host, self._host_t = table, torch.from_numpy(table)

    def reset(self) -> None:
        self.rows.clear()
        self.announced.clear()
        self.stats = _fresh_stats()

    def start(self, requests, budgets) -> None:
        """Rows with equal budgets (a whole batch) would all reach the watch window, build their scanners
        and simulate their closing costs at the same step: a step many times longer than the others, the
        GPU waiting on it. Each row starts watching up to STAGGER steps early instead (a check started
        early changes no token: until the cost can catch up with the budget no row closes)."""
        for r, b in zip(requests, budgets):
            self.rows[r] = _Row(self.g.matcher(), b, self.g.watch_window + self.started % STAGGER)
            self.started += 1

    def release(self, request) -> None:
        self.rows.pop(request, None)

    def first(self, requests, slots) -> StepMasks:
        """Masks for newly started rows' first tokens."""
        t0 = _clock()
        rows = [self.rows[r] for r in requests]
        changed: list[int] = []
        self._fill(rows, slots, changed)
        return self._finish(rows, slots, changed, t0)

    def step(self, requests, tokens, slots) -> StepMasks:
        """Take in each row's previous token, then mask its next one."""
        t0 = _clock()
        rows = [self.rows[r] for r in requests]
        refill_rows, refill_slots, accept_m, accept_t, mid_todo = [], [], [], [], []
        safe, content_ok, mid_free = self.g.safe, self.g.content_ok, self.g.mid_free
        for row, t, slot in zip(rows, tokens, slots):
            row.tokens.append(t)
            row.used += 1
            if row.fast and (safe[t] or (mid_free and content_ok[t])):
                pending = b"" if safe[t] and not row.pending else utf8_tail(row.pending + self.g.token_bytes[t])
                if pending is not None:
                    row.deferred.append(t)
                    row.pending = pending
                    if pending and pending not in self.g.mid_masks:
                        mid_todo.append(row)
                    if row.scanner is not None and row.scanner.str_len < row.scanner.min_cap:
                        row.scanner.feed(self.g.token_texts[t])
                    continue
            self._flush(row)
            row.fast, row.fast_cost, row.pending = False, None, b""
            accept_m.append(row.matcher)
            accept_t.append(t)
            if row.scanner is not None:
                row.scanner.feed(self.g.token_texts[t])
            refill_rows.append(row)
            refill_slots.append(slot)
        t = self._phase("rows_s", t0[0])
        self._learn_mid_masks(mid_todo)
        self.stats["fast_tokens"] += len(rows) - len(refill_rows)
        t = self._phase("mid_s", t)
        self._accept(accept_m, accept_t)
        t = self._phase("accept_s", t)
        changed: list[int] = []
        self._fill(refill_rows, refill_slots, changed)
        self._phase("fill_s", t)
        return self._finish(rows, slots, changed, t0)

    def _finish(self, rows: list[_Row], slots, changed: list[int], t0) -> StepMasks:
        t = time.perf_counter()
        forced = self._closing_tokens(rows, slots, changed)
        self._phase("closing_s", t)
        mids = [(slot, row.pending) for row, slot in zip(rows, slots) if row.pending]
        new_mids = {p: self.g.mid_masks[p] for _, p in mids if p not in self.announced}
        self.announced.update(new_mids)
        now = _clock()
        self.stats["cpu_s"] += now[0] - t0[0]
        self.stats["thread_s"] += now[1] - t0[1]  # this thread's own CPU: the rest is waiting (GIL, pool)
        return StepMasks(sorted(set(changed)), mids, new_mids, forced)  # a row filled twice is uploaded once

    def _phase(self, name: str, since: float) -> float:
        """Add the time since `since` to stats[name] (where the step's CPU time goes); returns now."""
        now = time.perf_counter()
        self.stats[name] = self.stats.get(name, 0.0) + now - since
        return now

    def _accept(self, matchers: list, tokens: list[int]) -> None:
        """batch_accept_token, in chunks on a thread pool where one was given (grammar work in the main
        process); worker processes pass none. The core call is used directly: the wrapper converts its per-row
        results (unused here) one by one."""
        accept = self.g.batch_accept
        chunk = 64
        if len(matchers) <= chunk or self.pool is None:
            if matchers:
                accept([m._handle for m in matchers], tokens, False)
            return
        handles = [m._handle for m in matchers]
        parts = [(handles[i:i + chunk], tokens[i:i + chunk]) for i in range(0, len(handles), chunk)]
        for future in [self.pool.submit(accept, h, t, False) for h, t in parts]:
            future.result()

    def _fill(self, rows: list[_Row], slots, changed: list[int]) -> None:
        """New masks for these rows, written in their slots' host rows; a row whose mask admits every safe
        token and a closing quote is inside a free string: its fast path starts."""
        if not rows:
            return
        slots = [int(s) for s in slots]
        self.stats["fills"] += len(rows)
        self.batch.batch_fill_next_token_bitmask([r.matcher for r in rows], self._host_t, slots)
        changed.extend(slots)
        if self.g.free_strings:
            host, cols, q = self.host, self.g.safe_cols, self.g.quote_id
            words = host[np.asarray(slots)[:, None], cols]  # only the words holding safe tokens
            in_free = ((words & self.g.safe_words[cols]) == self.g.safe_words[cols]).all(axis=1) & \
                (((host[slots, q >> 5] >> (q & 31)) & 1) == 1)
            for row, fast in zip(rows, in_free.tolist()):
                row.fast, row.pending = fast, b""

    def _flush(self, row: _Row) -> None:
        """Give the matcher the tokens it skipped inside a string (their bytes, in one call)."""
        if row.deferred:
            row.matcher.accept_string(b"".join(self.g.token_bytes[t] for t in row.deferred))
            row.deferred.clear()

    def _learn_mid_masks(self, rows: list[_Row]) -> None:
        """Rows in a half-character state not seen yet: bring their matchers up to date, keep the mask."""
        for row in rows:
            if row.pending in self.g.mid_masks:
                continue
            self._flush(row)
            scratch = self.g.allocate_bitmask(1)
            row.matcher.fill_next_token_bitmask(scratch, 0)
            self.stats["fills"] += 1
            self.g.mid_masks[row.pending] = scratch[0].numpy().copy()

    # -- closing mode --------------------------------------------------------------------------------------
    def _closing_tokens(self, rows: list[_Row], slots, changed: list[int]) -> dict[int, int]:
        """Slots of the rows in closing mode and the token each must take."""
        forced: dict[int, int] = {}
        for row, slot in zip(rows, slots):
            remaining = row.budget - row.used
            if remaining > row.watch:
                continue
            if row.scanner is None:
                row.scanner = JsonScanner(skeleton=True, min_cap=self.g.min_cap)
                for t in row.tokens:
                    row.scanner.feed(self.g.token_texts[t])
            if not row.closing:
                cost = self._cost(row)
                if cost is None:
                    continue
                row.closing = remaining <= cost + self.g.item_cost
            if row.closing:
                if row.fast:  # leave the fast path: the matcher and this row's mask become exact again
                    self._flush(row)
                    if row.pending:
                        self._fill([row], [slot], changed)
                    row.fast, row.pending = False, b""
                token = self.g.closing_token(row.matcher, PackedAllowed(self.host[int(slot)]), row.scanner)
                if token is not None:
                    forced[int(slot)] = token
        return forced

    def _cost(self, row: _Row) -> int | None:
        """The row's closing cost, or None where the slack since the last check cannot have run out."""
        if row.fast and row.fast_cost is not None:
            return row.fast_cost + utf8_missing(row.pending)
        key = row.scanner.key() if self.g.skeleton_exact and row.scanner.clean else None
        if key is not None and key in self.g.cost_cache:
            self.stats["cost_cached"] += 1
            return self.g.cost_cache[key]
        if row.used < row.next_check and not row.fast:
            return None
        self._flush(row)
        self.stats["cost_checks"] += 1
        # A cost of at least the remaining budget means "close now" whatever it is: the simulation stops
        # there (a value it cannot close in time walks up to 512 tokens otherwise: ~0.1 s). Only exact
        # costs are kept.
        cap = max(1, row.budget - row.used)
        cost = self.g.closing_cost(row.matcher, row.scanner, cap=cap)
        if cost < cap and key is not None and len(self.g.cost_cache) < 100_000:
            self.g.cost_cache[key] = cost
        if cost < cap and row.fast and not row.pending:
            row.fast_cost = cost
        slack = row.budget - row.used - cost - self.g.item_cost
        row.next_check = row.used + max(1, slack // (self.g.item_cost + 1))
        return cost


STAGGER = 24  # steps over which rows of one batch spread their first closing-cost checks


def _fresh_stats() -> dict:
    return {"cpu_s": 0.0, "thread_s": 0.0, "cost_checks": 0, "cost_cached": 0, "fills": 0, "fast_tokens": 0,
            "rows_s": 0.0, "mid_s": 0.0, "accept_s": 0.0, "fill_s": 0.0, "closing_s": 0.0}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()
