"""`extractor eval`: score predictions against gold, and the grounded rate with or without gold; metrics.json,
tables and an HTML report."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from extractor.store import locations
from extractor.cli.options import READABLE, complete_task_names, corpus_options, tasks_dir_option
from extractor.errors import InputError
from extractor.cli.tables import console as make_console, metrics_table, status_table
from extractor.store.provenance import write_json_atomic
from extractor.store.clashes import refuse_overwriting_inputs
from extractor.scoring.document import metrics_document
from extractor.scoring.evaluate import evaluate
from extractor.scoring.join import CorpusJoin
from extractor.scoring.alignment import FUZZY_THRESHOLD
from extractor.tasks.task import load_task


@click.command("eval")
@click.argument("predictions", type=READABLE)
@click.option("--gold", default=None, type=READABLE,
              help="Gold JSONL/Parquet: {id, gold} lines, predictions lines, or the seed's {context, target}. "
                   "Without it only the grounded rate is scored (the text from --corpus, or the rows' kept "
                   "text or spans).")
@click.option("--corpus", default=None, type=READABLE,
              help="The corpus the predictions were made from: each record's text, to ground the values in "
                   "(else the rows' kept `text`, the gold's text, or the rows' `spans`).")
@click.option("--task", "task_name", required=True, help="Task whose scoring spec to use.",
              shell_complete=complete_task_names)
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write metrics.json (default: DIR/metrics.json with --report, else "
                   "<predictions>.metrics.json).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.html, summary.md and PNG charts to this folder.")
@click.option("--reparse", is_flag=True, help="Recompute statuses from the raw outputs with the current parser.")
@click.option("--examples", type=click.IntRange(0, 100), default=5, show_default=True,
              help="Most frequent wrong values, false positives and false negatives listed per class.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the micro F1 line.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the metrics document (what metrics.json holds) on stdout and nothing else there; "
                   "tables and notes go to stderr (none with --quiet).")
@corpus_options
@tasks_dir_option
def eval_(predictions, gold, corpus, task_name, metrics_path, report_dir, reparse, examples, quiet, as_json,
          id_field, text_field, tasks_dirs):
    """Score PREDICTIONS against GOLD: P/R/F1 per class, micro/macro/weighted, status counts; and the grounded
    rate (values found in their record's text / values extracted) per field, with or without gold.

    \b
    Examples:
      extractor eval preds.jsonl --gold gold.jsonl --task jd_requirements --report report/
      extractor eval nightly.jsonl --corpus dump.jsonl --task jd_requirements
      extractor eval preds.jsonl --gold gold.jsonl --task jd_requirements --json --quiet | jq .micro.f1
    """
    task = load_task(task_name, tasks_dirs)
    pred_path = locations.target(predictions)
    gold_path = locations.target(gold) if gold else None
    if report_dir and locations.is_remote(locations.target(report_dir)):
        raise InputError(f"--report {report_dir}: the report is a local folder; pass a local path")
    out = locations.target(metrics_path) if metrics_path else (
        Path(report_dir) / "metrics.json" if report_dir else pred_path.with_name(pred_path.name + ".metrics.json"))
    inputs = {"predictions": pred_path, "gold": gold_path, "corpus": locations.target(corpus) if corpus else None}
    refuse_overwriting_inputs(_outputs(out, report_dir), {k: v for k, v in inputs.items() if v is not None}, task)
    reader = _corpus_reader(task, corpus, id_field, text_field)
    joined = CorpusJoin()
    ev = evaluate(task, pred_path, gold_path, reparse=reparse, examples=examples, corpus=reader, corpus_join=joined)
    if gold_path is not None and ev.n_gold == 0:
        raise InputError(f"{gold_path}: the gold file holds no records; nothing to score — pass the gold of "
                         "the eval set")
    result = ev.result()
    if gold_path is None:
        _check_gold_free(task, pred_path, ev, corpus)
    doc = metrics_document(task, result, pred_path, gold_path, corpus, joined if reader else None)
    write_json_atomic(out, doc)
    console = make_console(stderr=as_json, quiet=as_json and quiet)
    if gold_path is None:
        _print_gold_free(console, doc, quiet, task, pred_path, out)
    elif not quiet:
        title = escape(f"{task.name} v{task.version}: {pred_path.name} vs {gold_path.name}")
        console.print(metrics_table(doc, title=title))  # cells are escaped by metrics_table
        console.print(status_table(doc["status_counts"]))
        _print_records(console, doc)
        _print_grounding(console, doc)
    if gold_path is not None:
        console.print(f"micro F1 {doc['micro']['f1']:.4f} (lenient {doc['lenient']['micro']['f1']:.4f})"
                      f"{_rate_note(doc)}; metrics: {out}", highlight=False, markup=False)
    if report_dir:
        from extractor.scoring.report import write_report
        html_path, md_path = write_report(doc, Path(report_dir), f"{task.name}: {pred_path.name}")
        console.print(f"report: {html_path} (summary {md_path})", highlight=False, markup=False)
    if as_json:
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))


def _markup_safe(doc: dict) -> dict:
    """The document with class names escaped for rich: a class is data (a model's label, say), not markup."""
    return {**doc, "classes": {escape(cls): m for cls, m in doc["classes"].items()}}


def _outputs(metrics, report_dir) -> dict:
    """Every file this command writes, by the option that names it."""
    # write_json_atomic writes NAME.tmp first, then renames it over NAME: both must be free
    outputs = {"--metrics": metrics, "--metrics (its temporary file)": metrics.with_name(metrics.name + ".tmp")}
    if report_dir:
        from extractor.scoring.report import REPORT_FILES
        outputs.update({f"--report ({name})": Path(report_dir) / name for name in REPORT_FILES})
    return outputs


def _print_records(console, doc):
    rec = doc["records"]
    console.print(f"records scored: {rec['scored']}; gold without prediction: {rec['missing']}; "
                  f"predictions not in gold: {rec['extra_predictions']}; malformed predictions: "
                  f"{rec['malformed']}; malformed gold: {rec['malformed_gold']}", highlight=False)
    for key, what in (("malformed_ids", "malformed predictions (scored as empty)"),
                      ("malformed_gold_ids", "malformed gold (not scored)")):
        if doc[key]:
            console.print(f"{what}: " + ", ".join(doc[key][:20]) + (" …" if len(doc[key]) > 20 else ""),
                          highlight=False, markup=False)
    if doc["missing_ids"]:
        console.print("missing ids: " + ", ".join(doc["missing_ids"][:20])
                      + (" …" if rec["missing"] > 20 else ""), highlight=False, markup=False)
    if doc["extra_ids"]:
        console.print("ids not in gold: " + ", ".join(doc["extra_ids"][:20])
                      + (" …" if rec["extra_predictions"] > 20 else ""), highlight=False, markup=False)


def _corpus_reader(task, corpus, id_field: str, text_field: str | None):
    if not corpus:
        return None
    from extractor.store.corpus import CorpusReader
    return CorpusReader(corpus, task.spec.input_fields, id_field=id_field, text_field=text_field)


def _check_gold_free(task, pred_path, ev, corpus) -> None:
    """Without gold the grounded rate is the score: refuse a run where nothing could be grounded."""
    g = ev.grounder
    if not g.active:
        raise InputError(f"task {task.name}: scoring kind '{task.spec.scoring.kind}' extracts no text values to "
                         "ground, so there is nothing to score without gold; pass --gold")
    if ev.n_predictions == 0:
        raise InputError(f"{pred_path}: holds no predictions; nothing to score — pass the predictions file")
    if ev.grounding.records_grounded == 0:
        where = (f"none of its ids is in {corpus}" if corpus else
                 "its rows keep no text or spans; pass --corpus CORPUS (the corpus the run read)")
        raise InputError(f"{pred_path}: no record has a text to ground its values in: {where}; or pass --gold")


def _rate_note(doc: dict) -> str:
    grounding = doc.get("grounding")
    if not grounding or grounding["micro"]["rate"] is None:
        return ""
    return f"; grounded {grounding['micro']['rate']:.4f}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def grounding_table(grounding: dict, title: str = "") -> Table:
    """Grounded rate per field and micro; with gold, how grounded values split between TP and FP."""
    table = Table("field", "extracted", "grounded", "rate", "exact", "normalized", "fuzzy", "copied from prompt",
                  title=title or f"grounded rate (fuzzy similarity ≥ {FUZZY_THRESHOLD})")
    for name, m in grounding["fields"].items():
        table.add_row(escape(name), str(m["extracted"]), str(m["grounded"]), _pct(m["rate"]), str(m["exact"]),
                      str(m["normalized"]), str(m["fuzzy"]), str(m["copied_from_prompt"]))
    table.add_section()
    m = grounding["micro"]
    table.add_row("micro", str(m["extracted"]), str(m["grounded"]), _pct(m["rate"]), str(m["exact"]),
                  str(m["normalized"]), str(m["fuzzy"]), str(m["copied_from_prompt"]), style="bold")
    return table


def outcome_table(by_outcome: dict) -> Table:
    table = Table("class", "TP grounded", "TP ungrounded", "FP grounded", "FP ungrounded", "grounded among TP",
                  "grounded among FP", title="grounded and ungrounded predictions by outcome")
    rows = [*((escape(c), m) for c, m in by_outcome["classes"].items()), ("micro", by_outcome["micro"])]
    for name, m in rows:
        table.add_row(name, str(m["tp_grounded"]), str(m["tp_ungrounded"]), str(m["fp_grounded"]),
                      str(m["fp_ungrounded"]), _pct(m["tp_rate"]), _pct(m["fp_rate"]),
                      style="bold" if name == "micro" else None)
    return table


def _print_grounding(console, doc: dict) -> None:
    grounding = doc.get("grounding")
    if not grounding:
        return
    console.print(grounding_table(grounding))
    if grounding.get("by_outcome"):
        console.print(outcome_table(grounding["by_outcome"]))
    for field, values in grounding["ungrounded"].items():
        listed = ", ".join(f"{v['value']!r}×{v['count']}" + (" (from the prompt)" if v["copied_from_prompt"] else "")
                           for v in values)
        console.print(f"ungrounded {field}: {listed}", highlight=False, markup=False)
    missing = grounding["records"]["without_text"]
    if missing:
        console.print(f"records with values but no text or spans to ground them: {missing} (e.g. "
                      + ", ".join(grounding["without_text_ids"][:5]) + "); pass --corpus", highlight=False,
                      markup=False)


def _print_gold_free(console, doc: dict, quiet: bool, task, pred_path, out) -> None:
    if not quiet:
        console.print(escape(f"{task.name} v{task.version}: {pred_path.name} (no gold: grounded rate only)"),
                      highlight=False)
        console.print(status_table(doc["status_counts"]))
        _print_grounding(console, doc)
    m = doc["grounding"]["micro"]
    console.print(f"grounded rate {_pct(m['rate'])} ({m['grounded']} of {m['extracted']} values); metrics: {out}",
                  highlight=False, markup=False)
