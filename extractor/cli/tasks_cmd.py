"""`extractor tasks [NAME]`: list tasks, or show one task's schema, prompt and scoring spec."""
from __future__ import annotations

import json

import click

from extractor.cli.options import complete_task_names, json_option, tasks_dir_option
from extractor.cli.tables import console as make_console, rows_table
from extractor.tasks.prompting import render_messages, messages_to_raw
from extractor.tasks.task import available, load_task


@click.command()
@click.argument("name", required=False, shell_complete=complete_task_names)
@tasks_dir_option
@json_option("the list (or the task)")
def tasks(name, tasks_dirs, as_json):
    """List the available tasks, or show one.

    The prompt shown is the task's raw format; `extractor run ... --print-prompt ID` shows the exact input
    a model gets (its chat template applied) and its token count.

    \b
    Examples:
      extractor tasks
      extractor tasks jd_requirements
      extractor tasks --tasks-dir ./my_tasks my_task
      extractor tasks --json | jq -r '.[].name'
    """
    if name is None:
        loaded = [load_task(task_name, tasks_dirs) for task_name in sorted(available(tasks_dirs))]
        if as_json:
            click.echo(json.dumps([_summary(task) for task in loaded], ensure_ascii=False, indent=2))
            return
        make_console().print(rows_table(("task", "version", "scoring", "description"),
                                        ((t.name, t.version, t.spec.scoring.kind, t.spec.description)
                                         for t in loaded)))
        return
    task = load_task(name, tasks_dirs)
    if as_json:
        click.echo(json.dumps(_details(task), ensure_ascii=False, indent=2))
        return
    _show(make_console(), task)


def _summary(task) -> dict:
    return {"name": task.name, "version": task.version, "scoring": task.spec.scoring.kind,
            "description": task.spec.description, "prompt": str(task.prompt_path)}


def _details(task) -> dict:
    spec = task.spec
    return {**_summary(task), "schema_path": str(task.schema_path), "schema_hash": task.schema_hash,
            "input_fields": list(spec.input_fields), "prompt_format": spec.prompt_format,
            "few_shot": len(spec.few_shot), "absent_marker": spec.absent_marker,
            "scoring": spec.scoring.model_dump(exclude_none=True), "generation": spec.generation.model_dump(),
            "schema": task.schema, "example_prompt": _example_prompt(task)}


def _example_prompt(task) -> str:
    return messages_to_raw(render_messages(task, {f: f"<{f}>" for f in task.spec.input_fields}))


def _show(console, task) -> None:
    spec = task.spec
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731 - task text is data
    say(f"{task.name} v{task.version} — {spec.description}")
    say(f"prompt: {task.prompt_path}\nschema: {task.schema_path} (hash {task.schema_hash})")
    say(f"input fields: {', '.join(spec.input_fields)}; prompt format: {spec.prompt_format}; "
        f"few-shot examples: {len(spec.few_shot)}; absent marker: {spec.absent_marker}")
    say("scoring: " + json.dumps(spec.scoring.model_dump(exclude_none=True), ensure_ascii=False))
    say("generation: " + json.dumps(spec.generation.model_dump()))
    say("schema:")
    console.print_json(json.dumps(task.schema, ensure_ascii=False))
    say("prompt (raw format, example record; `run --print-prompt ID` shows a model's exact input):")
    say(_example_prompt(task))
