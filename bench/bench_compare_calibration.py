"""The gate's false-alarm rate and power, by simulation (the long version of tests/test_compare_calibration.py).

Each trial draws a baseline and a later run from extractor.datasets.calibration's error process (every class 10%
wrong or lost, a few spurious facts), scores both with the real scorer and asks the real gate
(`compare --fail-if-drop 0 --alpha 0.05`: one-sided, family-wise over micro and every class).

- equal quality: how often the gate fails, against the same pairs with each row tested alone at alpha (no
  family-wise control) and at alpha/2 (the gate before it controlled the family-wise rate: a two-sided
  p < alpha per row);
- a trend: three later runs as good as the baseline, one family (any flag in any run is a false alarm);
- a planted drop in one class (its error rate raised in the later run only): how often that class is flagged,
  against the drop the gate reports it can see with 80% power (median `mde80`), and false flags elsewhere;
- spo only: the drop seen with 80% power by class size (most of its 44 predicates are rare).

    .venv/bin/python bench/bench_compare_calibration.py --trials 1000 --power-trials 500 --out results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from math import sqrt

from extractor.datasets.calibration import Scenario, Simulator, false_flags, trial

ALPHA = 0.05
PLANTED_RATES = {"jd_requirements": (0.125, 0.15, 0.175, 0.2), "spo": (0.15, 0.2, 0.25, 0.3)}


def interval(hits: int, trials: int) -> str:
    """A rate with its 95% Wilson interval, in percent."""
    p, z = hits / trials, 1.96
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return f"{100 * p:.1f}% ({100 * max(0.0, centre - half):.1f}–{100 * min(1.0, centre + half):.1f})"


def null_rows(sim: Simulator, task: str, n: int, trials: int, seed: int) -> dict:
    outcomes = [trial(sim, Scenario(task, n, alpha=ALPHA), seed + i)[0] for i in range(trials)]
    count = lambda attr: sum(bool(getattr(o, attr)) for o in outcomes)  # noqa: E731
    return {"trials": trials, "family_wise": count("flagged"), "per_row_alpha": count("flagged_raw"),
            "per_row_half_alpha": count("flagged_raw_half"),
            "mde80_micro_median": statistics.median(o.tests["micro"]["mde80"] for o in outcomes),
            "mde80": {c: _median_mde(outcomes, c) for c in sim.classes}}


def _median_mde(outcomes: list, column: str) -> float | None:
    """Median over trials of a column's drop seen; None where no trial could size one (no gold, no errors)."""
    values = [o.tests[column]["mde80"] for o in outcomes if column in o.tests and o.tests[column]["mde80"] is not None]
    return statistics.median(values) if values else None


def trend_row(sim: Simulator, task: str, n: int, trials: int, seed: int) -> dict:
    runs = [trial(sim, Scenario(task, n, alpha=ALPHA, runs=4), seed + i) for i in range(trials)]
    return {"trials": trials, "later_runs": 3, "family_wise": sum(any(o.flagged for o in r) for r in runs),
            "per_row_alpha": sum(any(o.flagged_raw for o in r) for r in runs)}


def power_row(sim: Simulator, task: str, n: int, planted: str, rate: float, trials: int, seed: int) -> dict:
    sc = Scenario(task, n, alpha=ALPHA, planted=planted, planted_rate=rate)
    outcomes = [trial(sim, sc, seed + i)[0] for i in range(trials)]
    return {"planted": planted, "rate": rate, "trials": trials,
            "mean_drop": -statistics.mean(o.tests[planted]["delta"] for o in outcomes),
            "mde80_median": statistics.median(o.tests[planted]["mde80"] for o in outcomes),
            "caught": sum(planted in o.flagged for o in outcomes),
            "false_flags": sum(bool(false_flags([o], planted)) for o in outcomes)}


