"""Raw counts first; precision, recall and F1 derive from them.

Zero division: a ratio whose denominator is 0 is 0 (scikit-learn's zero_division=0). Macro averages run
over every class seen in gold or predictions; weighted averages weight each class by its gold support
(both as scikit-learn's precision_recall_fscore_support).
"""
from __future__ import annotations

from dataclasses import dataclass


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def support(self) -> int:
        return self.tp + self.fn

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return prf_f1(self.precision, self.recall)

    def add(self, other: "Counts") -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def as_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "support": self.support,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


def prf_f1(p: float, r: float) -> float:
    return _div(2 * p * r, p + r)


def compare_sets(pred: set, gold: set) -> dict[str, Counts]:
    """Per-class counts of one record: facts are (class, key) pairs."""
    out: dict[str, Counts] = {}
    for cls, _ in pred & gold:
        out.setdefault(cls, Counts()).tp += 1
    for cls, _ in pred - gold:
        out.setdefault(cls, Counts()).fp += 1
    for cls, _ in gold - pred:
        out.setdefault(cls, Counts()).fn += 1
    return out


def averages(per_class: dict[str, Counts]) -> dict[str, dict]:
    micro = Counts()
    for c in per_class.values():
        micro.add(c)
    n = len(per_class)
    total_support = sum(c.support for c in per_class.values())
    macro = {k: _div(sum(getattr(c, k) for c in per_class.values()), n) for k in ("precision", "recall", "f1")}
    weighted = {k: _div(sum(getattr(c, k) * c.support for c in per_class.values()), total_support)
                for k in ("precision", "recall", "f1")}
    return {"micro": micro.as_dict(), "macro": {**macro, "classes": n},
            "weighted": {**weighted, "support": total_support}}


NONE_LABEL = "(none)"
MAX_UNSEEN_LABELS = 12  # a longer enum shows only the labels that occur


class ConfusionMatrix:
    """Gold × predicted counts of one categorical field, one value (or none) per record on each side.
    `labels`: the order to show (a schema's enum, say; all of it when short, else those that occur); labels
    seen but not listed follow, sorted, and "(none)" comes last."""

    def __init__(self, labels: list[str]):
        self.order = list(dict.fromkeys(labels))
        self.counts: dict[tuple[str, str], int] = {}
        self.records = 0

    def add(self, gold: str | None, pred: str | None) -> None:
        cell = (NONE_LABEL if gold is None else gold, NONE_LABEL if pred is None else pred)
        self.counts[cell] = self.counts.get(cell, 0) + 1
        self.records += 1

    def labels(self) -> list[str]:
        seen = {lab for cell in self.counts for lab in cell}
        order = self.order if len(self.order) <= MAX_UNSEEN_LABELS else [x for x in self.order if x in seen]
        extra = sorted(seen - set(order) - {NONE_LABEL})
        return [*order, *extra, NONE_LABEL]

    def as_dict(self) -> dict:
        """rows: gold labels, columns: predicted labels, in `labels` order; correct: the diagonal's sum
        ("(none)" against "(none)" included)."""
        labels = self.labels()
        matrix = [[self.counts.get((g, p), 0) for p in labels] for g in labels]
        correct = sum(matrix[i][i] for i in range(len(labels)))
        return {"labels": labels, "matrix": matrix, "records": self.records, "correct": correct}
