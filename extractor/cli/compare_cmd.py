"""`extractor compare`: paired tests between runs, family-wise controlled; regression gate for nightly jobs, with
gold (F1 and, where the texts are at hand, the grounded rate) or without (the grounded rate alone)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from extractor.store import locations
from extractor.cli.options import READABLE, complete_task_names, corpus_options, tasks_dir_option
from extractor.cli.tables import console as make_console
from extractor.scoring.compare import (DROP, MICRO, POWER, TWO_SIDED, CompareSettings, align, check_coverage,
                                       compare_pair, flipped, rate_column, regressions, significant, too_small)
from extractor.scoring.join import CorpusJoin
from extractor.errors import InputError
from extractor.store.provenance import stamp, write_json_atomic
from extractor.store.clashes import refuse_overwriting_inputs
from extractor.scoring.evaluate import evaluate
from extractor.tasks.task import load_task

METHOD = ("p: paired randomization test (each record's two runs swapped at random); p_adjusted: max-T step-down "
          "(Westfall-Young) over micro and every class, and the grounded rate (micro and per field) where "
          "grounded, times the number of later runs (Bonferroni); "
          "mde80: smallest drop flagged with 80% power at this number of records")
WARN_LISTED = 8


@click.command()
@click.argument("runs", nargs=-1, required=True, type=READABLE)
@click.option("--gold", default=None, type=READABLE,
              help="Gold of the eval set. Without it only the grounded rate is compared (needs --corpus, or "
                   "rows that keep their text or spans).")
@click.option("--corpus", default=None, type=READABLE,
              help="The corpus the runs read: each record's text, to ground their values in.")
@click.option("--task", "task_name", required=True, shell_complete=complete_task_names)
@click.option("--resamples", type=click.IntRange(min=1000), default=1000, show_default=True,
              help="Bootstrap resamples and random swaps (each at least 1,000).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True,
              help="Family-wise significance level: the chance that any row (micro, any class, any later run) "
                   "is flagged when the runs are equally good is at most this.")
@click.option("--fail-if-drop", type=click.FloatRange(min=0), default=None,
              help="Exit 1 when micro or any class F1, or the grounded rate (micro or any field), of a later "
                   "run drops below the first run's by more than this and the drop is significant (one-sided, "
                   "family-wise adjusted p < --alpha). Without --gold: the grounded rate alone.")
@click.option("--min-coverage", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="Share of the gold ids (without gold: the corpus's, else the first run's) each run must hold "
                   "a row for, and of each run's ids that must be among them. A run below it (empty, stopped half way, run on another corpus) is refused with exit "
                   "2: a broken job, not a regression.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              is_flag=False, flag_value="-", metavar="[PATH]",
              help="The full comparison as JSON, with a top-level \"pass\" (true or false under --fail-if-drop, "
                   "else null): to PATH, or with no PATH (or -) on stdout and nothing else there, the tables "
                   "going to stderr. Exit codes stay as without it.")
@corpus_options
@tasks_dir_option
def compare(runs, gold, corpus, task_name, resamples, seed, alpha, fail_if_drop, min_coverage, json_path, id_field,
            text_field, tasks_dirs):
    """Compare prediction files RUNS (first = baseline) on the same GOLD, or without gold on the same corpus.

    Rows are micro F1 and every class's F1, and the grounded rate (micro and per field) when every run's
    records have their text (--corpus, the gold's, or kept in the rows) or spans; without --gold, the
    grounded rate alone. With --fail-if-drop the tests look for drops only (one-sided);
    otherwise for a change either way. Family-wise: at most --alpha chance of any false flag in all rows of
    all comparisons together. Every run must cover the gold's ids (--min-coverage); one that does not is
    refused with exit 2, apart from the gate's exit 1 for a regression.

    \b
    Examples:
      extractor compare base.jsonl new.jsonl --gold gold.jsonl --task jd_requirements
      extractor compare ckpt-100.jsonl ckpt-200.jsonl ckpt-300.jsonl --gold gold.jsonl --task spo
      extractor compare baseline.jsonl nightly.jsonl --gold gold.jsonl --task spo --fail-if-drop 0.01
      extractor compare last.jsonl tonight.jsonl --corpus dump.jsonl --task jd_requirements --fail-if-drop 0.02
      extractor compare base.jsonl new.jsonl --gold gold.jsonl --task spo --fail-if-drop 0.01 --json | jq .pass
    """
    to_stdout = json_path == "-"
    if len(runs) < 2:
        if json_path and not to_stdout:
            _check_json_target(json_path)
        raise InputError("compare needs at least two prediction files (baseline first)")
    task = load_task(task_name, tasks_dirs)
    if json_path and not to_stdout:
        inputs = {f"run {i + 1}": locations.target(r) for i, r in enumerate(runs)}
        outputs = {"--json": Path(json_path), "--json (its temporary file)": Path(json_path + ".tmp")}
        extra = {name: locations.target(p) for name, p in (("gold", gold), ("corpus", corpus)) if p}
        refuse_overwriting_inputs(outputs, {**inputs, **extra}, task)
        _check_json_target(json_path)
    source = _TextSource(task, corpus, id_field, text_field)
    console = make_console(stderr=to_stdout)
    if gold:
        aligned = _load_runs(console, task, runs, gold, min_coverage, source)
    else:
        aligned = _load_gold_free(task, runs, min_coverage, source)
    settings = CompareSettings(resamples, seed, alpha, TWO_SIDED if fail_if_drop is None else DROP, len(aligned) - 1)
    comparisons = [_comparison(aligned[0], run, settings, fail_if_drop) for run in aligned[1:]]
    if len(aligned) > 2:
        console.print(_trend_table(aligned, comparisons, settings), highlight=False)
    for c in comparisons:
        for metric in ("f1", "grounded_rate"):
            if any(t["metric"] == metric for t in c["tests"].values()):
                console.print(_test_table(c, settings, metric))
        _print_flips(console, c["flipped"])
        _warn_too_small(console, c, fail_if_drop, len(aligned[0].ids), settings)
    if json_path:
        report = _report(task, runs, gold, corpus, settings, comparisons, fail_if_drop)
        if to_stdout:
            click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        else:
            write_json_atomic(Path(json_path), report)
    if fail_if_drop is not None:
        _gate(console, comparisons, fail_if_drop, alpha)


def _check_json_target(json_path: str) -> None:
    """--json takes an optional PATH, so `compare --json base.jsonl new.jsonl` reads base.jsonl as the PATH: an
    existing file that is no comparison is refused rather than overwritten."""
    path = Path(json_path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    if '"format": "extractor.compare/' not in head:
        raise InputError(f"--json {json_path}: the file exists and holds no comparison (a run taken as the --json "
                         "PATH?); put --json after the runs, write --json - for stdout, or remove the file")


class _TextSource:
    """A fresh reader of the --corpus for each run (None without one)."""

    def __init__(self, task, corpus, id_field: str, text_field: str | None):
        self.task, self.corpus, self.id_field, self.text_field = task, corpus, id_field, text_field

    def reader(self):
        if not self.corpus:
            return None
        from extractor.store.corpus import CorpusReader
        return CorpusReader(self.corpus, self.task.spec.input_fields, id_field=self.id_field,
                            text_field=self.text_field)


def _load_runs(console, task, runs, gold, min_coverage: float, source: _TextSource):
    gold_path = locations.target(gold)
    records, evaluators = [], []
    for run in runs:
        path = locations.target(run)
        ev = evaluate(task, path, gold_path, keep_records=True, corpus=source.reader())
        check_coverage(str(run), ev.n_scored, ev.n_scored - ev.n_missing, ev.n_extra, min_coverage)
        records.append((path.name, ev.records))
        evaluators.append(ev)
    rates = _rates_if_grounded(console, runs, evaluators)
    try:
        return align(records, rates)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _rates_if_grounded(console, runs, evaluators) -> list | None:
    """The runs' per-record grounded counts when every run could ground every record it extracted values from
    (else comparing rates would compare what had text); a note says why they are left out otherwise."""
    if not evaluators[0].grounder.active or not any(ev.grounding.records_grounded for ev in evaluators):
        return None
    lacking = [(run, ev.grounding.records_without_text) for run, ev in zip(runs, evaluators)
               if ev.grounding.records_without_text]
    if lacking:
        console.print("grounded rate not compared: " + "; ".join(f"{r}: {n} records with values but no text"
                                                                 for r, n in lacking) + " (pass --corpus)",
                      highlight=False, markup=False)
        return None
    return [ev.grounding.records for ev in evaluators]


def _load_gold_free(task, runs, min_coverage: float, source: _TextSource):
    """Runs without gold: the grounded rate only, aligned on the first run's ids; coverage against the
    corpus's ids (with --corpus) or the first run's."""
    from extractor.scoring.grounding import Grounder
    if not Grounder(task).active:
        raise InputError(f"task {task.name}: scoring kind '{task.spec.scoring.kind}' extracts no text values to "
                         "ground, so runs cannot be compared without gold; pass --gold")
    names, rates, ref = [], [], None
    for run in runs:
        path = locations.target(run)
        joined = CorpusJoin()
        ev = evaluate(task, path, None, keep_records=True, corpus=source.reader(), corpus_join=joined)
        ids = {rid for rid, _ in ev.records}
        if ev.grounding.records_without_text:
            raise InputError(f"{run}: {ev.grounding.records_without_text} records have values but no text or "
                             f"spans to ground them in (e.g. {ev.grounding.without_text_ids[0]}); pass --corpus "
                             "CORPUS, the corpus the runs read")
        ref = ids if ref is None else ref
        if source.corpus:
            check_coverage(str(run), joined.records, joined.matched, joined.extra, min_coverage)
        else:
            check_coverage(str(run), len(ref), len(ids & ref), len(ids - ref), min_coverage)
        names.append((path.name, []))
        rates.append(ev.grounding.records)
    return align(names, rates, ids=sorted(ref))


def _comparison(base, run, settings: CompareSettings, fail_if_drop: float | None) -> dict:
    result = compare_pair(base, run, settings)
    tests = result["tests"]
    gated = fail_if_drop is not None
    return {"a": base.name, "b": run.name, "tests": tests, "family": result["family"],
            "flipped": flipped(base, run),
            "regressed": regressions(tests, fail_if_drop, settings.alpha) if gated else [],
            "too_small": too_small(tests, fail_if_drop) if gated else {}}


def _report(task, runs, gold, corpus, settings: CompareSettings, comparisons: list[dict],
            fail_if_drop: float | None) -> dict:
    """pass: the gate's verdict (no later run regressed), null without --fail-if-drop (nothing was gated);
    gate: its threshold and the rows that regressed."""
    regressed = [f"{c['b']}: {name}" for c in comparisons for name in c["regressed"]]
    gated = fail_if_drop is not None
    return {"pass": not regressed if gated else None,
            "gate": {"fail_if_drop": fail_if_drop, "alpha": settings.alpha, "regressed": regressed} if gated else None,
            "format": "extractor.compare/2", "provenance": {**task.provenance(), **stamp()},
            "runs": list(runs), "gold": gold, "corpus": corpus, "resamples": settings.resamples,
            "seed": settings.seed, "alpha": settings.alpha,
            "test": {"alternative": settings.alternative,
                     "family": "micro and every class (F1), and the grounded rate's micro and fields where "
                               "grounded, of every later run",
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
    for i, name in enumerate(runs[0].names):
        later = [f"{c['tests'][name]['f1_b']:.4f}{_marker(c['tests'][name], settings)}" for c in comparisons]
        table.add_row(escape(name), f"{base[i]:.4f}", *later)
    return table


def _test_table(c: dict, settings: CompareSettings, metric: str = "f1") -> Table:
    sided = "one-sided (drop)" if settings.alternative == DROP else "two-sided"
    label, what = ("F1", "class") if metric == "f1" else ("rate", "grounded")
    table = Table(what, f"{label} A", f"{label} B", "Δ (B−A)", "95% CI", "p", "p adj", "drop seen (80%)", "",
                  title=(f"A = {escape(c['a'])}, B = {escape(c['b'])}"
                         + ("" if metric == "f1" else ": grounded rate (values found in the text / extracted)")),
                  caption=f"p: paired swap test, {sided}; p adj: family-wise (max-T step-down over "
                          f"{c['family']['columns']} varying rows × {settings.comparisons} later run(s)); "
                          f"drop seen: smallest drop flagged with 80% power at this n (*: the runs agree on "
                          f"every record of that row, so it is sized as if their errors were independent)")
    for name, t in c["tests"].items():
        if t["metric"] != metric:
            continue
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
        right, wrong = (("every value grounded", "not") if cls.startswith(rate_column(""))
                        else ("right", "wrong"))
        console.print(f"{cls}: {f['right_in_a_wrong_in_b']} records {right} in A, {wrong} in B "
                      f"(e.g. {', '.join(f['examples_worse'][:5]) or '-'}); {f['wrong_in_a_right_in_b']} the reverse "
                      f"(e.g. {', '.join(f['examples_better'][:5]) or '-'})", highlight=False, markup=False)
