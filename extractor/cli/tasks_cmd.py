"""`extractor tasks [NAME]`: list tasks, or show one task's schema, prompt and scoring spec."""
from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from extractor.cli.options import tasks_dir_option
from extractor.prompting import render_messages, messages_to_raw
from extractor.tasks import available, load_task


@click.command()
@click.argument("name", required=False)
@tasks_dir_option
def tasks(name, tasks_dirs):
    """List the available tasks, or show one.

    \b
    Examples:
      extractor tasks
      extractor tasks jd_requirements
      extractor tasks --tasks-dir ./my_tasks my_task
    """
    console = Console()
    if name is None:
        table = Table("task", "version", "scoring", "description")
        for task_name in sorted(available(tasks_dirs)):
            task = load_task(task_name, tasks_dirs)
            table.add_row(task.name, task.version, task.spec.scoring.kind, task.spec.description)
        console.print(table)
        return
    task = load_task(name, tasks_dirs)
    spec = task.spec
    console.print(f"[bold]{task.name}[/bold] v{task.version} — {spec.description}")
    console.print(f"prompt: {task.prompt_path}\nschema: {task.schema_path} (hash {task.schema_hash})")
    console.print(f"input fields: {', '.join(spec.input_fields)}; prompt format: {spec.prompt_format}; "
                  f"few-shot examples: {len(spec.few_shot)}; absent marker: {spec.absent_marker}")
    console.print("[bold]scoring[/bold]: " + json.dumps(spec.scoring.model_dump(exclude_none=True),
                                                         ensure_ascii=False))
    console.print("[bold]generation[/bold]: " + json.dumps(spec.generation.model_dump()))
    console.print("[bold]schema[/bold]:")
    console.print_json(json.dumps(task.schema, ensure_ascii=False))
    example = {f: f"<{f}>" for f in spec.input_fields}
    console.print("[bold]prompt (raw format, example record)[/bold]:")
    console.print(messages_to_raw(render_messages(task, example)), markup=False, highlight=False)
