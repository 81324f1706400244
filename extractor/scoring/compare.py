"""Paired comparison of runs scored against the same gold, with family-wise control of false flags.

Each column (micro F1, then every class's F1) gets Δ = F1(B) − F1(A) and two paired resampling
distributions over records (a record's counts for both runs always move together):

- bootstrap (records drawn with replacement): the 95% percentile interval of Δ and its spread `se`;
- randomization (each record's A and B counts swapped with probability 1/2): Δ's distribution when the runs
  are equally good (exchangeable). p-values come from it, because it stays exact where a bootstrap does not:
  one flipped record of a one-instance class is p = 0.5 here, while a centred bootstrap calls it p ≈ 0.001.

Family-wise control is max-T step-down (Westfall & Young 1993): every column's Δ is scaled by its null
spread; the adjusted p of the k-th most extreme column is the share of swaps whose largest scaled Δ among
that column and the less extreme ones reaches it. The chance that any column is flagged while the runs are
equally good is then at most alpha, over micro and all classes together; unlike Holm it uses the
correlation between micro and the classes. With several later runs the adjusted p-values are multiplied by
the number of later runs (Bonferroni), so the whole trend is one family.

The smallest drop seen with 80% power: a column is flagged when its Δ falls below −c·s0 (c: the family's
critical value in null-spread units, s0: the null spread), and Δ spreads by `se` around a true drop, so
a drop of c·s0 + z₀.₈·se is flagged 80% of the time.

The grounded rate (values found in their record's text / values extracted, `grounded_rate.py`) joins the
family as more columns, micro (`grounded`) and per field (`grounded: <field>`), tested the same way: a
rate g/e is the F1 of the counts (g, e − g, e − g) — its precision and recall are both g/e — so each record
carries those counts and the resampling, the swaps and the step-down serve F1 and rates alike. Without gold
the grounded columns are the whole family: the gate of a nightly run over fresh, unlabelled data.

Only runs of the gold's eval set are compared (`check_coverage`): a run that lacks gold ids (empty, stopped
half way) or holds ids the gold lacks (run on another corpus) is a broken job, not a regression, and is
refused before any test.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from statistics import NormalDist

import numpy as np

from extractor.errors import InputError

MICRO = "micro"
GROUNDED = "grounded"  # the micro grounded-rate column
DROP, TWO_SIDED = "drop", "two-sided"
POWER = 0.8
Z_POWER = NormalDist().inv_cdf(POWER)
# Swapped and observed Δs come from different sums; a tie must count as reaching the observed value.
TIE = 1e-9
CHUNK_CELLS = 2**21  # 16 MB of float64 resample weights at a time


@dataclass
class RunCounts:
    """Per-record TP/FP/FN arrays of one run, aligned to a shared id order."""

    name: str
    ids: list[str]
    classes: list[str]
    counts: np.ndarray  # shape (records, columns, 3); column 0 is the micro total (when `micro`)
    rates: list[str] = field(default_factory=list)  # fields of the grounded-rate columns, after the classes
    micro: bool = True  # False without gold: no F1 columns at all

    @property
    def names(self) -> list[str]:
        """Column names in order: micro F1 and the classes' F1 (with gold), then the grounded rates."""
        f1 = [MICRO, *self.classes] if self.micro else []
        return f1 + ([GROUNDED, *(rate_column(f) for f in self.rates)] if self.rates else [])

    def is_rate(self, name: str) -> bool:
        return self.names.index(name) >= (len(self.classes) + 1 if self.micro else 0)

    def f1(self, weights: np.ndarray | None = None) -> np.ndarray:
        """F1 per column (micro first) for each weight vector; weights shape (resamples, records)."""
        if weights is None:
            return f1_of(self.counts.sum(axis=0)[None])
        return f1_of((weights @ self._flat).reshape(len(weights), *self.counts.shape[1:]))

    @cached_property
    def _flat(self) -> np.ndarray:
        # float, so the resample product is one BLAS call (an int operand takes numpy's slow loop)
        return self.counts.reshape(len(self.ids), -1).astype(float)


