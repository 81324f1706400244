"""What a report needs for error analysis, beyond the counts: wrong values as (predicted, expected) pairs,
the records they came from with their text, the records whose output failed, with its raw text.

Pairs: within one record and one class, each false positive is paired with the false negative it overlaps
most (token-overlap F1, ties in key order), greedily; a number or boolean overlaps nothing but still pairs
(salary 51000 for 50000 is one wrong value). What is left over on either side stays a plain false positive or
false negative. Pairing only presents errors: the TP/FP/FN counts are not changed by it.

Everything kept here is bounded: records per class and per status, characters of raw output and of text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from extractor.scoring.facts import key_text, scalar
from extractor.scoring.metrics import ConfusionMatrix

RECORDS_PER_CLASS = 20  # error records kept for each class (a record counts for every class it errs in)
RECORDS_PER_STATUS = 20  # failed records kept with their raw output, per status
RAW_CHARS = 4000  # raw output kept per failed record
ERROR_CHARS = 500
CONTEXT_CHARS = 60
HEAD_CHARS = 300  # text shown for a record where no value was found in it
MAX_WINDOW_CHARS = 1500
MAX_SCORED_PAIRS = 4096  # fp × fn overlap scores computed per class and record; beyond, pairs in key order


@dataclass(frozen=True)
class ErrorItem:
    """One error of a record: a wrong value (both sides), a false positive (expected None) or a false negative
    (predicted None). Sides are fact keys."""

    cls: str
    predicted: object = None
    expected: object = None

    @property
    def kind(self) -> str:
        if self.predicted is not None and self.expected is not None:
            return "wrong"
        return "fp" if self.predicted is not None else "fn"

    def as_dict(self) -> dict:
        side = lambda k: None if k is None else key_text(k)  # noqa: E731
        return {"class": self.cls, "kind": self.kind, "predicted": side(self.predicted),
                "expected": side(self.expected)}


def pair_errors(fps: set, fns: set, overlap) -> list[ErrorItem]:
    """A record's errors, wrong values paired (see the module's docstring), in class then key order.
    overlap(a, b): token-overlap F1 of two display texts."""
    by_class: dict[str, tuple[list, list]] = {}
    for cls, key in fps:
        by_class.setdefault(cls, ([], []))[0].append(key)
    for cls, key in fns:
        by_class.setdefault(cls, ([], []))[1].append(key)
    items: list[ErrorItem] = []
    for cls in sorted(by_class):
        preds, golds = (sorted(keys, key=_order) for keys in by_class[cls])
        items += _pair_class(cls, preds, golds, overlap)
    return items


def _order(key) -> tuple[str, str]:
    return type(key).__name__, key_text(key)


def _pair_class(cls: str, preds: list, golds: list, overlap) -> list[ErrorItem]:
    if len(preds) * len(golds) > MAX_SCORED_PAIRS:
        scored = [(0.0, i, i) for i in range(min(len(preds), len(golds)))]
    else:
        scored = sorted(((-overlap(key_text(p), key_text(g)), i, j) for i, p in enumerate(preds)
                         for j, g in enumerate(golds)))
    used_p, used_g, items = set(), set(), []
    for _, i, j in scored:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            items.append(ErrorItem(cls, preds[i], golds[j]))
    items += [ErrorItem(cls, predicted=p) for i, p in enumerate(preds) if i not in used_p]
    items += [ErrorItem(cls, expected=g) for j, g in enumerate(golds) if j not in used_g]
    return items


def text_window(text: str, marks: list[dict]) -> tuple[str, int, list[dict]]:
    """The part of a record's text that holds its marks (with some context on each side), at most
    MAX_WINDOW_CHARS long; the marks inside it, as offsets into the window. marks: {start, end, ...}."""
    if not marks:
        return text[:HEAD_CHARS], 0, []
    first = min(m["start"] for m in marks)
    last = max(m["end"] for m in marks)
    start = max(0, first - CONTEXT_CHARS)
    end = min(len(text), max(last + CONTEXT_CHARS, start + HEAD_CHARS), start + MAX_WINDOW_CHARS)
    inside = [{**m, "start": m["start"] - start, "end": min(m["end"], end) - start}
              for m in marks if start <= m["start"] < end]
    return text[start:end], start, sorted(inside, key=lambda m: (m["start"], m["end"]))


@dataclass
class ErrorRecords:
    """Records with errors, each kept while one of its classes (or its failed status) has room: the record's
    status, its errors and its text with every value located in it."""

    per_class: int = RECORDS_PER_CLASS
    kept: list[dict] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # records met per class / per failed status
    total: int = 0  # records with any error

    def wants(self, classes: set[str], status: str | None) -> bool:
        """Whether a record erring in these classes (and, failed, with this status) is kept; counts it."""
        self.total += 1
        keys = classes | ({f"status:{status}"} if status else set())
        room = [k for k in keys if self.seen.get(k, 0) < self.per_class]
        for k in keys:
            self.seen[k] = self.seen.get(k, 0) + 1
        return bool(room)

    def add(self, rid: str, status: str, error: str | None, items: list[ErrorItem], text: str | None,
            locate) -> None:
        """locate(fact): the spans of a (class, key) fact in the text."""
        marks = []
        if text:
            for n, item in enumerate(items):
                for role, key in (("pred", item.predicted), ("gold", item.expected)):
                    if key is not None:
                        marks += [{"start": s.start, "end": s.end, "match": s.match, "role": role, "item": n}
                                  for s in locate((item.cls, key), text)]
        window, start, inside = text_window(text or "", marks)
        self.kept.append({"id": rid, "status": status, "error": _cut(error, ERROR_CHARS),
                          "errors": [i.as_dict() for i in items], "has_text": bool(text), "snippet": window,
                          "snippet_start": start, "highlights": inside})

    def result(self) -> dict:
        return {"records_with_errors": self.total, "shown": len(self.kept), "per_class": self.per_class,
                "records": self.kept}


@dataclass
class FailedRecords:
    """Records whose output could not be scored (invalid JSON, truncated, schema violation, error, malformed),
    per status: how many, and the first few with their raw output and the parser's error."""

    per_status: int = RECORDS_PER_STATUS
    by_status: dict[str, dict] = field(default_factory=dict)

    def add(self, rid: str, status: str, raw: str | None, error: str | None, prediction=None) -> None:
        entry = self.by_status.setdefault(status, {"count": 0, "records": []})
        entry["count"] += 1
        if len(entry["records"]) < self.per_status:
            raw = raw if isinstance(raw, str) else ""
            entry["records"].append({"id": rid, "error": _cut(error, ERROR_CHARS), "raw": raw[:RAW_CHARS],
                                     "raw_chars": len(raw), "prediction_type": _type_name(prediction)})

    def result(self) -> dict:
        return dict(sorted(self.by_status.items()))


