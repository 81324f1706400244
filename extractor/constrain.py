"""JSON-Schema-constrained decoding with xgrammar.

xgrammar silently ignores schema keywords it cannot express (uniqueItems, multipleOf, not, if/then,
...), which would let "constrained" outputs violate the schema. So the schema is checked against an
allowlist first and refused at start with the keyword and its JSON path.

A random or weak model inside a grammar can wander until max-new-tokens and stop mid-value. Near the
end of the budget the processor therefore switches to closing mode: it follows the grammar's forced
continuation (`find_jump_forward_string`) or picks the allowed token made only of closing characters,
so outputs finish as complete, valid JSON whenever the budget leaves room to close.

Note: transformers' continuous batching (`generate_batch`) ignores `logits_processor`; this module is used
with `generate` and with the project's own decode loop.
"""
from __future__ import annotations

import json
import time

import numpy as np

from extractor.errors import TaskError

ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
               "readOnly", "writeOnly", "format"}  # format is an annotation in 2020-12 (not asserted)
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minLength",
             "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
CLOSING_CHARS = set('"]}')


def check_expressible(schema, path: str = "$") -> None:
    """Raise TaskError naming the first keyword the grammar engine cannot enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise TaskError(f"schema at {path} is not an object")
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in SUPPORTED:
            raise TaskError(f"schema keyword '{key}' at {path} cannot be enforced by constrained decoding "
                            "(xgrammar would ignore it); remove it from the schema or run without --constrained")
        if key in SUBSCHEMA_MAPS:
            for name, sub in value.items():
                check_expressible(sub, f"{path}.{key}.{name}")
        elif key in SUBSCHEMA_LISTS:
            for i, sub in enumerate(value):
                check_expressible(sub, f"{path}.{key}[{i}]")
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            check_expressible(value, f"{path}.{key}")


class Grammar:
    """A compiled schema grammar for one tokenizer, plus what closing mode needs to know of the vocab."""

    def __init__(self, schema: dict, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        check_expressible(schema)
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids)
        try:
            self.compiled = xgr.GrammarCompiler(self.info).compile_json_schema(
                json.dumps(schema), any_whitespace=False)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError variants
            raise TaskError(f"the task's schema cannot be compiled into a grammar ({exc}); "
                            "simplify it or run without --constrained") from None
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.token_texts = _token_texts(tokenizer, vocab_size)
        self.closing_ids = [i for i, t in enumerate(self.token_texts) if t and set(t) <= CLOSING_CHARS]
        self._by_first: dict[str, list[int]] = {}
        self._candidates: dict[str, list[int]] = {}
        self._init_string_fast_path(schema, set(tokenizer.all_special_ids) | set(self.info.special_token_ids))
        # Closing starts when a row's remaining budget is about its closing cost plus the cost of one more
        # array item (a single token such as `},{` can add that much); costs are simulated only inside
        # the watch window, which bounds the cost from any state.
        deep = self.closing_cost(deep=True)
        self.item_cost = max(0, deep - self.closing_cost()) + 4
        self.watch_window = deep + self.item_cost + 16

    @property
    def batch_accept(self):
        """xgrammar's batched accept without its wrapper: (matcher handles, tokens, debug) -> results."""
        from xgrammar.base import _core
        return _core.BatchGrammarMatcher.batch_accept_token

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def thread_pool(self):
        """Threads for batched matcher work (one pool per grammar, kept with it); None on 1-2 cores."""
        if not hasattr(self, "_pool"):
            import os
            from concurrent.futures import ThreadPoolExecutor
            workers = min(8, (os.cpu_count() or 1) - 1)
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="grammar") if workers >= 2 else None
        return self._pool

    def _init_string_fast_path(self, schema: dict, special: set) -> None:
        """What lets BatchConstraint skip the grammar inside free-form strings. A "safe" token is whole
        UTF-8 text with no quote, backslash or control byte: inside a string with no length, pattern
        or format limits, once the string may close, such a token leaves the grammar state (and so the
        mask) as it was. Schemas with those limits never take the fast path."""
        # Half-characters inside a free string: tokens made only of string content (no quote, backslash or
        # control byte) move the state to "inside a character, these bytes pending"; that state's mask is the
        # same in every free string as long as no token that finishes a character also closes the string.
        raw = list(self.info.decoded_vocab)
        self.token_bytes = [b if i not in special and i < len(raw) else b"" for i, b in enumerate(raw)]
        self.token_bytes += [b""] * (self.vocab_size - len(self.token_bytes))
        content = [bool(b) and not any(c in (0x22, 0x5C) or c < 0x20 for c in b) for b in self.token_bytes]
        self.content_ok = np.array(content)
        self.safe = self.content_ok & np.array([ok and utf8_tail(b) == b"" for b, ok in zip(self.token_bytes, content)])
        self.safe_words = np.packbits(np.pad(self.safe, (0, -len(self.safe) % 32)), bitorder="little").view("<i4")
        self.safe_cols = np.flatnonzero(self.safe_words)
        closes_after_char = any(b and 0x80 <= b[0] < 0xC0 and not ok for b, ok in zip(self.token_bytes, content))
        self.mid_masks: dict[bytes, np.ndarray] = {}  # pending bytes -> mask words (free strings only)
        quotes = [i for i, t in enumerate(self.token_texts) if t == '"']
        self.quote_id = quotes[0] if quotes else None
        self.free_strings = self.quote_id is not None and not _has_keyword(schema, {"maxLength", "pattern", "format"})
        self.mid_free = self.free_strings and not closes_after_char
        self.skeleton_exact = self.free_strings and not _has_keyword(schema, {"enum", "const", "anyOf", "oneOf",
                                                                              "minimum", "maximum",
                                                                              "exclusiveMinimum", "exclusiveMaximum"})
        self.min_cap = max([0] + _keyword_values(schema, "minLength"))
        self.cost_cache: dict = {}  # skeleton key -> closing cost (only where skeleton_exact)

    def closing_cost(self, matcher=None, scanner: "JsonScanner | None" = None, cap: int = 512,
                     deep: bool = False) -> int:
        """Tokens closing mode needs to finish a value from this state (simulated on a fork). With deep,
        every array first gets one item: an upper bound of the cost from states inside items."""
        if not deep:
            cost = self._closing_cost_text(matcher, scanner, cap)
            if cost is not None:
                return cost
        sim = matcher.fork() if matcher is not None else self.matcher()
        scan = scanner.copy() if scanner is not None else JsonScanner()
        bitmask = self.allocate_bitmask(1)
        words = bitmask[0].numpy()
        for step in range(cap):
            if sim.is_terminated():
                return step
            sim.fill_next_token_bitmask(bitmask, 0)
            allowed = PackedAllowed(words)  # bit tests on the few candidates, no unpacking of the vocab
            token = self._item_opener(allowed) if deep and scan.just_opened_array else None
            if token is None:
                token = self.closing_token(sim, allowed, scan)
            if token is None:  # the grammar needs content (e.g. an enum value): take any allowed token
                token = int(np.flatnonzero(unpack_bitmask_row(bitmask, 0, self.vocab_size))[0])
            sim.accept_token(token)
            scan.feed(self.token_texts[token])
        return cap

    def _closing_cost_text(self, matcher, scanner, cap: int) -> int | None:
        """closing_cost at the string level: the closing path is the grammar's forced text and the closing
        brackets, in turn; its tokens are counted as closing mode picks them (longest token that starts the
        text). About ten times cheaper than the token-level walk; None where the path needs content."""
        sim = matcher.fork() if matcher is not None else self.matcher()
        scan = scanner.copy() if scanner is not None else JsonScanner()
        tokens = 0
        while tokens < cap:
            if sim.is_terminated():
                return tokens
            if sim.is_completed():
                return tokens + 1  # the stop token
            text = _forced(sim)
            if text and not sim.accept_string(text):
                return None
            if not text:
                close = scan.closing_text()
                text = next((close[:k] for k in range(len(close), 0, -1) if sim.accept_string(close[:k])), "")
                if not text and scan.in_string:  # a string under its minimum length: one character more
                    text = next((c for c in "a0x" if sim.accept_string(c)), "")
                if not text and scan.in_string:  # inside a multi-byte character: one continuation byte
                    if any(sim.accept_string(b) for b in (b"\x80", b"\x90", b"\xa0")):
                        tokens += 1
                        continue
                if not text:
                    return None  # the grammar wants other content first (e.g. an enum value): walk tokens
            tokens += self._greedy_tokens(text)
            scan.feed(text)
        return cap

    def _greedy_tokens(self, text: str) -> int:
        n = pos = 0
        while pos < len(text):
            found = self._prefix_candidates(text[pos:])
            pos += len(self.token_texts[found[0]]) if found else 1
            n += 1
        return n

    def allocate_bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply_bitmask(self, scores, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device))

    def closing_token(self, matcher, allowed, scanner: "JsonScanner") -> int | None:
        """The token that moves this matcher fastest toward a complete value, or None to let the model pick:
        the grammar's forced continuation first, else the longest allowed prefix of the text that closes
        the open string and brackets."""
        if matcher.is_terminated():
            return None
        if matcher.is_completed():
            return self.stop_token_ids[0]
        for target in (_forced(matcher), scanner.closing_text()):
            if target:
                best = self._longest_prefix_token(target, allowed)
                if best is not None:
                    return best
        return None

    def _item_opener(self, allowed) -> int | None:
        for first in '{["':
            ids = [i for i in self._prefix_ids(first) if allowed[i] and len(self.token_texts[i]) == 1]
            if ids:
                return ids[0]
        return None

    def _longest_prefix_token(self, target: str, allowed) -> int | None:
        for i in self._prefix_candidates(target):
            if allowed[i]:
                return i
        return None

    def _prefix_candidates(self, target: str) -> list[int]:
        """Token ids whose text starts `target`, longest first (targets repeat: keys, closing brackets)."""
        found = self._candidates.get(target)
        if found is None:
            ids = {i for i in self.closing_ids + self._prefix_ids(target[0]) if target.startswith(self.token_texts[i])}
            found = sorted(ids, key=lambda i: (-len(self.token_texts[i]), i))
            if len(self._candidates) < 4096:
                self._candidates[target] = found
        return found

    def _prefix_ids(self, first: str) -> list[int]:
        if first not in self._by_first:
            self._by_first[first] = [i for i, t in enumerate(self.token_texts) if t[:1] == first]
        return self._by_first[first]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def utf8_tail(data: bytes) -> bytes | None:
    """The bytes of an unfinished last character (b"" on a character boundary); None if not UTF-8."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return decoder.getstate()[0]


def utf8_missing(pending: bytes) -> int:
    """Continuation bytes still owed by an unfinished character."""
    if not pending:
        return 0
    lead = pending[0]
    size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return size - len(pending)


def _has_keyword(schema, names: set) -> bool:
    if isinstance(schema, dict):
        return any(k in names for k in schema) or any(_has_keyword(v, names) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_keyword(v, names) for v in schema)
    return False


def _keyword_values(schema, name: str) -> list:
    found = []
    if isinstance(schema, dict):
        if isinstance(schema.get(name), int):
            found.append(schema[name])
        for v in schema.values():
            found += _keyword_values(v, name)
    elif isinstance(schema, list):
        for v in schema:
            found += _keyword_values(v, name)
    return found


def _forced(matcher) -> str:
    try:
        return matcher.find_jump_forward_string()
    except UnicodeDecodeError:  # inside a multi-byte character: nothing forced yet
        return ""


class JsonScanner:
    """Tracks, from the generated text, whether we are inside a string and which brackets are open.

    With `skeleton=True` it also keeps the output's skeleton: the text outside strings and the text of object
    keys, with other strings' contents dropped (only their length up to `min_cap` kept). Where the schema
    leaves strings free and never branches on content (Grammar.skeleton_exact), the skeleton fixes the
    grammar state, so rows with equal skeletons share closing costs."""

    def __init__(self, skeleton: bool = False, min_cap: int = 0):
        self.in_string = False
        self.escape = False
        self.stack: list[str] = []
        self.just_opened_array = False
        self.track = skeleton
        self.skeleton = ""
        self.in_key = False
        self.str_len = 0
        self.min_cap = min_cap
        self.clean = True  # False after a token that ends inside a multi-byte character

    def feed(self, text: str) -> None:
        track = self.track
        out: list[str] = []
        if track:
            self.clean = "\ufffd" not in text
        for ch in text:
            self.just_opened_array = ch == "[" and not self.in_string
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if track:
                        out.append('"')
                    continue
                if track:
                    if self.in_key:
                        out.append(ch)
                    else:
                        self.str_len = min(self.str_len + 1, self.min_cap)
            elif ch == '"':
                if track:
                    before = (self.skeleton + "".join(out)).rstrip(" ")
                    self.in_key = bool(self.stack) and self.stack[-1] == "}" and before[-1:] in ("{", ",")
                    self.str_len = 0
                    out.append('"')
                self.in_string = True
            else:
                if track:
                    out.append(ch)
                if ch in "[{":
                    self.stack.append("]" if ch == "[" else "}")
                elif ch in "]}" and self.stack:
                    self.stack.pop()
        if out:
            self.skeleton += "".join(out)

    def key(self):
        return self.skeleton, self.in_string, self.escape, self.str_len

    def copy(self) -> "JsonScanner":
        other = JsonScanner()
        other.in_string, other.escape, other.stack = self.in_string, self.escape, list(self.stack)
        other.just_opened_array = self.just_opened_array
        return other

    def closing_text(self) -> str:
        return ('"' if self.in_string else "") + "".join(reversed(self.stack))


def _token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Decoded text of every token id (empty past the tokenizer's own size: padding rows)."""
    n = min(vocab_size, len(tokenizer))
    return tokenizer.batch_decode([[i] for i in range(n)]) + [""] * (vocab_size - n)


