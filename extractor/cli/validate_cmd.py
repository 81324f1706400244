"""`extractor validate`: schema-check a predictions file from any producer."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from extractor.cli.options import tasks_dir_option
from extractor.cli.tables import status_table
from extractor.errors import InputError
from extractor.outputs import INVALID_JSON, OK, SCHEMA_VIOLATION, SCORED_STATUSES, Validator, judge
from extractor.tasks import load_task
from extractor.writers import iter_rows

TEXT_KEYS = ("raw", "output", "text", "response")


@click.command()
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", "task_name", required=True)
@click.option("--field", "field", default=None,
              help="Key holding the output: a JSON value (default 'prediction') or text to parse "
                   f"(tried in order: {', '.join(TEXT_KEYS)}).")
@click.option("--examples", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Examples shown per error kind.")
@tasks_dir_option
def validate(predictions, task_name, field, examples, tasks_dirs):
    """Check every line of PREDICTIONS against the task's schema; exit 1 if any is invalid
    (repaired outputs count as valid and are listed).

    \b
    Example:
      extractor validate other_tool_output.jsonl --task spo
    """
    task = load_task(task_name, tasks_dirs)
    validator = Validator(task.schema, task.registry)
    counts: Counter = Counter()
    shown: dict[str, list[str]] = {}
    for line, row in iter_rows(Path(predictions)):
        status, error = _check(row, field, validator, predictions, line)
        counts[status] += 1
        if status != OK:
            kind = f"{status}: {error.split(': ', 1)[-1][:80]}" if error else status
            shown.setdefault(kind, [])
            if len(shown[kind]) < examples:
                shown[kind].append(f"line {line} (id {row.get('id', line)}): {error}")
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
    if bad:
        sys.exit(1)


def _check(row: dict, field: str | None, validator: Validator, path, line) -> tuple[str, str | None]:
    key = field or ("prediction" if "prediction" in row else next((k for k in TEXT_KEYS if k in row), None))
    if key is None or key not in row:
        raise InputError(f"{path}:{line}: no output field found (keys: {', '.join(row)}); name it with --field")
    value = row[key]
    if isinstance(value, str) and key != "prediction":
        parsed = judge(value, row.get("finish_reason") or "stop", validator)
        return parsed.status, parsed.error
    if value is None:
        return INVALID_JSON, "prediction is null"
    error = validator.first_error(value)
    return (SCHEMA_VIOLATION, error) if error else (OK, None)
