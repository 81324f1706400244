"""`extractor eval`: score predictions against gold; metrics.json, tables and an HTML report."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from extractor import storage
from extractor.cli.options import READABLE, tasks_dir_option
from extractor.errors import InputError
from extractor.cli.tables import metrics_table, status_table
from extractor.provenance import write_json_atomic
from extractor.scoring.document import metrics_document, refuse_overwriting_inputs
from extractor.scoring.evaluate import evaluate
from extractor.tasks import load_task


@click.command("eval")
@click.argument("predictions", type=READABLE)
@click.option("--gold", required=True, type=READABLE,
              help="Gold JSONL/Parquet: {id, gold} lines, predictions lines, or the seed's {context, target}.")
@click.option("--task", "task_name", required=True, help="Task whose scoring spec to use.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write metrics.json (default: DIR/metrics.json with --report, else "
                   "<predictions>.metrics.json).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.html, summary.md and PNG charts to this folder.")
@click.option("--reparse", is_flag=True, help="Recompute statuses from the raw outputs with the current parser.")
@click.option("--examples", type=click.IntRange(0, 100), default=5, show_default=True,
              help="False positives/negatives listed per class.")
@click.option("--quiet", is_flag=True, help="Print only the micro F1 line.")
@tasks_dir_option
def eval_(predictions, gold, task_name, metrics_path, report_dir, reparse, examples, quiet, tasks_dirs):
    """Score PREDICTIONS against GOLD: P/R/F1 per class, micro/macro/weighted, status counts.

    \b
    Example:
      extractor eval preds.jsonl --gold gold.jsonl --task jd_requirements --report report/
    """
    task = load_task(task_name, tasks_dirs)
    pred_path, gold_path = storage.target(predictions), storage.target(gold)
    if report_dir and storage.is_remote(storage.target(report_dir)):
        raise InputError(f"--report {report_dir}: the report is a local folder; pass a local path")
    out = storage.target(metrics_path) if metrics_path else (
        Path(report_dir) / "metrics.json" if report_dir else pred_path.with_name(pred_path.name + ".metrics.json"))
    refuse_overwriting_inputs(_outputs(out, report_dir), {"predictions": pred_path, "gold": gold_path})
    ev = evaluate(task, pred_path, gold_path, reparse=reparse, examples=examples)
    if ev.n_gold == 0:
        raise InputError(f"{gold_path}: the gold file holds no records; nothing to score — pass the gold of "
                         "the eval set")
    doc = metrics_document(task, ev.result(), pred_path, gold_path)
    write_json_atomic(out, doc)
    console = Console()
    if not quiet:
        title = escape(f"{task.name} v{task.version}: {pred_path.name} vs {gold_path.name}")
        console.print(metrics_table(_markup_safe(doc), title=title))
        console.print(status_table(doc["status_counts"]))
        _print_records(console, doc)
    console.print(f"micro F1 {doc['micro']['f1']:.4f} (lenient {doc['lenient']['micro']['f1']:.4f}); "
                  f"metrics: {out}", highlight=False, markup=False)
    if report_dir:
        from extractor.scoring.report import write_report
        html_path, md_path = write_report(doc, Path(report_dir), f"{task.name}: {pred_path.name}")
        console.print(f"report: {html_path} (summary {md_path})", highlight=False, markup=False)


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
