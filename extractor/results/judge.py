"""Model output -> (prediction, status, error): first JSON value, bounded repair, schema validation.

Statuses: ok | repaired | invalid_json | schema_violation | truncated | error. The raw text is always
kept by the caller; this module never executes anything from the output.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from extractor.tasks.validation import Validator

OK, REPAIRED, INVALID_JSON, SCHEMA_VIOLATION, TRUNCATED, ERROR = (
    "ok", "repaired", "invalid_json", "schema_violation", "truncated", "error")
STATUSES = (OK, REPAIRED, INVALID_JSON, SCHEMA_VIOLATION, TRUNCATED, ERROR)
SCORED_STATUSES = (OK, REPAIRED)  # others score as an empty prediction

MAX_REPAIR_CHARS = 100_000  # repair is linear, but bounded so a huge output cannot stall a run
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.S)
_DECODER = json.JSONDecoder(strict=False)  # strict=False: raw control characters inside strings


@dataclass
class Parsed:
    prediction: object
    status: str
    error: str | None = None


def _candidates(text: str):
    """Where a JSON value may start: inside a ```json fence first, then the first { or [ of the text."""
    for match in _FENCE.finditer(text):
        body = match.group(1)
        start = _first_open(body)
        if start is not None:
            yield body[start:]
    start = _first_open(text)
    if start is not None:
        yield text[start:]


def _first_open(text: str) -> int | None:
    positions = [p for p in (text.find("{"), text.find("[")) if p >= 0]
    return min(positions) if positions else None


def _decode(text: str):
    try:
        value, _ = _DECODER.raw_decode(text)
        return value, True
    except (ValueError, RecursionError):
        return None, False


def parse_json(text: str) -> tuple[object, bool, bool]:
    """(value, found, repaired). found=False when no JSON value could be read, even after repair."""
    candidates = list(_candidates(text))
    for cand in candidates:
        value, ok = _decode(cand)
        if ok:
            return value, True, False
    for cand in candidates:
        fixed = repair(cand[:MAX_REPAIR_CHARS])
        if fixed is not None:
            value, ok = _decode(fixed)
            if ok:
                return value, True, True
    return None, False, False


def repair(text: str) -> str | None:
    """Fix single quotes, trailing commas and unclosed strings/brackets in one left-to-right pass."""
    out: list[str] = []
    stack: list[str] = []
    quote = None  # the quote char of the string we are in
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\" and i + 1 < n:
                out.append(text[i:i + 2])
                i += 2
                continue
            if ch == quote:
                quote = None
                out.append('"')
            elif ch == '"':  # a double quote inside a single-quoted string
                out.append('\\"')
            else:
                out.append(ch)
        elif ch in "\"'":
            quote = ch
            out.append('"')
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            out.append(ch)
        elif ch in "}]":
            _drop_trailing_comma(out)
            if not stack or stack[-1] != ch:
                return None  # mismatched bracket: not a truncation, do not guess
            stack.pop()
            out.append(ch)
            if not stack:
                break
        else:
            out.append(ch)
        i += 1
    if quote:
        out.append('"')
    _drop_dangling(out, bool(stack) and stack[-1] == "}")
    while stack:
        _drop_trailing_comma(out)
        out.append(stack.pop())
    return "".join(out)


def _drop_trailing_comma(out: list[str]) -> None:
    j = len(out) - 1
    while j >= 0 and out[j].isspace():
        j -= 1
    if j >= 0 and out[j] == ",":
        del out[j:]


_DANGLING_KEY = re.compile(r'([,{])\s*"(?:[^"\\]|\\.)*"\s*:?\s*$')


def _drop_dangling(out: list[str], in_object: bool) -> None:
    """A truncated `"key"` or `"key":` with no value cannot be closed sensibly: drop it."""
    text = "".join(out).rstrip()
    if in_object:
        m = _DANGLING_KEY.search(text)
        if m:
            text = text[: m.start()] + ("{" if m.group(1) == "{" else "")
    out[:] = list(text)


# What an output row can carry (JSONL through orjson, Parquet through JSON text): interoperable JSON (I-JSON,
# RFC 7493) within 64-bit integers. Python's json reads more than that; a value beyond it is withheld, with
# the reason, and the row keeps the raw text, so one model output cannot stop the writer.
MAX_DEPTH = 128  # nesting far beyond any extraction schema, and under orjson's limit (254 levels per row)
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def writable_text(text: str) -> str:
    """The text with each unpaired surrogate written as its `\\uXXXX` escape (UTF-8 cannot hold one)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def unwritable(value) -> str | None:
    """Why a parsed value cannot be written as an output row ('$.path: what'), or None. Iterative: a value
    nested as deep as the decoder allows is walked without recursion; each step keeps only a link to its
    parent's (the path is spelled out only for the one reported)."""
    stack = [(value, 0, None)]
    while stack:
        item, depth, trail = stack.pop()
        if depth > MAX_DEPTH:
            return f"{_path(trail)[:40]}...: nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, dict):
            for key, sub in item.items():
                if _SURROGATE.search(key):
                    return f'{_path(trail)}: key "{writable_text(key)[:60]}" holds an unpaired surrogate'
                stack.append((sub, depth + 1, (trail, key)))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1, (trail, i)) for i, sub in enumerate(item))
        else:
            problem = _scalar_problem(item)
            if problem:
                return f"{_path(trail)}: {problem}"
    return None


def _path(trail) -> str:
    """'$.key[0]' from the (parent, key) links `unwritable` keeps."""
    parts = []
    while trail is not None:
        trail, key = trail
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key[:60]}")
    return "$" + "".join(reversed(parts))


def _scalar_problem(item) -> str | None:
    if isinstance(item, bool) or item is None:
        return None
    if isinstance(item, int) and not _INT_MIN <= item <= _INT_MAX:
        digits = str(abs(item))
        shown = digits if len(digits) <= 30 else f"{digits[:12]}...({len(digits)} digits)"
        return f"integer {'-' if item < 0 else ''}{shown} does not fit in 64 bits"
    if isinstance(item, float) and (item != item or item in (float("inf"), float("-inf"))):
        return "NaN, Infinity or a number beyond a 64-bit float is not JSON"
    if isinstance(item, str) and _SURROGATE.search(item):
        return f'string "{writable_text(item)[:60]}" holds an unpaired surrogate'
    return None


# Keywords whose meaning is the same in draft-07 and 2020-12: schemas using only these are also checked
# by fastjsonschema's generated code (many times faster); jsonschema still writes every error message.
# `pattern` is left out: fastjsonschema runs it with `re`, unbounded, and a pattern meets model output.
def judge(text: str, finish_reason: str, validator: Validator) -> Parsed:
    """Turn one model output into a prediction and a status. The text judged is the one a row keeps
    (`writable_text`), so judging a row's raw again gives the same answer."""
    value, found, repaired = parse_json(writable_text(text))
    if not found:
        if finish_reason == "length":
            return Parsed(None, TRUNCATED, "output hit max-new-tokens before a complete JSON value")
        return Parsed(None, INVALID_JSON, "no JSON value found in the output")
    problem = unwritable(value)
    if problem is not None:
        return Parsed(None, INVALID_JSON, f"{problem}; not interoperable JSON (RFC 7493), so the prediction is "
                                          "withheld and the raw text kept")
    if repaired and finish_reason == "length":
        return Parsed(value, TRUNCATED, "output hit max-new-tokens; JSON was closed by repair")
    error = validator.first_error(value)
    if error is not None:
        return Parsed(value, SCHEMA_VIOLATION, error)
    return Parsed(value, REPAIRED if repaired else OK, None)
