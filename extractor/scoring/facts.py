"""A task's scoring spec turns an output object into a set of (class, key) facts.

fields: (field, normalized value) for each value of each scored list field; the absent marker is no fact.
tuples: (value of class_field, tuple of normalized key_fields) for each item of a top-level array.
labels: (label, label) for each label of a top-level array.
Duplicates within a record count once (it is a set). Malformed shapes yield no facts for that part.

Each kind is a `FactKind` class registered by name; another package adds one through the entry-point group
`extractor.scoring_kinds` (`plugins.py`), and a task's `scoring.kind` then names it.
"""
from __future__ import annotations

from extractor import plugins
from extractor.scoring.normalize import make_normalizer

SCORING_KINDS = {
    "fields": "extractor.scoring.facts:FieldFacts",
    "tuples": "extractor.scoring.facts:TupleFacts",
    "labels": "extractor.scoring.facts:LabelFacts",
}

REGISTRY = plugins.Registry("extractor.scoring_kinds", "scoring kind", SCORING_KINDS)


def scoring_kind(name: str) -> type["FactKind"]:
    return REGISTRY.load(name)


class FactKind:
    """A scoring kind: built once per task from its scoring spec (`tasks.Scoring`), the normalizer and the
    normalized absent marker; called with each output object, it returns that object's set of facts.
    `needs`: the scoring spec's keys it cannot do without (checked when the task loads)."""

    needs: tuple[str, ...] = ()

    def __init__(self, spec, norm, absent):
        self.spec, self.norm, self.absent = spec, norm, absent

    def __call__(self, obj) -> set:
        raise NotImplementedError


class FieldFacts(FactKind):
    needs = ("fields",)

    def __call__(self, obj) -> set:
        out = set()
        if not isinstance(obj, dict):
            return out
        for field in self.spec.fields or []:
            values = obj.get(field)
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list):
                continue
            for v in values:
                if isinstance(v, str):
                    key = self.norm(v)
                    if key and key != self.absent:
                        out.add((field, key))
        return out


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
            key = tuple(self.norm(str(item.get(k, ""))) for k in key_fields)
            out.add((item[class_field], key))
        return out


class LabelFacts(FactKind):
    def __call__(self, obj) -> set:
        if isinstance(obj, str):
            obj = [obj]
        if not isinstance(obj, list):
            return set()
        return {(self.norm(x), self.norm(x)) for x in obj if isinstance(x, str) and self.norm(x)}


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


def key_text(key) -> str:
    """A fact key as display text."""
    return " | ".join(key) if isinstance(key, tuple) else str(key)
