"""A task's scoring spec turns an output object into a set of (class, key) facts.

fields: (field, value) for each value of each scored field, typed:
  - a string by its normalized text; empty text and the absent marker are no fact;
  - a number by its value (1 and 1.0 are one fact), a boolean by its value (true is not 1): `Scalar` keys;
  - a list element by element (a list of strings is the usual case);
  - an object flattened: each value under `field.key` (nested objects deeper: `field.key.sub`), so a
    structured field scores per subfield; the pairing of values across subfields is not checked (use the
    tuples kind where it matters);
  - null, or a missing key, is no fact.
tuples: (value of class_field, tuple of key_fields' values) for each item of a top-level array whose class is a
  string; each value typed as fields types it: a string by its normalized text, a number by its value (1 and 1.0
  are one), a boolean by its value (true is not 1), null or a missing key as empty text; a list or object by its
  canonical form (the same rules inside, keys in order): `slot_key`.
labels: (label, label) for each label of a top-level array.
Duplicates within a record count once (it is a set). An output whose top-level shape the kind cannot read (a
number where fields expects an object, say) is malformed: `FactExtractor.malformed` says so and the evaluator
counts it under its own status instead of scoring it as empty.

Each kind is a `FactKind` class registered by name; another package adds one through the entry-point group
`extractor.scoring_kinds` (`plugins.py`), and a task's `scoring.kind` then names it. The fields a spec names
must be properties of the task's schema (`tasks.task.check_scoring_fields`, called when a task loads).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from extractor.plugins import scoring_kind
from extractor.scoring.normalize import make_normalizer

@dataclass(frozen=True)
class Scalar:
    """A number or boolean fact key. Equal by value within its type: 1 == 1.0 (Python compares int and float
    exactly, and hashes them alike), while a boolean never equals a number (the type is part of the key)."""

    type: str  # "number", "boolean", or "value" (a list or object in a tuple: its canonical text)
    value: object

    def __str__(self) -> str:
        return self.value if self.type == "value" else json.dumps(self.value)


def scalar(value: bool | int | float) -> Scalar:
    if isinstance(value, bool):
        return Scalar("boolean", value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return Scalar("number", str(value))  # NaN never equals itself; its text does
        if value.is_integer():
            value = int(value)  # one display for 1 and 1.0 (they are one fact either way)
    return Scalar("number", value)


MAX_CANONICAL_DEPTH = 64  # a value nested deeper is keyed by its JSON text as written


def slot_key(value, norm):
    """One key field's value in a tuple fact: a string by its normalized text, a number or boolean as a
    `Scalar`, null (or a missing key) as empty text, a list or object as a `Scalar` of type "value" holding its
    canonical JSON text (strings normalized, numbers by value, object keys sorted)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return norm(value)
    if isinstance(value, (bool, int, float)):
        return scalar(value)
    try:
        text = json.dumps(_canonical(value, norm, 0), ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError):  # nested past what the encoder reads: equal to nothing
        text = f"<a value nested too deep to compare ({id(value):x})>"
    return Scalar("value", text)


