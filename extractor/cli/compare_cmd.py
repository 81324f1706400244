"""`extractor compare`: paired tests between runs, family-wise controlled; regression gate for nightly jobs."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from extractor import storage
from extractor.cli.options import READABLE, tasks_dir_option
from extractor.scoring.compare import (DROP, MICRO, POWER, TWO_SIDED, CompareSettings, align, check_coverage,
                                       compare_pair, flipped, regressions, significant, too_small)
from extractor.errors import InputError
from extractor.provenance import stamp, write_json_atomic
from extractor.scoring.document import refuse_overwriting_inputs
from extractor.scoring.evaluate import evaluate
from extractor.tasks import load_task

METHOD = ("p: paired randomization test (each record's two runs swapped at random); p_adjusted: max-T step-down "
          "(Westfall-Young) over micro and every class, times the number of later runs (Bonferroni); "
          "mde80: smallest drop flagged with 80% power at this number of records")
WARN_LISTED = 8


@click.command()
@click.argument("runs", nargs=-1, required=True, type=READABLE)
@click.option("--gold", required=True, type=READABLE)
@click.option("--task", "task_name", required=True)
@click.option("--resamples", type=click.IntRange(min=1000), default=1000, show_default=True,
              help="Bootstrap resamples and random swaps (each at least 1,000).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True,
              help="Family-wise significance level: the chance that any row (micro, any class, any later run) "
                   "is flagged when the runs are equally good is at most this.")
@click.option("--fail-if-drop", type=click.FloatRange(min=0), default=None,
              help="Exit 1 when micro or any class F1 of a later run drops below the first run's by more "
                   "than this and the drop is significant (one-sided, family-wise adjusted p < --alpha).")
@click.option("--min-coverage", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="Share of the gold ids each run must hold a row for, and of each run's ids that must be gold "
                   "ids. A run below it (empty, stopped half way, run on another corpus) is refused with exit "
                   "2: a broken job, not a regression.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full comparison as JSON.")
@tasks_dir_option
def compare(runs, gold, task_name, resamples, seed, alpha, fail_if_drop, min_coverage, json_path, tasks_dirs):
    """Compare prediction files RUNS (first = baseline) on the same GOLD.

    Rows are micro F1 and every class's F1. With --fail-if-drop the tests look for drops only (one-sided);
    otherwise for a change either way. Family-wise: at most --alpha chance of any false flag in all rows of
    all comparisons together. Every run must cover the gold's ids (--min-coverage); one that does not is
    refused with exit 2, apart from the gate's exit 1 for a regression.

    \b
    Examples:
      extractor compare base.jsonl new.jsonl --gold gold.jsonl --task jd_requirements
      extractor compare ckpt-100.jsonl ckpt-200.jsonl ckpt-300.jsonl --gold gold.jsonl --task spo
      extractor compare baseline.jsonl nightly.jsonl --gold gold.jsonl --task spo --fail-if-drop 0.01
    """
    if len(runs) < 2:
        raise InputError("compare needs at least two prediction files (baseline first)")
    task = load_task(task_name, tasks_dirs)
    if json_path:
        inputs = {f"run {i + 1}": storage.target(r) for i, r in enumerate(runs)}
        outputs = {"--json": Path(json_path), "--json (its temporary file)": Path(json_path + ".tmp")}
        refuse_overwriting_inputs(outputs, {**inputs, "gold": storage.target(gold)})
    aligned = _load_runs(task, runs, gold, min_coverage)
    settings = CompareSettings(resamples, seed, alpha, TWO_SIDED if fail_if_drop is None else DROP, len(aligned) - 1)
    comparisons = [_comparison(aligned[0], run, settings, fail_if_drop) for run in aligned[1:]]
    console = Console()
    if len(aligned) > 2:
        console.print(_trend_table(aligned, comparisons, settings), highlight=False)
    for c in comparisons:
        console.print(_test_table(c, settings))
        _print_flips(console, c["flipped"])
        _warn_too_small(console, c, fail_if_drop, len(aligned[0].ids), settings)
    if json_path:
        write_json_atomic(Path(json_path), _report(task, runs, gold, settings, comparisons))
    if fail_if_drop is not None:
        _gate(console, comparisons, fail_if_drop, alpha)


def _load_runs(task, runs, gold, min_coverage: float):
    gold_path = storage.target(gold)
    records = []
    for run in runs:
        path = storage.target(run)
        ev = evaluate(task, path, gold_path, keep_records=True)
        check_coverage(str(run), ev.n_scored, ev.n_scored - ev.n_missing, ev.n_extra, min_coverage)
        records.append((path.name, ev.records))
    try:
        return align(records)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _comparison(base, run, settings: CompareSettings, fail_if_drop: float | None) -> dict:
    result = compare_pair(base, run, settings)
    tests = result["tests"]
    gated = fail_if_drop is not None
    return {"a": base.name, "b": run.name, "tests": tests, "family": result["family"],
            "flipped": flipped(base, run),
            "regressed": regressions(tests, fail_if_drop, settings.alpha) if gated else [],
            "too_small": too_small(tests, fail_if_drop) if gated else {}}


def _report(task, runs, gold, settings: CompareSettings, comparisons: list[dict]) -> dict:
    return {"format": "extractor.compare/2", "provenance": {**task.provenance(), **stamp()},
            "runs": list(runs), "gold": gold, "resamples": settings.resamples, "seed": settings.seed,
            "alpha": settings.alpha,
            "test": {"alternative": settings.alternative, "family": "micro and every class of every later run",
                     "later_runs": settings.comparisons, "power": POWER, "method": METHOD},
            "comparisons": comparisons}


def _gate(console, comparisons: list[dict], fail_if_drop: float, alpha: float) -> None:
    regressed = [f"{c['b']}: {name}" for c in comparisons for name in c["regressed"]]
    if regressed:
        console.print(f"[bold red]REGRESSION[/bold red] (drop > {fail_if_drop}, family-wise p < {alpha}): "
                      + escape("; ".join(regressed)), highlight=False)
        sys.exit(1)
    console.print(f"no significant drop > {fail_if_drop} (family-wise alpha {alpha})", highlight=False)


def _marker(t: dict, settings: CompareSettings) -> str:
    if not significant(t, settings.alpha):
        return ""
    return " ▼" if t["delta"] < 0 else " ▲"


def _trend_table(runs, comparisons: list[dict], settings: CompareSettings) -> Table:
    table = Table("class", *[escape(r.name) for r in runs], title="F1 trend",
                  caption=f"▼/▲: significant change from {escape(runs[0].name)} (family-wise over every row and "
                          f"{settings.comparisons} later runs, alpha {settings.alpha})")
    base = runs[0].f1()[0]
    for i, name in enumerate([MICRO] + runs[0].classes):
        later = [f"{c['tests'][name]['f1_b']:.4f}{_marker(c['tests'][name], settings)}" for c in comparisons]
        table.add_row(escape(name), f"{base[i]:.4f}", *later)
    return table


def _test_table(c: dict, settings: CompareSettings) -> Table:
    sided = "one-sided (drop)" if settings.alternative == DROP else "two-sided"
    table = Table("class", "F1 A", "F1 B", "Δ (B−A)", "95% CI", "p", "p adj", "drop seen (80%)", "",
                  title=f"A = {escape(c['a'])}, B = {escape(c['b'])}",
                  caption=f"p: paired swap test, {sided}; p adj: family-wise (max-T step-down over "
                          f"{c['family']['columns']} varying rows × {settings.comparisons} later run(s)); "
                          f"drop seen: smallest drop flagged with 80% power at this n (*: the runs agree on "
                          f"every record of that row, so it is sized as if their errors were independent)")
    for name, t in c["tests"].items():
        flag = "significant" if significant(t, settings.alpha) else ""
        mde = "—" if t["mde80"] is None else f"{t['mde80']:.4f}" + ("*" if t["mde_basis"] == "independent" else "")
        table.add_row(escape(name), f"{t['f1_a']:.4f}", f"{t['f1_b']:.4f}", f"{t['delta']:+.4f}",
                      f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", f"{t['p_value']:.4f}",
                      f"{t['p_adjusted']:.4f}", mde, flag)
    return table


def _warn_too_small(console, c: dict, threshold: float | None, n: int, settings: CompareSettings) -> None:
    """One line when this eval set cannot see the --fail-if-drop threshold in some rows."""
    small = c["too_small"]
    if not small:
        return
    parts = [f"{name} {mde:.3f}" for name, mde in sorted(small.items(), key=lambda kv: (kv[0] != MICRO, kv[1]))]
    more = f", and {len(parts) - WARN_LISTED} more" if len(parts) > WARN_LISTED else ""
    console.print(f"[yellow]warning[/yellow]: {escape(c['b'])}: {n} records are too few to see a drop of {threshold} "
                  f"(80% power, family-wise alpha {settings.alpha}) in {len(small)} of {len(c['tests'])} rows; "
                  f"smallest drop seen: " + escape(", ".join(parts[:WARN_LISTED]) + more), highlight=False)


def _print_flips(console, flips: dict) -> None:
    for cls, f in flips.items():
        console.print(f"{cls}: {f['right_in_a_wrong_in_b']} records right in A, wrong in B "
                      f"(e.g. {', '.join(f['examples_worse'][:5]) or '-'}); {f['wrong_in_a_right_in_b']} the reverse "
                      f"(e.g. {', '.join(f['examples_better'][:5]) or '-'})", highlight=False, markup=False)
