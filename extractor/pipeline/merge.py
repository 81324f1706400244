"""One prediction from the predictions of a record's chunks (`--on-long chunk`), by the shape each value has
(the shape the schema gave it: every prediction merged here was validated against it):

- arrays: the union, in order of first appearance (chunk by chunk), an element dropped when an earlier one
  is equal after the task's normalisation (the scoring spec's `match`, as scoring compares values); the
  task's absent marker is kept only where no chunk found a value;
- objects: merged key by key (keys in order of first appearance), so an object's array fields are unions too;
- anything else (a string, number, boolean): the first value that is not null (nor the absent marker, which
  is kept only where no chunk found a value); the other chunks' values that differ from it after
  normalisation are a conflict, recorded under the value's path ("field", "field.sub"): every distinct value
  in order of first appearance, the kept one first. A value whose shape differs between chunks (an array in
  one, a string in another) is a scalar for this purpose.
"""
from __future__ import annotations

import json

from extractor.scoring.normalize import make_normalizer

_MISSING = object()  # a key this chunk's object does not have


class Merger:
    """Merges a task's chunk predictions; `merge` returns (prediction, conflicts)."""

    def __init__(self, task):
        spec = task.spec.scoring
        self.norm = make_normalizer(spec.match, spec.strip_punctuation, spec.strip_book_title)
        marker = task.spec.absent_marker
        self.absent = self.norm(marker) if marker else None

    def merge(self, predictions: list) -> tuple[object, dict[str, list]]:
        conflicts: dict[str, list] = {}
        merged = self._merge(predictions, "", conflicts)
        return (None if merged is _MISSING else merged), conflicts

    def key(self, value) -> str:
        """What two values are compared by: a string's normalised text, anything else its JSON with every
        string in it normalised (an object's keys sorted)."""
        if isinstance(value, str):
            return "s:" + self.norm(value)
        return "j:" + json.dumps(self._normalised(value), sort_keys=True, ensure_ascii=False)

    def _normalised(self, value):
        # Recursion is bounded: a prediction nested deeper than outputs.MAX_DEPTH never gets a scored status.
        if isinstance(value, str):
            return self.norm(value)
        if isinstance(value, list):
            return [self._normalised(v) for v in value]
        if isinstance(value, dict):
            return {k: self._normalised(v) for k, v in value.items()}
        return value

    def _is_absent(self, value) -> bool:
        return self.absent is not None and isinstance(value, str) and self.norm(value) == self.absent

    def _merge(self, values: list, path: str, conflicts: dict):
        present = [v for v in values if v is not _MISSING]
        if not present:
            return _MISSING
        if all(isinstance(v, list) for v in present):
            return self._union(present)
        if all(isinstance(v, dict) for v in present):
            keys = list(dict.fromkeys(k for v in present for k in v))
            return {k: self._merge([v.get(k, _MISSING) for v in present], f"{path}.{k}" if path else k, conflicts)
                    for k in keys}
        return self._first(present, path, conflicts)

    def _union(self, arrays: list[list]) -> list:
        out, seen, absent = [], set(), []
        for array in arrays:
            for item in array:
                if self._is_absent(item):
                    absent.append(item)
                    continue
                key = self.key(item)
                if key not in seen:
                    seen.add(key)
                    out.append(item)
        return out if out or not absent else absent[:1]

    def _first(self, values: list, path: str, conflicts: dict):
        found = [v for v in values if v is not None and not self._is_absent(v)]
        if not found:
            return next((v for v in values if v is not None), None)
        distinct, seen = [], set()
        for v in found:
            key = self.key(v)
            if key not in seen:
                seen.add(key)
                distinct.append(v)
        if len(distinct) > 1:
            conflicts[path or "$"] = distinct
        return distinct[0]