class PackedAllowed:
    """`allowed[i]` over xgrammar's packed bitmask row (bit i of word w: token 32w+i)."""
    __slots__ = ("words",)

    def __init__(self, words):
        self.words = words

    def __getitem__(self, i: int) -> bool:
        return bool((int(self.words[i >> 5]) >> (i & 31)) & 1)


def unpack_bitmask_row(bitmask, row: int, vocab_size: int) -> np.ndarray:
    """A bool array over the vocab from xgrammar's packed int32 bitmask (bit i of word w: token 32w+i)."""
    words = bitmask[row].numpy().astype("<i4", copy=False)
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class SchemaLogitsProcessor:
    """A transformers LogitsProcessor for one `generate` call: the grammar mask per row, then closing
    mode for a row once its remaining budget is about what closing its open value costs."""

    def __init__(self, grammar: Grammar, max_new_tokens: int):
        self.grammar = grammar
        self.max_new_tokens = max_new_tokens
        self.matchers = None
        self.scanners = None
        self.closing = None
        self.bitmask = None
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        rows = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [self.grammar.matcher() for _ in range(rows)]
            self.scanners = [JsonScanner() for _ in range(rows)]
            self.closing = [False] * rows
            self.bitmask = self.grammar.allocate_bitmask(rows)
            self.prompt_len = input_ids.shape[1]
        else:
            for i, m in enumerate(self.matchers):
                if not m.is_terminated():
                    token = int(input_ids[i, -1])
                    m.accept_token(token)
                    self.scanners[i].feed(self.grammar.token_texts[token])
        remaining = self.max_new_tokens - (input_ids.shape[1] - self.prompt_len)
        for i, m in enumerate(self.matchers):
            if not m.is_terminated():
                m.fill_next_token_bitmask(self.bitmask, i)
        work = scores if scores.device.type in ("cuda", "cpu") else scores.cpu()
        self.grammar.apply_bitmask(work, self.bitmask)
        if remaining <= self.grammar.watch_window:
            self._close(work, remaining)
        return work.to(scores.device)

    def _close(self, work, remaining: int) -> None:
        import torch
        for i, m in enumerate(self.matchers):
            if m.is_terminated():
                continue
            if not self.closing[i]:
                cost = self.grammar.closing_cost(m, self.scanners[i])
                self.closing[i] = remaining <= cost + self.grammar.item_cost
            if self.closing[i]:
                allowed = unpack_bitmask_row(self.bitmask, i, self.grammar.vocab_size)
                token = self.grammar.closing_token(m, allowed, self.scanners[i])
                if token is not None:
                    work[i] = torch.finfo(work.dtype).min
                    work[i, token] = 0


