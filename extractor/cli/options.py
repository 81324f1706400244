"""Option decorators shared by several commands."""
from __future__ import annotations

import click

from extractor.store import locations
from extractor.tasks.task import TASKS_DIR_ENV


class Readable(click.ParamType):
    """A local file that exists, or an object-store URI (s3://, gs://, az://, hf://; checked when read, where
    a missing object or a refusal is one line). The value stays the string given."""

    name = "file|uri"

    def convert(self, value, param, ctx):
        try:
            location = locations.target(value)
        except locations.StorageError as exc:
            self.fail(str(exc), param, ctx)
        if not locations.is_remote(location) and not location.is_file():
            self.fail(f"'{value}': {_not_a_file(location)}", param, ctx)
        return value


def _not_a_file(path) -> str:
    """Why a local path is not a file to read: absent, a folder, or a FIFO or device (read once, or not at all)."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a directory, not a file"
    return "is a FIFO or device, not a regular file; save it to a file first"


READABLE = Readable()


def tasks_dir_option(fn):
    return click.option("--tasks-dir", "tasks_dirs", multiple=True, type=click.Path(file_okay=False),
                        help=f"Extra folder of task files (prompts/*.yaml + schemas/*.json); "
                             f"also ${TASKS_DIR_ENV}.")(fn)


def corpus_options(fn):
    fn = click.option("--id-field", default="id", show_default=True,
                      help="Record id column; when absent, ids are line numbers.")(fn)
    fn = click.option("--text-field", default=None,
                      help="Column feeding the task's text input (default: the task's input field name).")(fn)
    return fn


def bad_record_options(fn):
    fn = click.option("--on-bad-record", type=click.Choice(["fail", "skip"]), default="fail",
                      show_default=True, help="fail: stop at the first bad record; skip: write it to "
                                              "the rejects file and go on.")(fn)
    fn = click.option("--rejects", type=click.Path(dir_okay=False), default=None,
                      help="Rejects file for --on-bad-record skip (default: <output>.rejects.jsonl).")(fn)
    return fn


def complete_task_names(ctx, param, incomplete: str) -> list[str]:
    """Shell completion of a task name: the bundled tasks, $EXTRACTOR_TASKS_DIR's and --tasks-dir's (where
    already typed). Completion must never fail, so a folder it cannot read completes nothing of its own."""
    from extractor.tasks.task import available
    dirs = ctx.params.get("tasks_dirs") or ()
    try:
        names = available(dirs)
    except Exception:  # noqa: BLE001 - a completion that raises prints a traceback into the shell
        return []
    return sorted(name for name in names if name.startswith(incomplete))


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout.")
