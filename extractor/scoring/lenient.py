"""Lenient (token-overlap) scores: exact matches count 1, and each unmatched fact earns its best token-overlap
F1 against an unmatched fact of the same class on the other side."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from extractor.scoring.facts import is_text, key_text
from extractor.scoring.metrics import prf_f1
from extractor.scoring.normalize import tokens



def overlap_f1(a: str, b: str) -> float:
    """Token-overlap F1 between two strings (bag of tokens)."""
    ta, tb = Counter(tokens(a)), Counter(tokens(b))
    common = sum((ta & tb).values())
    if not common:
        return 0.0
    return prf_f1(common / sum(ta.values()), common / sum(tb.values()))


@dataclass
class Lenient:
    """Soft precision/recall: each fact earns its best token-overlap F1 against the other side."""

    soft_p: float = 0.0
    soft_r: float = 0.0
    n_pred: int = 0
    n_gold: int = 0

    def as_dict(self) -> dict:
        p = self.soft_p / self.n_pred if self.n_pred else 0.0
        r = self.soft_r / self.n_gold if self.n_gold else 0.0
        return {"precision": p, "recall": r, "f1": prf_f1(p, r)}


def add_soft_overlap(lenient: dict[str, Lenient], fps: set, fns: set) -> None:
    """Partial credit of unmatched facts: best token overlap with an unmatched fact of the same class.
    Text only: a number or boolean is right or wrong (2021 and 2012 share no credit)."""
    fps = {(c, k) for c, k in fps if is_text(k)}
    fns = {(c, k) for c, k in fns if is_text(k)}
    for cls, key in fps:
        best = max((overlap_f1(key_text(key), key_text(g)) for c, g in fns if c == cls), default=0.0)
        lenient.setdefault(cls, Lenient()).soft_p += best
    for cls, key in fns:
        best = max((overlap_f1(key_text(key), key_text(p)) for c, p in fps if c == cls), default=0.0)
        lenient.setdefault(cls, Lenient()).soft_r += best


def lenient_result(per_class: dict, lenient: dict[str, Lenient]) -> dict:
    """Exact matches (a class's `Counts`) count 1; unmatched facts add their soft overlap credit."""
    total, classes = Lenient(), {}
    for cls, c in sorted(per_class.items()):
        extra = lenient.get(cls, Lenient())
        entry = Lenient(c.tp + extra.soft_p, c.tp + extra.soft_r, c.tp + c.fp, c.tp + c.fn)
        classes[cls] = entry.as_dict()
        total.soft_p += entry.soft_p
        total.soft_r += entry.soft_r
        total.n_pred += entry.n_pred
        total.n_gold += entry.n_gold
    return {"micro": total.as_dict(), "classes": classes}
