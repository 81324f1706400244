"""Grounding: where each extracted value occurs in its record's source text, in time linear in the text.

Which values: the string values the task's scoring spec scores — kind `fields`: every string under each
scored field (list elements one by one, an object's values under `field.key`); kind `tuples`: every key field
other than the class field (a predicate names a relation, not a span of text); kind `labels` (and plugin kinds):
none, a label is a class, not text. Empty strings and the task's absent marker are no value, as in scoring.
Numbers and booleans are not grounded: a number's text form ("3") occurs by chance in most postings, and
a model may rightly compute one (a sum, a year) that the text spells otherwise, so its rate would mislead.

How each value is found in the text, and the offsets a span holds: `alignment.py`. A value found nowhere gets
start/end/match null; when it also equals (by key) a value of the task's few-shot outputs, it is flagged
`copied_from_prompt`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from extractor.scoring.alignment import MATCHES, Aligner, Span
from extractor.scoring.facts import FactExtractor


class Grounder:
    """A task's grounding: which values an output holds (`values`), their spans in a text (`ground`), and per
    distinct (field, scoring key) whether any was grounded (`summarize`, also over spans read from a file)."""

    def __init__(self, task):
        spec = self.spec = task.spec.scoring
        self.kind = spec.kind
        self.facts = FactExtractor(task)
        strip = spec.strip_punctuation + ("《》" if spec.strip_book_title else "")
        self.aligner = Aligner(strip)
        self.fields = list(spec.fields or []) if self.kind == "fields" else (
            [k for k in spec.key_fields or [] if k != spec.class_field] if self.kind == "tuples" else [])
        self.prompt_keys = self._prompt_keys(task)

    @property
    def active(self) -> bool:
        """Whether this task has any value to ground (kind labels, or a plugin kind: none)."""
        return bool(self.fields)

    def _prompt_keys(self, task) -> frozenset[str]:
        keys = set()
        for shot in task.spec.few_shot:
            keys.update(self.aligner.key(v) for _, v in self.values(shot.output))
        keys.discard("")
        return frozenset(keys)

    def _is_value(self, v) -> bool:
        if not isinstance(v, str):
            return False
        key = self.facts.norm(v)
        return bool(key) and key != self.facts.absent

    def values(self, obj) -> Iterator[tuple[str, str]]:
        """(field, value) for each string value to ground, in the output's order."""
        if self.kind == "fields" and isinstance(obj, dict):
            for field in self.fields:
                value = obj.get(field)
                if isinstance(value, list) and all(type(v) is str for v in value):  # the usual shape
                    yield from ((field, v) for v in value if self._is_value(v))
                else:
                    yield from self._walk(field, value)
        elif self.kind == "tuples" and isinstance(obj, list):
            cf = self.spec.class_field
            for item in obj:
                if isinstance(item, dict) and isinstance(item.get(cf), str):
                    for field in self.fields:
                        if self._is_value(item.get(field)):
                            yield field, item[field]

    def _walk(self, field: str, value) -> Iterator[tuple[str, str]]:
        """Depth first, in order, with a stack: a hostile nesting depth cannot exhaust recursion."""
        stack = [(field, value)]
        while stack:
            cls, v = stack.pop()
            if isinstance(v, str):
                if self._is_value(v):
                    yield cls, v
            elif isinstance(v, list):
                stack.extend((cls, x) for x in reversed(v))
            elif isinstance(v, dict):
                stack.extend((f"{cls}.{k}", x) for k, x in reversed(list(v.items())))

    def ground(self, text: str, obj) -> dict[str, list[dict]]:
        """The row's `spans`: per field, one entry per value in order (see the module's docstring)."""
        spans: dict[str, list[dict]] = {}
        if not isinstance(text, str):
            return spans
        t = self.aligner.text(text)
        found: dict[str, Span | None] = {}
        for field, value in self.values(obj):
            if value not in found:
                found[value] = self.aligner.locate(t, value)
            spans.setdefault(field, []).append(self._entry(value, found[value]))
        return spans

    def _entry(self, value: str, span: Span | None) -> dict:
        if span is not None:
            return {"value": value, "start": span.start, "end": span.end, "match": span.match}
        entry = {"value": value, "start": None, "end": None, "match": None}
        if self.aligner.key(value) in self.prompt_keys:
            entry["copied_from_prompt"] = True
        return entry

    def locate(self, text: str, value: str) -> Span | None:
        return self.aligner.locate(self.aligner.text(text), value)

    def from_spans(self, obj, spans: dict) -> dict[str, list[dict]]:
        """Spans read with a row, fitted to the output's values now (after --reparse they may be stale): each
        value takes the row's entry for it, or none found."""
        given = {(f, e["value"]): e for f, entries in spans.items() for e in entries}
        out: dict[str, list[dict]] = {}
        for field, value in self.values(obj):
            e = given.get((field, value))
            out.setdefault(field, []).append(e if e is not None else self._entry(value, None))
        return out

    def locate_fact(self, fact, text: str) -> list[Span]:
        """Where a scored fact (class, key) shows in a text: a field value's key, or each grounded part of a
        tuple; numbers and booleans are not looked for."""
        cls, key = fact
        t = self.aligner.text(text)
        if self.kind == "fields" and isinstance(key, str):
            parts = [key]
        elif self.kind == "tuples" and isinstance(key, tuple):
            key_fields = self.spec.key_fields or []
            parts = [key[i] for i, k in enumerate(key_fields)
                     if k in self.fields and i < len(key) and isinstance(key[i], str) and key[i]]
        else:
            return []
        found = (self.aligner.locate(t, p) for p in parts)
        return sorted(s for s in found if s is not None)

    def summarize(self, spans: dict) -> tuple[dict[tuple[str, object], "Grounded"], dict[tuple[str, object], str]]:
        """Per distinct (field, scoring key) in one record: whether any of its values was grounded, and how;
        and one value as written for each."""
        out: dict[tuple[str, object], Grounded] = {}
        written: dict[tuple[str, object], str] = {}
        for field, entries in spans.items():
            for entry in entries:
                key = (field, self.facts.norm(entry["value"]))
                g = Grounded(entry["match"], bool(entry.get("copied_from_prompt")))
                old = out.get(key)
                if old is None or (old.match is None and g.match is not None):
                    out[key] = g
                    written.setdefault(key, entry["value"])
        return out, written

    def grounded_facts(self, facts: set, summary: dict) -> dict:
        """Each predicted fact -> grounded or not: a field value by its own key; a tuple when every grounded
        field of it (subject, object) was found."""
        if self.kind == "fields":
            return {f: (f in summary and summary[f].match is not None) for f in facts}
        if self.kind != "tuples":
            return {}
        key_fields = self.spec.key_fields or []
        where = [(i, k) for i, k in enumerate(key_fields) if k in self.fields]
        out = {}
        for cls, key in facts:
            hits = [summary.get((k, key[i])) for i, k in where]
            out[(cls, key)] = bool(hits) and all(h is not None and h.match is not None for h in hits)
        return out


@dataclass(frozen=True)
class Grounded:
    match: str | None
    copied: bool


def check_spans(spans, where: str) -> dict:
    """A `spans` object read from a file, checked: {field: [{value: str, match: kind|null, ...}]}; else a
    ValueError naming what is wrong."""
    if not isinstance(spans, dict):
        raise ValueError(f"{where}: spans must be an object of field -> list, got {type(spans).__name__}")
    for field, entries in spans.items():
        if not isinstance(entries, list):
            raise ValueError(f"{where}: spans.{field} must be a list, got {type(entries).__name__}")
        for i, e in enumerate(entries):
            if (not isinstance(e, dict) or not isinstance(e.get("value"), str)
                    or (e.get("match") is not None and e.get("match") not in MATCHES)):
                raise ValueError(f"{where}: spans.{field}[{i}] must be {{value: string, start, end, match: "
                                 f"{'|'.join(MATCHES)}|null}}")
    return spans
