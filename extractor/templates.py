"""A task file's message templates, compiled and rendered in a sandbox (Jinja).

Templates run in an immutable sandbox with no loader: no file access, no attribute access to Python
internals, no calls to unsafe callables. Undefined variables are errors, so a misspelt field fails.
Loading a task compiles them (`tasks.load_task_file`: syntax errors at load time); prompting compiles them
from the Task it is handed.
"""
from __future__ import annotations

from pathlib import Path

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from extractor.errors import InputError, TaskError

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class Templates:
    """The compiled templates of a task's messages (each a role and a Jinja content), from the file at `path`."""

    def __init__(self, messages, path: Path, input_fields: list[str]):
        self.roles = [msg.role for msg in messages]
        self.path = path
        self.input_fields = input_fields
        self.compiled = []
        for i, msg in enumerate(messages):
            try:
                self.compiled.append(_ENV.from_string(msg.content))
            except TemplateSyntaxError as exc:
                raise TaskError(f"{path}: messages.{i}.content line {exc.lineno}: "
                                f"template syntax error ({exc.message})") from None

    def render(self, values: dict, where: str) -> list[dict]:
        """One {role, content} turn per message, rendered with `values`."""
        out = []
        for role, template in zip(self.roles, self.compiled):
            try:
                out.append({"role": role, "content": template.render(**values)})
            except UndefinedError as exc:
                raise InputError(f"{where}: template needs a value that is missing ({exc.message}); "
                                 f"check the task's input_fields ({', '.join(self.input_fields)})") from None
            except SecurityError as exc:
                raise TaskError(f"{self.path}: template refused by the sandbox ({exc})") from None
        return out
