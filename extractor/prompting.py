"""Render a record into a prompt: the task's messages (Jinja, sandboxed) with few-shot turns.

Templates run in an immutable sandbox with no loader: no file access, no attribute access to Python
internals, no calls to unsafe callables. Undefined variables are errors, so a misspelt field fails.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from extractor.errors import InputError, TaskError

if TYPE_CHECKING:
    from extractor.tasks import Task

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
RAW_FORMAT = ("Instruction: ", "\nInput: ", "\nAnswer: ")


def compile_templates(task: "Task") -> list:
    templates = []
    for i, msg in enumerate(task.spec.messages):
        try:
            templates.append(_ENV.from_string(msg.content))
        except TemplateSyntaxError as exc:
            raise TaskError(f"{task.prompt_path}: messages.{i}.content line {exc.lineno}: "
                            f"template syntax error ({exc.message})") from None
    # Render the few-shot inputs now, so a template that needs a field the examples lack fails at load.
    for shot in task.spec.few_shot:
        _render_turns(task, shot.input, where=f"{task.prompt_path}: few_shot")
    return templates


def _render_turns(task: "Task", values: dict, where: str) -> list[dict]:
    out = []
    for msg, template in zip(task.spec.messages, task._templates):
        try:
            out.append({"role": msg.role, "content": template.render(**values)})
        except UndefinedError as exc:
            raise InputError(f"{where}: template needs a value that is missing ({exc.message}); "
                             f"check the task's input_fields ({', '.join(task.spec.input_fields)})") from None
        except SecurityError as exc:
            raise TaskError(f"{task.prompt_path}: template refused by the sandbox ({exc})") from None
    return out


def few_shot_turns(task: "Task", limit: int | None = None) -> list[dict]:
    """The user/assistant exchanges of the first `limit` few-shot examples (all when None)."""
    turns = []
    for shot in task.spec.few_shot[:limit]:
        shot_turns = _render_turns(task, shot.input, where=f"{task.prompt_path}: few_shot")
        turns += [t for t in shot_turns if t["role"] != "system"]
        turns.append({"role": "assistant", "content": task.format_output(shot.output)})
    return turns


def render_messages(task: "Task", values: dict, where: str = "record", shots: list[dict] | None = None) -> list[dict]:
    """System turns, then one user/assistant exchange per few-shot example, then the record's turns."""
    turns = _render_turns(task, values, where)
    shots = few_shot_turns(task) if shots is None else shots
    return ([t for t in turns if t["role"] == "system"] + shots
            + [t for t in turns if t["role"] != "system"])


def messages_to_raw(messages: list[dict]) -> str:
    """The seed's format: `Instruction: …\\nInput: …\\nAnswer: `, few-shot answers inline."""
    instruction = "\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [RAW_FORMAT[0], instruction]
    for m in messages:
        if m["role"] == "user":
            parts += [RAW_FORMAT[1], m["content"], RAW_FORMAT[2]]
        elif m["role"] == "assistant":
            parts += [m["content"]]
    return "".join(parts)


def uses_chat_template(task: "Task", tokenizer) -> bool:
    fmt = task.spec.prompt_format
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if fmt == "chat" and not has_template:
        raise TaskError(f"task '{task.name}' asks for prompt_format: chat but the tokenizer has no chat "
                        "template; set prompt_format: raw or auto")
    return fmt == "chat" or (fmt == "auto" and has_template)


class PromptBuilder:
    """Turns records into prompt strings for one task and one tokenizer (or none: raw format)."""

    def __init__(self, task: "Task", tokenizer=None, few_shot: int | None = None):
        self.task = task
        self.tokenizer = tokenizer
        self.chat = uses_chat_template(task, tokenizer)
        self.few_shot = len(task.spec.few_shot) if few_shot is None else min(few_shot, len(task.spec.few_shot))
        self._shots = few_shot_turns(task, self.few_shot)

    def messages(self, values: dict, where: str = "record") -> list[dict]:
        return render_messages(self.task, values, where, self._shots)

    def build(self, values: dict, where: str = "record") -> str:
        messages = self.messages(values, where)
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages_to_raw(messages)