def _cut(text, limit: int):
    return text[:limit] if isinstance(text, str) else None


def _type_name(value) -> str | None:
    if value is None:
        return None
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


def categorical_fields(task, norm) -> dict[str, list[str]]:
    """The scored fields (kind `fields`) whose schema is an enum or a boolean, or an array of them: field ->
    its labels as scoring keys show them (the enum normalized as facts are; booleans true, false)."""
    spec = task.spec.scoring
    if spec.kind != "fields":
        return {}
    props = _properties(task.schema, task.schema)
    out = {}
    for name in spec.fields or []:
        prop = _resolve(props.get(name), task.schema)
        if isinstance(prop, dict) and "array" in _types(prop):
            prop = _resolve(prop.get("items"), task.schema)
        labels = _labels(prop, task.schema, norm)
        if labels is not None:
            out[name] = labels
    return out


def _labels(prop, root: dict, norm) -> list[str] | None:
    """An enum's or a boolean's labels; None for anything else. null among them is the "(none)" label."""
    if not isinstance(prop, dict):
        return None
    if isinstance(prop.get("enum"), list):
        return _label_texts(prop["enum"], norm)
    if "const" in prop:
        return _label_texts([prop["const"]], norm)
    types = _types(prop) - {"null"}
    if types == {"boolean"}:
        return ["true", "false"]
    branches = prop.get("anyOf") or prop.get("oneOf")
    if types or not isinstance(branches, list):
        return None
    labels: list[str] = []
    for b in branches:
        b = _resolve(b, root)
        if isinstance(b, dict) and _types(b) == {"null"} and "enum" not in b:
            continue
        sub = _labels(b, root, norm)
        if sub is None:
            return None
        labels += sub
    return labels or None


def _label_texts(values: list, norm) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, str):
            v = norm(v)
            if v:
                out.append(v)
        elif v is not None:
            out.append(key_text(scalar(v)) if isinstance(v, (bool, int, float)) else str(v))
    return list(dict.fromkeys(out))


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()


def _properties(schema, root: dict) -> dict:
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return {}
    props = dict(schema.get("properties") or {}) if isinstance(schema.get("properties"), dict) else {}
    for k in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(k) or []:
            for name, p in _properties(branch, root).items():
                props.setdefault(name, p)
    return props


def _resolve(schema, root: dict, depth: int = 0):
    """A local reference ("#/$defs/x") followed (a few hops at most); any other reference is left alone."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 8:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return schema
        node = root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        schema, depth = node, depth + 1
    return schema


@dataclass
class FieldConfusion:
    """A confusion matrix per categorical field (`categorical_fields`). A field that holds more than one value
    in a record (an array of enums used as multi-label) gets no matrix: its first such record is named."""

    labels: dict[str, list[str]]
    matrices: dict = field(default_factory=dict)
    multi: dict[str, str] = field(default_factory=dict)

    def add(self, rid: str, pred: set, gold: set) -> None:
        for name, labels in self.labels.items():
            if name in self.multi:
                continue
            p = [k for c, k in pred if c == name]
            g = [k for c, k in gold if c == name]
            if len(p) > 1 or len(g) > 1:
                self.multi[name] = rid
                self.matrices.pop(name, None)
                continue
            m = self.matrices.get(name)
            if m is None:
                m = self.matrices[name] = ConfusionMatrix(labels)
            m.add(key_text(g[0]) if g else None, key_text(p[0]) if p else None)

    def result(self) -> dict:
        out = {name: m.as_dict() for name, m in self.matrices.items()}
        out.update({name: {"skipped": f"record {rid} holds more than one value; a confusion matrix needs one "
                                      "value (or none) per record"} for name, rid in self.multi.items()})
        return dict(sorted(out.items()))