@dataclass(frozen=True)
class CompareSettings:
    """How a comparison is tested; `comparisons` is the number of later runs sharing one family."""

    resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05
    alternative: str = TWO_SIDED
    comparisons: int = 1


def f1_of(summed: np.ndarray) -> np.ndarray:
    """F1 from summed (..., 3) TP/FP/FN counts; 0 where there is nothing to count."""
    tp, fp, fn = summed[..., 0], summed[..., 1], summed[..., 2]
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)


def check_coverage(name: str, gold: int, matched: int, extra: int, min_coverage: float) -> None:
    """Refuse a run that does not cover the gold: no gold, no prediction, or fewer than `min_coverage` of the
    gold ids predicted, or more than 1 - `min_coverage` of its ids absent from gold (another corpus).

    gold: gold records scored; matched: those the run has a row for; extra: the run's ids not in gold.
    """
    fix = "rerun it on the gold's corpus (or finish it with run --resume), or lower --min-coverage"
    if gold == 0:
        raise InputError("the gold holds no record to score (empty, or every gold record malformed); nothing to "
                         "compare on — pass the gold of the eval set")
    if matched + extra == 0:
        raise InputError(f"{name}: holds no predictions (an empty run, a broken job); {fix}")
    if matched == 0:
        raise InputError(f"{name}: none of its {extra} ids is in the gold ({gold} ids): it was run on another "
                         f"corpus; {fix}")
    if matched < min_coverage * gold:
        raise InputError(f"{name}: covers {matched} of {gold} gold ids ({matched / gold:.1%}), below "
                         f"--min-coverage {min_coverage:g}: a partial run is a broken job, not a regression; {fix}")
    if extra > (1 - min_coverage) * (matched + extra):
        raise InputError(f"{name}: {extra} of its {matched + extra} ids are not in the gold, more than "
                         f"--min-coverage {min_coverage:g} allows: it was run on another corpus; {fix}")


def rate_column(field_name: str) -> str:
    return f"{GROUNDED}: {field_name}"


def rate_counts(grounded: int, extracted: int) -> tuple[int, int, int]:
    """Counts whose F1 is grounded / extracted (see the module's docstring)."""
    return grounded, extracted - grounded, extracted - grounded


def align(named_records: list[tuple[str, list]], rates: list[list] | None = None,
          ids: list[str] | None = None) -> list[RunCounts]:
    """Build aligned count arrays from Evaluator.records of each run (same gold => same ids).

    rates: per run, the grounded rate's per-record (grounded, extracted) per field (`GroundedRate.records`),
    added as columns. Without gold (no F1 records) pass the `ids` to align on (the corpus's, or the first
    run's): a record a run lacks counts nothing, one outside `ids` is left out."""
    micro = ids is None
    if ids is None:
        ids = sorted(rid for rid, _ in named_records[0][1])
        for name, records in named_records[1:]:
            if sorted(rid for rid, _ in records) != ids:
                raise ValueError(f"run {name} was scored on different records than {named_records[0][0]}")
    classes = sorted({c for _, recs in named_records for _, per in recs for c in per}) if micro else []
    fields = sorted({f for run in rates or [] for _, per in run for f in per})
    first_rate = len(classes) + 1 if micro else 0
    col = {c: i + 1 for i, c in enumerate(classes)}
    rate_col = {f: first_rate + 1 + i for i, f in enumerate(fields)}
    width = first_rate + (len(fields) + 1 if fields else 0)
    row = {rid: i for i, rid in enumerate(ids)}
    runs = []
    for k, (name, records) in enumerate(named_records):
        arr = np.zeros((len(ids), width, 3), dtype=np.int64)
        for rid, per in records if micro else ():
            for c, triple in per.items():
                arr[row[rid], col[c]] = triple
        if micro:
            arr[:, 0] = arr[:, 1:first_rate].sum(axis=1)
        if fields:
            for rid, per in rates[k]:
                if rid in row:
                    for f, (g, e) in per.items():
                        arr[row[rid], rate_col[f]] = rate_counts(g, e)
            arr[:, first_rate] = arr[:, first_rate + 1:].sum(axis=1)
        runs.append(RunCounts(name, ids, classes, arr, fields, micro))
    return runs


