"""A task's scoring spec turns an output object into a set of (class, key) facts.

fields: (field, normalized value) for each value of each scored list field; the absent marker is no fact.
tuples: (value of class_field, tuple of normalized key_fields) for each item of a top-level array.
labels: (label, label) for each label of a top-level array.
Duplicates within a record count once (it is a set). Malformed shapes yield no facts for that part.
"""
from __future__ import annotations

from extractor.scoring.normalize import make_normalizer


class FactExtractor:
    def __init__(self, task):
        spec = task.spec.scoring
        self.kind = spec.kind
        self.fields = spec.fields or []
        self.class_field = spec.class_field
        self.key_fields = spec.key_fields or []
        self.norm = make_normalizer(spec.match, spec.strip_punctuation, spec.strip_book_title)
        marker = task.spec.absent_marker
        self.absent = self.norm(marker) if marker else None
        self._extract = {"fields": self._fields, "tuples": self._tuples, "labels": self._labels}[self.kind]

    def __call__(self, obj) -> set[tuple[str, object]]:
        if obj is None:
            return set()
        return self._extract(obj)

    def _fields(self, obj) -> set:
        out = set()
        if not isinstance(obj, dict):
            return out
        for field in self.fields:
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

    def _tuples(self, obj) -> set:
        out = set()
        if not isinstance(obj, list):
            return out
        for item in obj:
            if not isinstance(item, dict) or not isinstance(item.get(self.class_field), str):
                continue
            key = tuple(self.norm(str(item.get(k, ""))) for k in self.key_fields)
            out.add((item[self.class_field], key))
        return out

    def _labels(self, obj) -> set:
        if isinstance(obj, str):
            obj = [obj]
        if not isinstance(obj, list):
            return set()
        return {(self.norm(x), self.norm(x)) for x in obj if isinstance(x, str) and self.norm(x)}


def key_text(key) -> str:
    """A fact key as display text."""
    return " | ".join(key) if isinstance(key, tuple) else str(key)
