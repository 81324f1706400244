"""Render a record into a prompt: the task's messages (Jinja, sandboxed: templates.py) with few-shot turns.

The templates are compiled here from the Task this module is handed (`compile_templates`); a PromptBuilder
compiles them once. A model's chat template is rendered by templates.ChatTemplate, under the same limits as
the task's templates (a model folder is input too), to the text tokenizer.apply_chat_template gives.
"""
from __future__ import annotations

from extractor.errors import TaskError
from extractor.tasks.task import Task
from extractor.tasks.templates import ChatTemplate, Templates

RAW_FORMAT = ("Instruction: ", "\nInput: ", "\nAnswer: ")


def compile_templates(task: Task) -> Templates:
    return Templates(task.spec.messages, task.prompt_path, task.spec.input_fields)


def few_shot_turns(task: Task, limit: int | None = None, templates: Templates | None = None) -> list[dict]:
    """The user/assistant exchanges of the first `limit` few-shot examples (all when None)."""
    templates = compile_templates(task) if templates is None else templates
    turns = []
    for shot in task.spec.few_shot[:limit]:
        shot_turns = templates.render(shot.input, where=f"{task.prompt_path}: few_shot")
        turns += [t for t in shot_turns if t["role"] != "system"]
        turns.append({"role": "assistant", "content": task.format_output(shot.output)})
    return turns


def render_messages(task: Task, values: dict, where: str = "record", shots: list[dict] | None = None,
                    templates: Templates | None = None) -> list[dict]:
    """System turns, then one user/assistant exchange per few-shot example, then the record's turns."""
    templates = compile_templates(task) if templates is None else templates
    turns = templates.render(values, where)
    shots = few_shot_turns(task, templates=templates) if shots is None else shots
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


def uses_chat_template(task: Task, tokenizer) -> bool:
    fmt = task.spec.prompt_format
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if fmt == "chat" and not has_template:
        raise TaskError(f"task '{task.name}' asks for prompt_format: chat but the tokenizer has no chat "
                        "template; set prompt_format: raw or auto")
    return fmt == "chat" or (fmt == "auto" and has_template)


class PromptBuilder:
    """Turns records into prompt strings for one task and one tokenizer (or none: raw format)."""

    def __init__(self, task: Task, tokenizer=None, few_shot: int | None = None):
        self.task = task
        self.tokenizer = tokenizer
        self.chat = uses_chat_template(task, tokenizer)
        self.few_shot = len(task.spec.few_shot) if few_shot is None else min(few_shot, len(task.spec.few_shot))
        self.templates = compile_templates(task)
        self._shots = few_shot_turns(task, self.few_shot, self.templates)
        self.chat_template = ChatTemplate(tokenizer) if self.chat else None
        if self.chat_template is not None:  # a template that fails or loops fails here, before any work
            self.build({f: f"<{f}>" for f in task.spec.input_fields}, "example record")

    def messages(self, values: dict, where: str = "record") -> list[dict]:
        return render_messages(self.task, values, where, self._shots, self.templates)

    def build(self, values: dict, where: str = "record") -> str:
        messages = self.messages(values, where)
        if self.chat_template is not None:
            return self.chat_template.render(messages)
        return messages_to_raw(messages)