def _canonical(value, norm, depth: int):
    if depth > MAX_CANONICAL_DEPTH:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str):
        return norm(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        key = scalar(value).value  # 1.0 as 1; json writes every float exactly
        return key if isinstance(key, (int, float)) else value  # NaN and infinities as themselves
    if isinstance(value, list):
        return [_canonical(x, norm, depth + 1) for x in value]
    if isinstance(value, dict):
        return {str(k): _canonical(x, norm, depth + 1) for k, x in value.items()}
    return repr(value)


class FactKind:
    """A scoring kind: built once per task from its scoring spec (`tasks.Scoring`), the normalizer and the
    normalized absent marker; called with each output object, it returns that object's set of facts.
    `needs`: the scoring spec's keys it cannot do without (checked when the task loads).
    `accepts`: whether an output has the top-level shape the kind reads (else it is malformed).
    `schema_fields`: the (spec key, field names) a schema must declare, and where in the schema."""

    needs: tuple[str, ...] = ()

    def __init__(self, spec, norm, absent):
        self.spec, self.norm, self.absent = spec, norm, absent

    def __call__(self, obj) -> set:
        raise NotImplementedError

    @staticmethod
    def accepts(obj) -> bool:
        return True

    @staticmethod
    def schema_fields(spec, schema) -> tuple[str, list[str], set[str] | None]:
        """(spec key, names it gives, the schema's property names or None when nothing is to be checked)."""
        return "", [], None


class FieldFacts(FactKind):
    needs = ("fields",)

    def __call__(self, obj) -> set:
        out = set()
        if not isinstance(obj, dict):
            return out
        for field in self.spec.fields or []:
            self._add(out, field, obj.get(field))
        return out

    def _add(self, out: set, field: str, value) -> None:
        """Facts of one value, walked with a stack: a hostile nesting depth cannot exhaust recursion."""
        stack = [(field, value)]
        while stack:
            cls, v = stack.pop()
            if isinstance(v, str):
                key = self.norm(v)
                if key and key != self.absent:
                    out.add((cls, key))
            elif isinstance(v, (bool, int, float)):
                out.add((cls, scalar(v)))
            elif isinstance(v, list):
                stack.extend((cls, x) for x in v)
            elif isinstance(v, dict):
                stack.extend((f"{cls}.{k}", x) for k, x in v.items())
            # None: no fact

    @staticmethod
    def accepts(obj) -> bool:
        return isinstance(obj, dict)

    @staticmethod
    def schema_fields(spec, schema):
        return "fields", list(spec.fields or []), _properties(schema)


class TupleFacts(FactKind):
    needs = ("class_field", "key_fields")

    def __call__(self, obj) -> set:
        out = set()
        if not isinstance(obj, list):
            return out
        class_field, key_fields = self.spec.class_field, self.spec.key_fields or []
        for item in obj:
            if not isinstance(item, dict) or not isinstance(item.get(class_field), str):
                continue
            key = tuple(slot_key(item.get(k), self.norm) for k in key_fields)
            out.add((item[class_field], key))
        return out

    @staticmethod
    def accepts(obj) -> bool:
        return isinstance(obj, list)

    @staticmethod
    def schema_fields(spec, schema):
        items = schema.get("items") if isinstance(schema, dict) else None
        names = [spec.class_field, *(spec.key_fields or [])]
        return "class_field/key_fields", [n for n in names if n], _properties(items)


class LabelFacts(FactKind):
    def __call__(self, obj) -> set:
        if isinstance(obj, str):
            obj = [obj]
        if not isinstance(obj, list):
            return set()
        return {(self.norm(x), self.norm(x)) for x in obj if isinstance(x, str) and self.norm(x)}

    @staticmethod
    def accepts(obj) -> bool:
        return isinstance(obj, (list, str))


def _properties(schema) -> set[str] | None:
    """Property names an object schema declares, its allOf/anyOf/oneOf branches included; None when the
    schema is no object schema (nothing to look fields up in)."""
    if not isinstance(schema, dict):
        return None
    names: set[str] = set()
    for part in [schema, *(b for k in ("allOf", "anyOf", "oneOf") for b in schema.get(k) or [])]:
        if isinstance(part, dict) and isinstance(part.get("properties"), dict):
            names.update(part["properties"])
    return names


class FactExtractor:
    def __init__(self, task):
        spec = task.spec.scoring
        self.kind = spec.kind
        self.norm = make_normalizer(spec.match, spec.strip_punctuation, spec.strip_book_title)
        marker = task.spec.absent_marker
        self.absent = self.norm(marker) if marker else None
        self._extract = scoring_kind(self.kind)(spec, self.norm, self.absent)

    def __call__(self, obj) -> set[tuple[str, object]]:
        if obj is None:
            return set()
        return self._extract(obj)

    def malformed(self, obj) -> bool:
        """An output the kind cannot read at all: null, or the wrong top-level shape."""
        return obj is None or not self._extract.accepts(obj)


def key_text(key) -> str:
    """A fact key as display text."""
    return " | ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def is_text(key) -> bool:
    """Whether a key is text (token overlap means something) rather than a number or boolean."""
    return not isinstance(key, Scalar)
