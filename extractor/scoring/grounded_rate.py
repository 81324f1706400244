"""The grounded rate: of the values a run extracted, how many its records' texts hold — a score without gold.

Counted per record over distinct (field, scoring key) pairs, as scoring counts facts: a value written twice
in one record counts once, and is grounded when any of its copies was found. Per field and micro:
grounded / extracted, with how each was found (exact, normalized, fuzzy) and how many ungrounded values equal
a value of the task's few-shot examples (copied from the prompt). With gold, every predicted fact is a true or
a false positive, and the split says how grounded and ungrounded predictions fall between them: a high rate
among false positives points at gold that misses values, a high one among true positives at a sound run.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from extractor.scoring.alignment import MATCHES
from extractor.scoring.grounding import Grounded

MAX_UNGROUNDED = 20_000  # distinct ungrounded values tracked per field, so memory stays bounded


def _rate(grounded: int, extracted: int) -> float | None:
    return grounded / extracted if extracted else None


@dataclass
class FieldCounts:
    extracted: int = 0
    grounded: int = 0
    copied_from_prompt: int = 0
    by_match: Counter = field(default_factory=Counter)

    def add(self, g: Grounded) -> None:
        self.extracted += 1
        if g.match is not None:
            self.grounded += 1
            self.by_match[g.match] += 1
        elif g.copied:
            self.copied_from_prompt += 1

    def merge(self, other: "FieldCounts") -> None:
        self.extracted += other.extracted
        self.grounded += other.grounded
        self.copied_from_prompt += other.copied_from_prompt
        self.by_match.update(other.by_match)

    def as_dict(self) -> dict:
        return {"extracted": self.extracted, "grounded": self.grounded, "rate": _rate(self.grounded, self.extracted),
                **{m: self.by_match[m] for m in MATCHES}, "ungrounded": self.extracted - self.grounded,
                "copied_from_prompt": self.copied_from_prompt}


@dataclass
class Ungrounded:
    """Most frequent ungrounded values of one field, with one record id each."""

    counts: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)

    def add(self, value: str, rid: str, copied: bool) -> None:
        if value in self.counts or len(self.counts) < MAX_UNGROUNDED:
            self.counts[value] += 1
            self.where.setdefault(value, (rid, copied))

    def top(self, k: int) -> list[dict]:
        return [{"value": v, "count": n, "id": self.where[v][0], "copied_from_prompt": self.where[v][1]}
                for v, n in self.counts.most_common(k)]


class GroundedRate:
    """Accumulates the grounded rate over records; `keep_records` keeps per-record (grounded, extracted) per
    field for `compare`'s paired test."""

    def __init__(self, examples: int = 5, keep_records: bool = False):
        self.fields: dict[str, FieldCounts] = {}
        self.outcomes: dict[str, Counter] = {}
        self.ungrounded: dict[str, Ungrounded] = {}
        self.n_examples = examples
        self.records_grounded = 0
        self.records_without_text = 0
        self.without_text_ids: list[str] = []
        self.keep_records = keep_records
        self.records: list[tuple[str, dict[str, tuple[int, int]]]] = []

    def add(self, rid: str, summary: dict[tuple[str, object], Grounded], values: dict[tuple[str, object], str]):
        """One record: summary (field, key) -> how it was grounded; values: (field, key) -> a value as written."""
        self.records_grounded += 1
        per: dict[str, list[int]] = {}
        for (fld, key), g in summary.items():
            counts = self.fields.get(fld)
            if counts is None:
                counts = self.fields[fld] = FieldCounts()
            counts.add(g)
            pair = per.setdefault(fld, [0, 0])
            pair[1] += 1
            if g.match is not None:
                pair[0] += 1
            else:
                self.ungrounded.setdefault(fld, Ungrounded()).add(values.get((fld, key), str(key)), rid, g.copied)
        if self.keep_records:
            self.records.append((rid, {f: (g, e) for f, (g, e) in per.items()}))

    def no_text(self, rid: str) -> None:
        """A record with values and nothing to ground them against (no text, no spans)."""
        self.records_without_text += 1
        if len(self.without_text_ids) < 100:
            self.without_text_ids.append(rid)

    def split(self, tp: set, fp: set, grounded: dict) -> None:
        """True and false positives of one record by grounded or not, per class."""
        for facts, outcome in ((tp, "tp"), (fp, "fp")):
            for fact in facts:
                if fact not in grounded:
                    continue
                kind = "grounded" if grounded[fact] else "ungrounded"
                self.outcomes.setdefault(fact[0], Counter())[f"{outcome}_{kind}"] += 1

    def result(self) -> dict:
        micro = FieldCounts()
        for c in self.fields.values():
            micro.merge(c)
        out = {"records": {"grounded": self.records_grounded, "without_text": self.records_without_text},
               "without_text_ids": self.without_text_ids,
               "micro": micro.as_dict(),
               "fields": {f: c.as_dict() for f, c in sorted(self.fields.items())},
               "ungrounded": {f: u.top(self.n_examples) for f, u in sorted(self.ungrounded.items())}}
        if self.outcomes:
            total: Counter = Counter()
            for c in self.outcomes.values():
                total.update(c)
            out["by_outcome"] = {"micro": _outcome(total),
                                 "classes": {cls: _outcome(c) for cls, c in sorted(self.outcomes.items())}}
        return out


def _outcome(c: Counter) -> dict:
    keys = ("tp_grounded", "tp_ungrounded", "fp_grounded", "fp_ungrounded")
    out = {k: c[k] for k in keys}
    out["tp_rate"] = _rate(c["tp_grounded"], c["tp_grounded"] + c["tp_ungrounded"])
    out["fp_rate"] = _rate(c["fp_grounded"], c["fp_grounded"] + c["fp_ungrounded"])
    return out
