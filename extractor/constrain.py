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
        # Closing starts when a row's remaining budget is about its closing cost plus the cost of one more
        # array item (a single token such as `},{` can add that much); costs are simulated only inside
        # the watch window, which bounds the cost from any state.
        deep = self.closing_cost(deep=True)
        self.item_cost = max(0, deep - self.closing_cost()) + 4
        self.watch_window = deep + self.item_cost + 16

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def closing_cost(self, matcher=None, scanner: "JsonScanner | None" = None, cap: int = 512,
                     deep: bool = False) -> int:
        """Tokens closing mode needs to finish a value from this state (simulated on a fork). With deep,
        every array first gets one item: an upper bound of the cost from states inside items."""
        sim = matcher.fork() if matcher is not None else self.matcher()
        scan = scanner.copy() if scanner is not None else JsonScanner()
        bitmask = self.allocate_bitmask(1)
        for step in range(cap):
            if sim.is_terminated():
                return step
            sim.fill_next_token_bitmask(bitmask, 0)
            allowed = unpack_bitmask_row(bitmask, 0, self.vocab_size)
            token = self._item_opener(allowed) if deep and scan.just_opened_array else None
            if token is None:
                token = self.closing_token(sim, allowed, scan)
            if token is None:  # the grammar needs content (e.g. an enum value): take any allowed token
                token = int(np.flatnonzero(allowed)[0])
            sim.accept_token(token)
            scan.feed(self.token_texts[token])
        return cap

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
        best, best_len = None, 0
        for i in self.closing_ids + self._prefix_ids(target[0]):
            text = self.token_texts[i]
            if len(text) > best_len and allowed[i] and target.startswith(text):
                best, best_len = i, len(text)
        return best

    def _prefix_ids(self, first: str) -> list[int]:
        if first not in self._by_first:
            self._by_first[first] = [i for i, t in enumerate(self.token_texts) if t[:1] == first]
        return self._by_first[first]


def _forced(matcher) -> str:
    try:
        return matcher.find_jump_forward_string()
    except UnicodeDecodeError:  # inside a multi-byte character: nothing forced yet
        return ""


class JsonScanner:
    """Tracks, from the generated text, whether we are inside a string and which brackets are open."""

    def __init__(self):
        self.in_string = False
        self.escape = False
        self.stack: list[str] = []
        self.just_opened_array = False

    def feed(self, text: str) -> None:
        for ch in text:
            self.just_opened_array = ch == "[" and not self.in_string
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.stack.append("]" if ch == "[" else "}")
            elif ch in "]}" and self.stack:
                self.stack.pop()

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
    __slots__ = ("matcher", "budget", "used", "tokens", "scanner", "closing", "next_check")

    def __init__(self, matcher, budget: int):
        self.matcher, self.budget, self.used = matcher, int(budget), 0
        self.tokens: list[int] = []
        self.scanner: JsonScanner | None = None  # built once the row nears its budget
        self.closing = False
        self.next_check = 0


class BatchConstraint:
    """Grammar masks for FastDecoder's packed rows: one matcher per record, masks filled in one batched
    xgrammar call (native threads) while the GPU runs the decode step, then closing mode as in
    SchemaLogitsProcessor. Closing costs are simulated only when a row could have to close soon: a token
    raises the cost by at most `item_cost`, so after a check the next one waits for the slack to run out."""

    def __init__(self, grammar: Grammar, threads="auto"):
        self.g = grammar
        self.batch = grammar.xgr.BatchGrammarMatcher(threads)
        self.rows: dict[int, _Row] = {}
        self.bitmask = None
        self.stats = {"cpu_s": 0.0, "cost_checks": 0}

    def start(self, requests, budgets) -> None:
        for r, b in zip(requests, budgets):
            self.rows[r] = _Row(self.g.matcher(), b)

    def release(self, request) -> None:
        self.rows.pop(request, None)

    def mask_first(self, requests, logits) -> None:
        self._mask([self.rows[r] for r in requests], logits)

    def hook(self, requests, last_tokens):
        """A callable for the decode step: accept each row's previous token, then mask the new logits."""
        rows = [self.rows[r] for r in requests]
        tokens = [int(t) for t in last_tokens]

        def apply(logits):
            import time
            t0 = time.perf_counter()
            self.batch.batch_accept_token([row.matcher for row in rows], tokens)
            for row, t in zip(rows, tokens):
                row.tokens.append(t)
                row.used += 1
                if row.scanner is not None:
                    row.scanner.feed(self.g.token_texts[t])
            self._mask(rows, logits, t0)
        return apply

    def _mask(self, rows: list[_Row], logits, t0: float | None = None) -> None:
        import time

        import torch
        t0 = t0 or time.perf_counter()
        if self.bitmask is None or self.bitmask.shape[0] < len(rows):
            self.bitmask = self.g.allocate_bitmask(max(len(rows), 64))
            if logits.device.type == "cuda":
                self.bitmask = self.bitmask.pin_memory()
        bitmask = self.bitmask[: len(rows)]
        self.batch.batch_fill_next_token_bitmask([row.matcher for row in rows], bitmask)
        forced = self._closing_tokens(rows, bitmask)
        self.stats["cpu_s"] += time.perf_counter() - t0
        self.g.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                               vocab_size=self.g.vocab_size)
        if forced:
            index = torch.tensor(list(forced), device=logits.device)
            logits[index] = torch.finfo(logits.dtype).min
            logits[index, torch.tensor(list(forced.values()), device=logits.device)] = 0

    def _closing_tokens(self, rows: list[_Row], bitmask) -> dict[int, int]:
        """Rows in closing mode and the token each must take."""
        forced: dict[int, int] = {}
        for i, row in enumerate(rows):
            remaining = row.budget - row.used
            if remaining > self.g.watch_window:
                continue
            if row.scanner is None:
                row.scanner = JsonScanner()
                row.scanner.feed("".join(self.g.token_texts[t] for t in row.tokens))
            if not row.closing and row.used >= row.next_check:
                self.stats["cost_checks"] += 1
                slack = remaining - self.g.closing_cost(row.matcher, row.scanner) - self.g.item_cost
                row.closing = slack <= 0
                row.next_check = row.used + max(1, slack // (self.g.item_cost + 1))
            if row.closing:
                allowed = unpack_bitmask_row(bitmask, i, self.g.vocab_size)
                token = self.g.closing_token(row.matcher, allowed, row.scanner)
                if token is not None:
                    forced[i] = token
        return forced