def by_support(sim: Simulator, mde80: dict) -> list[dict]:
    """Median drop seen per class-size bucket (gold instances in the eval set)."""
    support = sim.support()
    buckets = [(0, 9), (10, 29), (30, 99), (100, 10**9)]
    rows = []
    for lo, hi in buckets:
        values = [v for c, v in mde80.items() if c in support and lo <= support[c] <= hi and v is not None]
        if values:
            rows.append({"support": f"{lo}–{hi}" if hi < 10**9 else f"≥ {lo}", "classes": len(values),
                         "mde80_median": statistics.median(values)})
    return rows


def bench_task(task: str, n: int, trials: int, power_trials: int, trend_trials: int) -> dict:
    start = time.perf_counter()
    sim = Simulator(task, n, seed=0)
    support = sim.support()
    planted = max(support, key=support.get)
    result = {"task": task, "records": n, "classes": len(sim.classes), "planted_support": support[planted],
              "null": null_rows(sim, task, n, trials, 0),
              "trend": trend_row(sim, task, n, trend_trials, 100_000) if trend_trials else None,
              "power": [power_row(sim, task, n, planted, r, power_trials, 200_000 + 10_000 * i)
                        for i, r in enumerate(PLANTED_RATES[task])]}
    result["mde80_by_support"] = by_support(sim, result["null"]["mde80"])
    result["seconds"] = time.perf_counter() - start
    return result


def print_markdown(results: list[dict]) -> None:
    print("| task | records | rows tested | trials | gate, family-wise | each row at alpha | each row at alpha/2 (before) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        z = r["null"]
        print(f"| {r['task']} | {r['records']} | {r['classes'] + 1} | {z['trials']} | "
              f"{interval(z['family_wise'], z['trials'])} | {interval(z['per_row_alpha'], z['trials'])} | "
              f"{interval(z['per_row_half_alpha'], z['trials'])} |")
    for r in results:
        if r["trend"]:
            t = r["trend"]
            print(f"\ntrend ({r['task']}, {r['records']} records, baseline + {t['later_runs']} equal runs, "
                  f"{t['trials']} trials): family-wise {interval(t['family_wise'], t['trials'])}, "
                  f"each row at alpha {interval(t['per_row_alpha'], t['trials'])}")
    print("\n| task | records | planted class (gold instances) | error rate | mean drop | drop seen (80%), median "
          "| caught | other rows flagged |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for p in r["power"]:
            print(f"| {r['task']} | {r['records']} | {p['planted']} ({r['planted_support']}) | 0.10 → {p['rate']:.3f} "
                  f"| {p['mean_drop']:.3f} | {p['mde80_median']:.3f} | {interval(p['caught'], p['trials'])} "
                  f"| {interval(p['false_flags'], p['trials'])} |")
    for r in results:
        if r["task"] == "spo":
            print(f"\nspo, {r['records']} records: drop seen with 80% power by class size (median over classes)")
            print("| gold instances | classes | drop seen (80%) |\n| --- | --- | --- |")
            for b in r["mde80_by_support"]:
                print(f"| {b['support']} | {b['classes']} | {b['mde80_median']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=1000, help="Equal-quality trials per task.")
    parser.add_argument("--power-trials", type=int, default=500, help="Trials per planted drop.")
    parser.add_argument("--trend-trials", type=int, default=500)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--out", default=None, help="Write the results as JSON.")
    args = parser.parse_args()
    start = time.perf_counter()
    results = [bench_task("jd_requirements", args.records, args.trials, args.power_trials, args.trend_trials),
               bench_task("spo", args.records, args.trials, args.power_trials, 0)]
    print(f"date {date.today()}, python {sys.version.split()[0]}, {platform.processor() or platform.machine()}, "
          f"alpha {ALPHA}, 1,000 resamples, {time.perf_counter() - start:.0f} s\n")
    print_markdown(results)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"date": str(date.today()), "alpha": ALPHA, "results": results}, fh, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
