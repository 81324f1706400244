"""`extractor compare`: paired bootstrap between runs; regression gate for nightly jobs."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from extractor.cli.options import tasks_dir_option
from extractor.compare import MICRO, align, bootstrap, flipped, regressions
from extractor.errors import InputError
from extractor.provenance import stamp, write_json_atomic
from extractor.scoring.evaluate import evaluate
from extractor.tasks import load_task


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--gold", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--task", "task_name", required=True)
@click.option("--resamples", type=click.IntRange(min=1000), default=1000, show_default=True,
              help="Bootstrap resamples (at least 1,000).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level.")
@click.option("--fail-if-drop", type=float, default=None,
              help="Exit 1 when micro or any class F1 of a later run drops below the first run's by more "
                   "than this and the drop is significant.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full comparison as JSON.")
@tasks_dir_option
def compare(runs, gold, task_name, resamples, seed, alpha, fail_if_drop, json_path, tasks_dirs):
    """Compare prediction files RUNS (first = baseline) on the same GOLD.

    \b
    Examples:
      extractor compare base.jsonl new.jsonl --gold gold.jsonl --task jd_requirements
      extractor compare ckpt-100.jsonl ckpt-200.jsonl ckpt-300.jsonl --gold gold.jsonl --task spo
      extractor compare baseline.jsonl nightly.jsonl --gold gold.jsonl --task spo --fail-if-drop 0.01
    """
    if len(runs) < 2:
        raise InputError("compare needs at least two prediction files (baseline first)")
    task = load_task(task_name, tasks_dirs)
    records = [(Path(r).name, evaluate(task, Path(r), Path(gold), keep_records=True).records) for r in runs]
    try:
        aligned = align(records)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    base = aligned[0]
    console = Console()
    if len(aligned) > 2:
        console.print(_trend_table(aligned))
    report = {"format": "extractor.compare/1", "provenance": {**task.provenance(), **stamp()},
              "runs": list(runs), "gold": gold, "resamples": resamples, "seed": seed, "alpha": alpha,
              "comparisons": []}
    regressed_any = []
    for run in aligned[1:]:
        tests = bootstrap(base, run, resamples, seed)
        flips = flipped(base, run)
        console.print(_test_table(base.name, run.name, tests, alpha))
        _print_flips(console, flips)
        bad = regressions(tests, fail_if_drop, alpha) if fail_if_drop is not None else []
        regressed_any += [f"{run.name}: {name}" for name in bad]
        report["comparisons"].append({"a": base.name, "b": run.name, "tests": tests, "flipped": flips,
                                      "regressed": bad})
    if json_path:
        write_json_atomic(Path(json_path), report)
    if fail_if_drop is not None:
        if regressed_any:
            console.print(f"[bold red]REGRESSION[/bold red] (drop > {fail_if_drop}, p < {alpha}): "
                          + "; ".join(regressed_any), highlight=False)
            sys.exit(1)
        console.print(f"no significant drop > {fail_if_drop}", highlight=False)


def _trend_table(runs) -> Table:
    table = Table("class", *[r.name for r in runs], title="F1 trend")
    f1s = [r.f1()[0] for r in runs]
    for i, name in enumerate([MICRO] + runs[0].classes):
        table.add_row(name, *[f"{f[i]:.4f}" for f in f1s])
    return table


def _test_table(a: str, b: str, tests: dict, alpha: float) -> Table:
    table = Table("class", "F1 A", "F1 B", "Δ (B−A)", "95% CI", "p", "", title=f"A = {a}, B = {b}")
    for name, t in tests.items():
        flag = "significant" if t["p_value"] < alpha and t["delta"] != 0 else ""
        table.add_row(name, f"{t['f1_a']:.4f}", f"{t['f1_b']:.4f}", f"{t['delta']:+.4f}",
                      f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", f"{t['p_value']:.4f}", flag)
    return table


def _print_flips(console, flips: dict) -> None:
    for cls, f in flips.items():
        console.print(f"{cls}: {f['right_in_a_wrong_in_b']} records right in A, wrong in B "
                      f"(e.g. {', '.join(f['examples_worse'][:5]) or '-'}); {f['wrong_in_a_right_in_b']} the reverse "
                      f"(e.g. {', '.join(f['examples_better'][:5]) or '-'})", highlight=False)