def _chunks(total: int, records: int) -> Iterator[int]:
    """Sizes of successive chunks of resamples: each (chunk, records) matrix holds at most CHUNK_CELLS.

    Few, large products: each BLAS call wakes its threads, which costs more than the product itself when
    other processes hold the cores.
    """
    chunk = max(1, CHUNK_CELLS // max(records, 1))
    done = 0
    while done < total:
        k = min(chunk, total - done)
        yield k
        done += k


def bootstrap_f1(a: RunCounts, b: RunCounts, resamples: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """F1 per column of both runs under the same record resamples: two (resamples, columns) arrays."""
    n = len(a.ids)
    fa, fb = [], []
    for k in _chunks(resamples, n):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(float)
        fa.append(a.f1(weights))
        fb.append(b.f1(weights))
    return np.concatenate(fa), np.concatenate(fb)


def swap_deltas(a: RunCounts, b: RunCounts, swaps: int, rng: np.random.Generator | None) -> np.ndarray:
    """Δ per column after swapping each record's A and B counts at random; rng None = no swap (observed)."""
    n = len(a.ids)
    moved = (b.counts - a.counts).reshape(n, -1).astype(float)
    total_a, total_b = a.counts.sum(axis=0), b.counts.sum(axis=0)
    out = []
    for k in _chunks(swaps, n):
        signs = np.zeros((k, n)) if rng is None else rng.integers(0, 2, size=(k, n)).astype(float)
        shift = (signs @ moved).reshape(k, *a.counts.shape[1:])
        out.append(f1_of(total_b - shift) - f1_of(total_a + shift))
    return np.concatenate(out)


def maxt_stepdown(observed: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw and step-down max-T adjusted p-values; larger statistics are more extreme.

    observed (m,), null (swaps, m) on the same scale. p = (1 + count) / (swaps + 1): a Monte Carlo
    randomization p-value is then valid as it stands (never 0).
    """
    swaps = len(null)
    raw = (1 + (null >= observed - TIE).sum(axis=0)) / (swaps + 1)
    order = np.argsort(-observed, kind="stable")
    # Column order[k] is compared with the largest null statistic among itself and every less extreme column.
    tail_max = np.maximum.accumulate(null[:, order[::-1]], axis=1)[:, ::-1]
    stepped = np.maximum.accumulate((1 + (tail_max >= observed[order] - TIE).sum(axis=0)) / (swaps + 1))
    adjusted = np.empty_like(stepped)
    adjusted[order] = stepped
    return raw, adjusted


def _oriented(z: np.ndarray, alternative: str) -> np.ndarray:
    """The test statistic from scaled Δs: a drop is positive for `drop`; either sign counts two-sided."""
    return -z if alternative == DROP else np.abs(z)


def family_test(observed: np.ndarray, null: np.ndarray, settings: CompareSettings) -> dict:
    """p-values (raw, adjusted) and the family's critical value for the columns that vary under swaps.

    A column whose Δ never moves under swapping (both runs agree on every record) cannot be flagged and is
    left out of the family: p = 1.
    """
    m = len(observed)
    scale = null.std(axis=0)
    live = scale > 0
    raw, adjusted = np.ones(m), np.ones(m)
    critical = _bonferroni_z(m, settings)
    if live.any():
        stat = _oriented(observed[live] / scale[live], settings.alternative)
        null_stat = _oriented(null[:, live] / scale[live], settings.alternative)
        raw[live], adj = maxt_stepdown(stat, null_stat)
        adjusted[live] = np.minimum(1.0, adj * settings.comparisons)
        critical = float(np.quantile(null_stat.max(axis=1), 1 - settings.alpha / settings.comparisons))
    return {"raw": raw, "adjusted": adjusted, "scale": scale, "critical": critical, "family": int(live.sum())}


def _bonferroni_z(columns: int, settings: CompareSettings) -> float:
    """The normal critical value Bonferroni would use: stands in when no column varies under swaps."""
    sides = 1 if settings.alternative == DROP else 2
    return NormalDist().inv_cdf(1 - settings.alpha / (sides * columns * settings.comparisons))


def _mde(test: dict, se: np.ndarray, se_independent: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Smallest drop flagged with 80% power per column, and which spread it rests on.

    Where the runs agree on every record of a column there is no paired spread; the drop is then sized as
    if a later run's errors were independent of the baseline's (an upper bound for runs that err alike).
    """
    c = test["critical"]
    paired = c * test["scale"] + Z_POWER * se
    independent = (c + Z_POWER) * se_independent
    use_paired = test["scale"] > 0
    # Nothing varies at all (e.g. F1 0 in both runs under every resample): no drop to size.
    mde = np.where(use_paired, paired, np.where(se_independent > 0, independent, np.nan))
    return mde, ["paired" if p else "independent" for p in use_paired]


def compare_pair(a: RunCounts, b: RunCounts, settings: CompareSettings = CompareSettings()) -> dict:
    """Per column (micro, then classes): F1s, Δ (B − A), 95% CI, se, raw and adjusted p, 80%-power drop."""
    boot_rng, swap_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(settings.seed).spawn(2))
    fa_boot, fb_boot = bootstrap_f1(a, b, settings.resamples, boot_rng)
    boot = fb_boot - fa_boot
    observed = swap_deltas(a, b, 1, None)[0]
    test = family_test(observed, swap_deltas(a, b, settings.resamples, swap_rng), settings)
    se = boot.std(axis=0)
    mde, basis = _mde(test, se, np.sqrt(fa_boot.var(axis=0) + fb_boot.var(axis=0)))
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    fa, fb = a.f1()[0], b.f1()[0]
    out = {}
    for i, name in enumerate(a.names):
        out[name] = {"metric": "grounded_rate" if a.is_rate(name) else "f1",
                     "f1_a": float(fa[i]), "f1_b": float(fb[i]), "delta": float(observed[i]),
                     "ci95": [float(lo[i]), float(hi[i])], "se": float(se[i]),
                     "p_value": float(test["raw"][i]), "p_adjusted": float(test["adjusted"][i]),
                     "mde80": None if np.isnan(mde[i]) else float(mde[i]), "mde_basis": basis[i]}
    return {"tests": out, "family": {"columns": test["family"], "critical_z": test["critical"]}}


def flipped(a: RunCounts, b: RunCounts, limit: int = 10) -> dict:
    """Per class: records right in A and wrong in B, and the reverse (right = no FP and no FN); per grounded
    field: records whose every value was grounded in A and not in B, and the reverse."""
    out = {}
    for i, cls in enumerate(a.names):
        if cls in (MICRO, GROUNDED):
            continue
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


def significant(t: dict, alpha: float) -> bool:
    """A change is significant when its family-wise adjusted p is below alpha."""
    return t["p_adjusted"] < alpha and t["delta"] != 0


def regressions(tests: dict, threshold: float, alpha: float = 0.05) -> list[str]:
    """Columns whose F1 dropped by more than threshold with family-wise adjusted p < alpha."""
    return [name for name, t in tests.items() if t["delta"] < -threshold and significant(t, alpha)]


def too_small(tests: dict, threshold: float) -> dict[str, float]:
    """Columns where a drop of `threshold` would be flagged less than 80% of the time: their 80%-power drop."""
    return {name: t["mde80"] for name, t in tests.items() if t["mde80"] is not None and t["mde80"] > threshold}
