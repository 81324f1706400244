"""Paired bootstrap comparison of runs scored against the same gold.

Records are resampled with replacement (the same resample for both runs: paired); for each resample the
difference in micro F1 and in each class's F1 is computed from summed counts. The 95% interval is the
2.5/97.5 percentiles of those differences; the two-sided p-value is twice the smaller tail mass at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MICRO = "micro"


@dataclass
class RunCounts:
    """Per-record TP/FP/FN arrays of one run, aligned to a shared id order."""

    name: str
    ids: list[str]
    classes: list[str]
    counts: np.ndarray  # shape (records, classes + 1, 3); column 0 is the micro total

    def f1(self, weights: np.ndarray | None = None) -> np.ndarray:
        """F1 per column (micro first) for each weight vector; weights shape (resamples, records)."""
        summed = self.counts.sum(axis=0)[None] if weights is None else np.einsum("bn,nct->bct", weights, self.counts)
        tp, fp, fn = summed[..., 0], summed[..., 1], summed[..., 2]
        denom = 2 * tp + fp + fn
        return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)


def align(named_records: list[tuple[str, list]], ) -> list[RunCounts]:
    """Build aligned count arrays from Evaluator.records of each run (same gold => same ids)."""
    ids = sorted(rid for rid, _ in named_records[0][1])
    for name, records in named_records[1:]:
        if sorted(rid for rid, _ in records) != ids:
            raise ValueError(f"run {name} was scored on different records than {named_records[0][0]}")
    classes = sorted({c for _, recs in named_records for _, per in recs for c in per})
    col = {c: i + 1 for i, c in enumerate(classes)}
    row = {rid: i for i, rid in enumerate(ids)}
    runs = []
    for name, records in named_records:
        arr = np.zeros((len(ids), len(classes) + 1, 3), dtype=np.int64)
        for rid, per in records:
            for c, triple in per.items():
                arr[row[rid], col[c]] = triple
        arr[:, 0] = arr[:, 1:].sum(axis=1)
        runs.append(RunCounts(name, ids, classes, arr))
    return runs


def bootstrap(a: RunCounts, b: RunCounts, resamples: int = 1000, seed: int = 0, chunk: int = 50) -> dict:
    """Per column (micro, then classes): observed delta (b - a), 95% CI, p-value."""
    rng = np.random.default_rng(seed)
    n = len(a.ids)
    deltas = []
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(k)]).astype(float)
        deltas.append(b.f1(weights) - a.f1(weights))
        done += k
    d = np.concatenate(deltas)  # (resamples, columns)
    observed = (b.f1() - a.f1())[0]
    lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
    p = np.minimum(1.0, 2 * np.minimum((d <= 0).mean(axis=0), (d >= 0).mean(axis=0)))
    names = [MICRO] + a.classes
    fa, fb = a.f1()[0], b.f1()[0]
    return {name: {"f1_a": float(fa[i]), "f1_b": float(fb[i]), "delta": float(observed[i]),
                   "ci95": [float(lo[i]), float(hi[i])], "p_value": float(p[i])}
            for i, name in enumerate(names)}


def flipped(a: RunCounts, b: RunCounts, limit: int = 10) -> dict:
    """Per class: records right in A and wrong in B, and the reverse (right = no FP and no FN)."""
    out = {}
    for i, cls in enumerate(a.classes, start=1):
        involved_a = a.counts[:, i].sum(axis=1) > 0
        involved_b = b.counts[:, i].sum(axis=1) > 0
        wrong_a = a.counts[:, i, 1:].sum(axis=1) > 0
        wrong_b = b.counts[:, i, 1:].sum(axis=1) > 0
        involved = involved_a | involved_b
        worse = np.flatnonzero(involved & ~wrong_a & wrong_b)
        better = np.flatnonzero(involved & wrong_a & ~wrong_b)
        if len(worse) or len(better):
            out[cls] = {"right_in_a_wrong_in_b": len(worse), "wrong_in_a_right_in_b": len(better),
                        "examples_worse": [a.ids[j] for j in worse[:limit]],
                        "examples_better": [a.ids[j] for j in better[:limit]]}
    return out


def regressions(tests: dict, threshold: float, alpha: float = 0.05) -> list[str]:
    """Columns whose F1 dropped by more than threshold with p < alpha."""
    return [name for name, t in tests.items() if t["delta"] < -threshold and t["p_value"] < alpha]