class _Row:
    """One record's grammar state inside a BatchConstraint."""
    __slots__ = ("matcher", "budget", "used", "tokens", "scanner", "closing", "next_check", "fast",
                 "deferred", "fast_cost", "pending", "mid")

    def __init__(self, matcher, budget: int):
        self.matcher, self.budget, self.used = matcher, int(budget), 0
        self.tokens: list[int] = []
        self.scanner: JsonScanner | None = None  # built once the row nears its budget
        self.closing = False
        self.next_check = 0
        self.fast = False  # inside a free string: the mask is the cached one, tokens wait in `deferred`
        self.deferred: list[int] = []
        self.fast_cost: int | None = None  # closing cost from inside this string (the same all along it)
        self.pending = b""  # bytes of an unfinished character (fast rows only)
        self.mid: int | None = None  # row of the mid-character mask table in use, if pending


class BatchConstraint:
    """Grammar masks for FastDecoder's packed rows, kept per cache slot on the GPU.

    Each step, rows whose new token is ordinary text inside a free-form string keep their mask (the grammar
    state does not change: see Grammar._init_string_fast_path) and only queue the token for their matcher;
    the other rows accept their tokens and get new masks in one batched xgrammar call. Only changed mask
    rows travel to the GPU. Closing mode is SchemaLogitsProcessor's: a row closes once its remaining budget
    is about its closing cost plus one array item. Costs are simulated only when a row could have to close
    soon: a token raises the cost by at most `item_cost`, so after a check the next one waits for the slack
    to run out, and inside a free string the cost is computed once."""

    def __init__(self, grammar: Grammar, threads="auto"):
        self.g = grammar
        self.batch = grammar.xgr.BatchGrammarMatcher(threads)
        self.pool = grammar.thread_pool()
        self.rows: dict = {}
        self.host = self.device_table = None
        self.mid_table = None
        self.mid_rows: dict[bytes, int] = {}
        self._index_bufs = [None] * 8
        self.stats = {"cpu_s": 0.0, "thread_s": 0.0, "cost_checks": 0, "fills": 0, "fast_tokens": 0}

    def start(self, requests, budgets) -> None:
        for r, b in zip(requests, budgets):
            self.rows[r] = _Row(self.g.matcher(), b)

    def release(self, request) -> None:
        self.rows.pop(request, None)

    def mask_first(self, requests, logits, slots) -> None:
        """Masks for newly admitted records' first tokens (logits in the order of `requests`)."""
        t0 = _clock()
        rows = [self.rows[r] for r in requests]
        self._table(len(slots) and int(max(slots)) + 1, logits.device)
        self._fill(rows, [int(s) for s in slots])
        self._apply(rows, [int(s) for s in slots], logits, t0)

    def hook(self, requests, last_tokens, slots):
        """A callable for the decode step: take in each row's previous token, then mask the new logits."""
        rows = [self.rows[r] for r in requests]
        tokens = [int(t) for t in last_tokens]
        slots = [int(s) for s in slots]

        def apply(logits):
            t0 = _clock()
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
                        row.mid = self._mid_index(pending) if pending else None
                        if pending and row.mid is None:
                            mid_todo.append(row)
                        if row.scanner is not None and row.scanner.str_len < row.scanner.min_cap:
                            row.scanner.feed(self.g.token_texts[t])
                        continue
                self._flush(row)
                row.fast, row.fast_cost, row.pending, row.mid = False, None, b"", None
                accept_m.append(row.matcher)
                accept_t.append(t)
                if row.scanner is not None:
                    row.scanner.feed(self.g.token_texts[t])
                refill_rows.append(row)
                refill_slots.append(slot)
            t = self._phase("rows_s", t0[0])
            self._learn_mid_masks(mid_todo, logits.device)
            self.stats["fast_tokens"] += len(rows) - len(refill_rows)
            t = self._phase("mid_s", t)
            self._accept(accept_m, accept_t)
            t = self._phase("accept_s", t)
            self._table(max(slots) + 1, logits.device)
            self._fill(refill_rows, refill_slots)
            self._phase("fill_s", t)
            self._apply(rows, slots, logits, t0)
        return apply

    def _phase(self, name: str, since: float) -> float:
        """Add the time since `since` to stats[name] (where the hook's CPU time goes); returns now."""
        now = time.perf_counter()
        self.stats[name] = self.stats.get(name, 0.0) + now - since
        return now

    def _accept(self, matchers: list, tokens: list[int]) -> None:
        """batch_accept_token, in chunks on a thread pool where there are cores for one (on the H100 machine
        the accepts measured barely faster than one thread's: the call seems to hold the GIL). The core call
        is used directly: the wrapper converts its per-row results (unused here) one by one."""
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

    # -- masks -----------------------------------------------------------------------------------------
    def _table(self, slots: int, device) -> None:
        """Host (pinned) and device mask tables with a row per cache slot."""
        import torch
        if self.host is not None and self.host.shape[0] >= slots:
            return
        rows = max(slots, 64, 0 if self.host is None else 2 * self.host.shape[0])
        self.cuda = device.type == "cuda"
        host = self.g.allocate_bitmask(rows)
        self.host = host.pin_memory() if self.cuda else host
        self.staging = self.host.clone().pin_memory() if self.cuda else self.host.clone()
        self.device_table = self.host.to(device)

    def _to_device(self, values: list[int], device):
        """A small index tensor on the device without waiting for the GPU: staged in a pinned buffer (one of
        a ring, so a copy still in flight is never overwritten) and copied asynchronously."""
        import torch
        t = torch.from_numpy(np.asarray(values, dtype=np.int64))
        if not self.cuda:
            return t
        self._ring = (getattr(self, "_ring", -1) + 1) % 8
        buf = self._index_bufs[self._ring]
        if buf is None or buf.shape[0] < len(values):
            buf = self._index_bufs[self._ring] = torch.empty(max(len(values), 1024), dtype=torch.long).pin_memory()
        buf[: len(values)] = t
        return buf[: len(values)].to(device, non_blocking=True)

    def _pinned(self, array: np.ndarray):
        """A host copy the GPU can read asynchronously (a pageable copy would wait for the step in flight)."""
        import torch
        t = torch.from_numpy(array)
        return t.pin_memory() if self.cuda else t

    def _fill(self, rows: list[_Row], slots: list[int]) -> None:
        """New masks for these rows (written in their slots' rows), sent to the device table; a row whose
        mask admits every safe token and a closing quote is inside a free string: its fast path starts."""
        import torch
        if not rows:
            return
        self.stats["fills"] += len(rows)
        self.batch.batch_fill_next_token_bitmask([r.matcher for r in rows], self.host, slots)
        staged = self.staging[: len(slots)]
        torch.index_select(self.host, 0, torch.from_numpy(np.asarray(slots, dtype=np.int64)), out=staged)
        device = self.device_table.device
        self.device_table.index_copy_(0, self._to_device(slots, device), staged.to(device, non_blocking=True))
        if self.g.free_strings:
            host, cols, q = self.host.numpy(), self.g.safe_cols, self.g.quote_id
            words = host[np.asarray(slots)[:, None], cols]  # only the words holding safe tokens
            in_free = ((words & self.g.safe_words[cols]) == self.g.safe_words[cols]).all(axis=1) & \
                (((host[slots, q >> 5] >> (q & 31)) & 1) == 1)
            for row, fast in zip(rows, in_free.tolist()):
                row.fast, row.pending, row.mid = fast, b"", None

    def _apply(self, rows: list[_Row], slots: list[int], logits, t0: tuple[float, float]) -> None:
        import torch
        t = time.perf_counter()
        forced = self._closing_tokens(rows, slots)
        self._phase("closing_s", t)
        now = _clock()
        self.stats["cpu_s"] += now[0] - t0[0]
        self.stats["thread_s"] += now[1] - t0[1]  # this thread's own CPU: the rest is waiting (GIL, pool)
        index = self._to_device(slots, logits.device)
        masks = self.device_table.index_select(0, index)
        mids = [(i, row.mid) for i, row in enumerate(rows) if row.mid is not None]
        if mids:
            at = self._to_device([i for i, _ in mids], logits.device)
            masks[at] = self.mid_table.index_select(0, self._to_device([m for _, m in mids], logits.device))
        self.g.xgr.apply_token_bitmask_inplace(logits, masks, vocab_size=self.g.vocab_size)
        if forced:
            at = self._to_device(list(forced), logits.device)
            logits[at] = torch.finfo(logits.dtype).min
            logits[at, self._to_device(list(forced.values()), logits.device)] = 0

    def _flush(self, row: _Row) -> None:
        """Give the matcher the tokens it skipped inside a string (their bytes, in one call)."""
        if row.deferred:
            row.matcher.accept_string(b"".join(self.g.token_bytes[t] for t in row.deferred))
            row.deferred.clear()

    def _mid_index(self, pending: bytes) -> int | None:
        """The mid-character mask table's row for these pending bytes, copied up from the grammar's cache."""
        index = self.mid_rows.get(pending)
        if index is None and pending in self.g.mid_masks:
            import torch
            index = len(self.mid_rows)
            if self.mid_table is None or index >= self.mid_table.shape[0]:
                grown = torch.zeros((max(64, 2 * index), self.host.shape[1]), dtype=self.host.dtype,
                                    device=self.device_table.device)
                if self.mid_table is not None:
                    grown[: self.mid_table.shape[0]] = self.mid_table
                self.mid_table = grown
            self.mid_table[index].copy_(self._pinned(self.g.mid_masks[pending]), non_blocking=True)
            self.mid_rows[pending] = index
        return index

    def _learn_mid_masks(self, rows: list[_Row], device) -> None:
        """Rows in a half-character state not seen yet: bring their matchers up to date and keep the mask."""
        for row in rows:
            if row.pending in self.g.mid_masks:
                row.mid = self._mid_index(row.pending)
                continue
            self._flush(row)
            scratch = self.g.allocate_bitmask(1)
            row.matcher.fill_next_token_bitmask(scratch, 0)
            self.stats["fills"] += 1
            self.g.mid_masks[row.pending] = scratch[0].numpy().copy()
            row.mid = self._mid_index(row.pending)

    # -- closing mode --------------------------------------------------------------------------------------
    def _closing_tokens(self, rows: list[_Row], slots: list[int]) -> dict[int, int]:
        """Rows (positions in `rows`) in closing mode and the token each must take."""
        forced: dict[int, int] = {}
        for i, row in enumerate(rows):
            remaining = row.budget - row.used
            if remaining > self.g.watch_window:
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
                        self._fill([row], [slots[i]])
                    row.fast, row.pending, row.mid = False, b"", None
                token = self.g.closing_token(row.matcher, PackedAllowed(self.host[slots[i]].numpy()), row.scanner)
                if token is not None:
                    forced[i] = token
        return forced

    def _cost(self, row: _Row) -> int | None:
        """The row's closing cost, or None where the slack since the last check cannot have run out."""
        if row.fast and row.fast_cost is not None:
            return row.fast_cost + utf8_missing(row.pending)
        key = row.scanner.key() if self.g.skeleton_exact and row.scanner.clean else None
        if key is not None and key in self.g.cost_cache:
            self.stats["cost_cached"] = self.stats.get("cost_cached", 0) + 1
            return self.g.cost_cache[key]
        if row.used < row.next_check and not row.fast:
            return None
        self._flush(row)
        self.stats["cost_checks"] += 1
        cost = self.g.closing_cost(row.matcher, row.scanner)
        if key is not None and len(self.g.cost_cache) < 100_000:
            self.g.cost_cache[key] = cost
        if row.fast and not row.pending:
            row.fast_cost = cost
        slack = row.budget - row.used - cost - self.g.item_cost
        row.next_check = row.used + max(1, slack // (self.g.item_cost + 1))
        return cost
