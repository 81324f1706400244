"""Schema regexes (`pattern`, `patternProperties`) checked under a time limit per record.

A schema's pattern meets model output, and a pattern such as `^(a+)+$` backtracks for ages on the wrong
string. Here every pattern runs in the `regex` engine with a timeout drawn from one budget per record
(`record_budget`), releasing the GIL meanwhile; running out raises PatternTimeout, which the validator turns
into that record's error. `BoundedValidator` is jsonschema's 2020-12 validator with the three keywords that
run patterns (pattern, patternProperties, additionalProperties) replaced by bounded ones.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from functools import lru_cache

PATTERN_SECONDS = 1.0  # all pattern checks of one record together

_state = threading.local()


class PatternTimeout(Exception):
    """A pattern check ran out of its record's time budget."""

    def __init__(self, pattern: str):
        shown = pattern if len(pattern) <= 80 else pattern[:80] + "…"
        super().__init__(f"pattern check exceeded its time limit ({PATTERN_SECONDS:g} s per record) for "
                         f"pattern {shown!r}")


@contextmanager
def record_budget(seconds: float = PATTERN_SECONDS):
    """Every pattern check inside shares `seconds` (one record's validation)."""
    previous = getattr(_state, "deadline", None)
    _state.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _state.deadline = previous


@lru_cache(maxsize=4096)
def _compiled(pattern: str):
    import regex
    return regex.compile(pattern)


def search(pattern: str, text: str) -> bool:
    """re.search semantics (jsonschema's), bounded by the current record's budget."""
    deadline = getattr(_state, "deadline", None)
    left = PATTERN_SECONDS if deadline is None else deadline - time.monotonic()
    if left <= 0:
        raise PatternTimeout(pattern)
    try:
        return _compiled(pattern).search(text, timeout=left, concurrent=True) is not None
    except TimeoutError:
        raise PatternTimeout(pattern) from None


def _pattern(validator, patrn, instance, schema):
    from jsonschema.exceptions import ValidationError
    if validator.is_type(instance, "string") and not search(patrn, instance):
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            if search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    # jsonschema's own, but matching patternProperties through `search` (its helper uses `re`).
    from jsonschema.exceptions import ValidationError
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties and not any(search(p, k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(each) for each in sorted(extras, key=str))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(f"{joined} {verb} not match any of the regexes: "
                                  f"{', '.join(repr(p) for p in sorted(patterns))}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({joined} {verb} unexpected)")


@lru_cache(maxsize=1)
def bounded_validator_class():
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend
    return extend(Draft202012Validator, {"pattern": _pattern, "patternProperties": _pattern_properties,
                                         "additionalProperties": _additional_properties})
