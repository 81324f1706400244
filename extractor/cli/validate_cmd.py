"""`extractor validate`: schema-check a predictions file from any producer; with --corpus, ground its values in
the records' texts (the grounded rate, and the rows with `spans` added under --spans-out)."""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from extractor.store import locations
from extractor.cli.options import READABLE, complete_task_names, corpus_options, tasks_dir_option
from extractor.cli.tables import status_table
from extractor.errors import InputError
from extractor.results.judge import INVALID_JSON, OK, SCHEMA_VIOLATION, SCORED_STATUSES, Validator, judge
from extractor import jsonutil
from extractor.tasks.task import load_task
from extractor.store.writers import iter_rows

TEXT_KEYS = ("raw", "output", "text", "response")


@click.command()
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", "task_name", required=True, shell_complete=complete_task_names)
@click.option("--field", "field", default=None,
              help="Key holding the output: a JSON value (default 'prediction') or text to parse "
                   f"(tried in order: {', '.join(TEXT_KEYS)}).")
@click.option("--examples", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Examples shown per error kind.")
@click.option("--corpus", default=None, type=READABLE,
              help="The corpus the predictions were made from: ground each value in its record's text and "
                   "report the grounded rate per field.")
@click.option("--spans-out", type=click.Path(dir_okay=False), default=None,
              help="With --corpus: write the rows here (JSONL) with `spans` added, for eval and compare.")
@corpus_options
@tasks_dir_option
def validate(predictions, task_name, field, examples, corpus, spans_out, id_field, text_field, tasks_dirs):
    """Check every line of PREDICTIONS against the task's schema; exit 1 if any is invalid
    (repaired outputs count as valid and are listed). With --corpus, also locate every extracted value in
    its record's text (exact, normalized, fuzzy) and report the grounded rate.

    \b
    Examples:
      extractor validate other_tool_output.jsonl --task spo
      extractor validate other_tool_output.jsonl --task jd_requirements --corpus postings.jsonl \\
          --spans-out with_spans.jsonl
    """
    task = load_task(task_name, tasks_dirs)
    if spans_out and not corpus:
        raise InputError("--spans-out needs --corpus: spans are offsets into the corpus's texts")
    if spans_out:
        from extractor.store.clashes import refuse_overwriting_inputs
        refuse_overwriting_inputs({"--spans-out": locations.target(spans_out)},
                                  {"predictions": Path(predictions), "corpus": locations.target(corpus)}, task)
    validator = Validator(task.schema, task.registry)
    counts: Counter = Counter()
    shown: dict[str, list[str]] = {}
    checked = _checked_rows(predictions, field, validator)
    grounding = _Grounding(task, corpus, id_field, text_field, predictions, spans_out) if corpus else None
    if grounding is not None:
        checked = grounding.rows(checked)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(locations.atomic_writer(locations.target(spans_out))) if spans_out else None
        for item in checked:
            _tally(item, counts, shown, examples)
            if out is not None:
                out.write((jsonutil.dumps(item.row) + "\n").encode("utf-8"))
    if not counts:
        raise InputError(f"{predictions}: holds no records; nothing to validate — pass the predictions file")
    console = Console()
    console.print(status_table(dict(sorted(counts.items()))))
    for kind, lines in shown.items():
        console.print(f"[bold]{escape(kind)}[/bold]", highlight=False)  # kind quotes model output
        for text in lines:
            console.print(f"  {text}", highlight=False, markup=False)
    bad = sum(n for s, n in counts.items() if s not in SCORED_STATUSES)
    console.print(f"{sum(counts.values())} records, {bad} invalid", highlight=False)
    if grounding is not None:
        grounding.report(console)
    if bad:
        sys.exit(1)


@dataclass
class _Checked:
    id: str
    line: int
    row: dict
    status: str
    error: str | None
    obj: object


def _checked_rows(predictions, field, validator) -> Iterator[_Checked]:
    for line, row in iter_rows(Path(predictions)):
        status, error, obj = _check(row, field, validator, predictions, line)
        rid = str(row["id"]) if row.get("id") is not None else str(line)
        yield _Checked(rid, line, row, status, error, obj)


def _tally(item: _Checked, counts: Counter, shown: dict, examples: int) -> None:
    line, row, status, error = item.line, item.row, item.status, item.error
    counts[status] += 1
    if status != OK:
        kind = f"{status}: {error.split(': ', 1)[-1][:80]}" if error else status
        shown.setdefault(kind, [])
        if len(shown[kind]) < examples:
            shown[kind].append(f"line {line} (id {row.get('id', line)}): {error}")


def _check(row: dict, field: str | None, validator: Validator, path, line) -> tuple[str, str | None, object]:
    key = field or ("prediction" if "prediction" in row else next((k for k in TEXT_KEYS if k in row), None))
    if key is None or key not in row:
        raise InputError(f"{path}:{line}: no output field found (keys: {', '.join(row)}); name it with --field")
    value = row[key]
    if isinstance(value, str) and key != "prediction":
        parsed = judge(value, row.get("finish_reason") or "stop", validator)
        return parsed.status, parsed.error, parsed.prediction
    if value is None:
        return INVALID_JSON, "prediction is null", None
    error = validator.first_error(value)
    return (SCHEMA_VIOLATION, error, value) if error else (OK, None, value)


class _Grounding:
    """validate --corpus: each checked row joined with its corpus record by id, its values grounded."""

    def __init__(self, task, corpus, id_field, text_field, predictions, spans_out):
        from extractor.store.corpus import CorpusReader
        from extractor.scoring.grounded_rate import GroundedRate
        from extractor.scoring.grounding import Grounder
        self.reader = CorpusReader(corpus, task.spec.input_fields, id_field=id_field, text_field=text_field)
        self.field0 = task.spec.input_fields[0]
        self.grounder = Grounder(task)
        if not self.grounder.active:
            raise InputError(f"task {task.name}: scoring kind '{task.spec.scoring.kind}' extracts no text values "
                             "to ground; drop --corpus")
        self.rate = GroundedRate()
        self.path, self.corpus, self.spans_out = Path(predictions), corpus, spans_out
        self.not_in_corpus: list[str] = []

    def rows(self, checked: Iterator[_Checked]) -> Iterator[_Checked]:
        from extractor.scoring.join import CorpusText, join
        texts = (CorpusText(r["id"], r["values"][self.field0]) for batch in self.reader for r in batch)
        for _, item, rec in join(checked, texts, self.path, self.reader.path):
            if item is not None:
                self._ground(item, rec)
                yield item

    def _ground(self, item: _Checked, rec) -> None:
        if rec is None:
            if len(self.not_in_corpus) < 100:
                self.not_in_corpus.append(item.id)
            return
        if item.status not in SCORED_STATUSES or item.obj is None:
            return
        spans = self.grounder.ground(rec.text, item.obj)
        item.row = {**item.row, "spans": spans}
        self.rate.add(item.id, *self.grounder.summarize(spans))

    def report(self, console) -> None:
        from extractor.cli.eval_cmd import _print_grounding
        result = self.rate.result()
        _print_grounding(console, {"grounding": result})
        m = result["micro"]
        rate = "—" if m["rate"] is None else f"{m['rate']:.4f}"
        console.print(f"grounded rate {rate} ({m['grounded']} of {m['extracted']} values)"
                      + (f"; spans: {self.spans_out}" if self.spans_out else ""), highlight=False, markup=False)
        if self.not_in_corpus:
            console.print(f"ids not in {self.corpus} (not grounded): " + ", ".join(self.not_in_corpus[:20]),
                          highlight=False, markup=False)
