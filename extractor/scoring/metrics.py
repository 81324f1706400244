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
