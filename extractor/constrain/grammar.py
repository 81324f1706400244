"""A JSON schema compiled into an xgrammar grammar for one tokenizer, and the closing-mode logic on top.

xgrammar silently ignores schema keywords it cannot express (uniqueItems, multipleOf, not, if/then,
...), which would let "constrained" outputs violate the schema. So the schema is checked against an
allowlist first and refused at start with the keyword and its JSON path.

A random or weak model inside a grammar can wander until max-new-tokens and stop mid-value. Near the
end of the budget a constraint therefore switches to closing mode: it follows the grammar's forced
continuation (`find_jump_forward_string`) or picks the allowed token made only of closing characters,
so outputs finish as complete, valid JSON whenever the budget leaves room to close. The constraints that
use this: `backends/hf_constrain.py` (transformers' `generate`) and `batch.py` (the fast path's loop).
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
                json.dumps(int64_bounded(schema)), any_whitespace=False)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError variants
            raise TaskError(f"the task's schema cannot be compiled into a grammar ({exc}); "
                            "simplify it or run without --constrained") from None
        self.spec = (schema, tokenizer, vocab_size, list(stop_token_ids))  # what a worker process rebuilds it from
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
                if not text and not scan.in_string and sim.accept_string(","):  # as closing_token moves on
                    text = ","
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
        # Last: "," where closing is not allowed yet (an object still owes a required key, an array items):
        # inside a number nothing else ends it, and a model may write digits until the budget runs out.
        for target in (_forced(matcher), scanner.closing_text(), "" if scanner.in_string else ","):
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


INT64 = (-2 ** 63, 2 ** 63 - 1)


def int64_bounded(schema):
    """The schema with every integer held to 64 bits where it sets no bound of its own: an output's integers
    are written as 64-bit (orjson, Parquet), and an unbounded integer lets a model write digits for ever."""
    if isinstance(schema, list):
        return [int64_bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else int64_bounded(v) for k, v in schema.items()}
    types = out.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = INT64[0]
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INT64[1]
    return out


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
