"""Task bundles: `prompts/<task>.yaml` (prompt spec) + `schemas/<task>.json` (JSON Schema 2020-12).

A task is loaded and checked in full at start, so a typo fails before any work with the file, the key and
the fix. Bundled tasks ship inside the package (`extractor/_tasks`, built from the top-level folders);
users add their own with `--tasks-dir DIR` or `EXTRACTOR_TASKS_DIR` (several joined with `os.pathsep`).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from extractor.errors import ExtractorError, TaskError
from extractor.plugins import scoring_kind
from extractor.tasks.schema_refs import SchemaRegistry, load_registry
from extractor.tasks.templates import Templates

TASKS_DIR_ENV = "EXTRACTOR_TASKS_DIR"
PROMPT_SUFFIX = ".yaml"
SCHEMA_SUFFIX = ".json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class FewShot(_Strict):
    input: dict[str, str] = Field(description="values of the task's input fields")
    output: Any = Field(description="the expected JSON output")


class Generation(_Strict):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class Scoring(_Strict):
    kind: str  # a registered scoring kind (scoring/facts.py): fields, tuples, labels, or a plugin's
    fields: list[str] | None = None  # kind=fields: the list-valued fields to score
    class_field: str | None = None  # kind=tuples: which key names the class (e.g. predicate)
    key_fields: list[str] | None = None  # kind=tuples: the keys that identify a fact
    match: Literal["exact", "normalized"] = "normalized"
    strip_punctuation: str = ""  # characters removed in normalized mode
    strip_book_title: bool = False  # DuIE: strip one surrounding 《》 pair

    @model_validator(mode="after")
    def _kind_needs(self):
        try:
            needs = scoring_kind(self.kind).needs
        except ExtractorError as exc:
            raise ValueError(str(exc)) from None
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"scoring kind '{self.kind}' needs {', '.join(missing)}")
        return self


class PromptSpec(_Strict):
    name: str
    version: str
    description: str
    schema_file: str = Field(alias="schema")
    input_fields: list[str] = Field(min_length=1)
    prompt_format: Literal["auto", "chat", "raw"] = "auto"
    messages: list[Message] = Field(min_length=1)
    few_shot: list[FewShot] = []
    output_fence: bool = False  # targets/examples written inside ```json fences, as in the seed
    absent_marker: str | None = None  # a value meaning "not required"; scored as an empty list
    generation: Generation = Generation()
    scoring: Scoring
    # A prompt over the input limit (the command line's --on-long, --chunk-tokens, --chunk-overlap win):
    # stop, cut the text, skip the record, or split it into overlapping chunks (pipeline/chunks.py).
    on_long: Literal["fail", "truncate", "skip", "chunk"] | None = None
    chunk_tokens: int | None = Field(None, ge=1)  # tokens of text per chunk; default: as many as fit the limit
    chunk_overlap: int | None = Field(None, ge=0)  # tokens each chunk repeats of the one before (default 64)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _chunk_overlap_below_size(self):
        if self.chunk_tokens is not None and self.chunk_overlap is not None and self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be less than chunk_tokens "
                             f"({self.chunk_tokens}); lower the overlap")
        return self


@dataclass(frozen=True)
class Task:
    """A loaded, checked task: its spec, its schema and where they came from. `registry` holds every
    resource the schema references (all inside the task folder): validators are built with it."""

    spec: PromptSpec
    schema: dict
    prompt_path: Path
    schema_path: Path
    registry: SchemaRegistry

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @cached_property
    def schema_hash(self) -> str:
        return _sha(json.dumps(self.schema, sort_keys=True, ensure_ascii=False))

    @cached_property
    def constraint_schema(self):
        """The schema as one document (references to other files bundled under `$defs`): what constrained
        decoding compiles, since grammar engines do not follow references out of the document."""
        from extractor.tasks.schema_bundle import self_contained
        return self_contained(self.schema, self.registry)

    @cached_property
    def prompt_hash(self) -> str:
        return _sha(self.prompt_path.read_text(encoding="utf-8"))

    def provenance(self) -> dict:
        return {"task": self.name, "task_version": self.version,
                "schema_hash": self.schema_hash, "prompt_hash": self.prompt_hash}

    def format_output(self, obj) -> str:
        """The text a model should produce for `obj` (few-shot answers, training targets)."""
        text = json.dumps(obj, ensure_ascii=False)
        return f"```json\n{text}\n```" if self.spec.output_fence else text


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def bundled_dirs() -> list[Path]:
    """The bundled task root: inside an installed wheel, or the source checkout (editable install)."""
    pkg = Path(__file__).resolve().parent.parent  # the extractor package
    for root in (pkg / "_tasks", pkg.parent):
        if (root / "prompts").is_dir() and (root / "schemas").is_dir():
            return [root]
    return []


def search_dirs(extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """User dirs first (so a user task may shadow a bundled one), then the bundled root."""
    env = [p for p in os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep) if p]
    dirs = []
    for d in [*extra, *env]:
        path = Path(d)
        if not path.is_dir():
            raise TaskError(f"tasks dir '{d}' does not exist; pass a folder holding prompts/ and schemas/")
        dirs.append(path)
    return dirs + bundled_dirs()


def _prompt_files(root: Path) -> list[Path]:
    # A tasks dir may hold prompts/ and schemas/, or the YAML and JSON files side by side.
    folder = root / "prompts" if (root / "prompts").is_dir() else root
    return sorted(folder.glob(f"*{PROMPT_SUFFIX}"))


def available(extra_dirs=()) -> dict[str, Path]:
    """Task name -> prompt spec path, first match winning."""
    found: dict[str, Path] = {}
    for root in search_dirs(extra_dirs):
        for path in _prompt_files(root):
            found.setdefault(path.stem, path)
    return found


def load_task(name: str, extra_dirs=()) -> Task:
    tasks = available(extra_dirs)
    if name not in tasks:
        close = difflib.get_close_matches(name, list(tasks), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise TaskError(f"unknown task '{name}'.{hint} Available: {', '.join(sorted(tasks)) or 'none'}"
                        " (add your own with --tasks-dir DIR)")
    return load_task_file(tasks[name])


def load_task_file(path: Path) -> Task:
    spec = _parse_spec(path)
    if spec.name != path.stem:
        raise TaskError(f"{path}: name '{spec.name}' differs from the file name; rename one so both are "
                        f"'{path.stem}'")
    schema_path = _schema_path(path, spec.schema_file)
    schema, registry = load_registry(schema_path, _task_root(path))
    check_scoring_fields(spec.scoring, schema, path, schema_path)
    task = Task(spec=spec, schema=schema, prompt_path=path, schema_path=schema_path, registry=registry)
    _check_templates(task)
    _check_few_shot(task)
    return task


def _parse_spec(path: Path) -> PromptSpec:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TaskError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a mapping of keys (name, version, ...), got {type(data).__name__}")
    if "version" in data and isinstance(data["version"], (int, float)):
        data["version"] = str(data["version"])
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as exc:
        raise TaskError(f"{path}: {_explain(exc.errors()[0])}") from None


def _explain(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = _allowed_keys(err["loc"][:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        fix = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"unknown key '{loc}'; {fix}"
    if err["type"] == "missing":
        return f"missing required key '{loc}'; add it"
    return f"key '{loc}': {err['msg']}"


def _allowed_keys(parent_loc) -> list[str]:
    model = PromptSpec
    nested = {"generation": Generation, "scoring": Scoring, "messages": Message, "few_shot": FewShot}
    for part in parent_loc:
        if isinstance(part, str) and part in nested:
            model = nested[part]
    return [f.alias or name for name, f in model.model_fields.items()]


def _task_root(prompt_path: Path) -> Path:
    """The folder holding prompts/ and schemas/ (or the task files side by side): what a task may read."""
    return prompt_path.parent.parent if prompt_path.parent.name == "prompts" else prompt_path.parent


def _schema_path(prompt_path: Path, schema_file: str) -> Path:
    """Resolve the schema next to the prompt spec; a path that escapes the task root is refused."""
    root = _task_root(prompt_path)
    folder = root / "schemas" if (root / "schemas").is_dir() else root
    candidate = (folder / schema_file).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise TaskError(f"{prompt_path}: key 'schema' points outside the task folder ('{schema_file}'); "
                        "give a file name inside schemas/")
    if not candidate.is_file():
        raise TaskError(f"{prompt_path}: key 'schema' names '{schema_file}', not found in {folder}; "
                        "create it or fix the name")
    return candidate


def _check_templates(task: Task) -> None:
    """Compile the templates now, so a syntax error fails at load; render a placeholder record and the
    few-shot inputs under the render limits, so a template that loops, fails or needs a field the examples
    lack fails at load too."""
    templates = Templates(task.spec.messages, task.prompt_path, task.spec.input_fields)
    templates.render({f: f"<{f}>" for f in task.spec.input_fields}, where=f"{task.prompt_path}: example record")
    for i, shot in enumerate(task.spec.few_shot):
        templates.render(shot.input, where=f"{task.prompt_path}: few_shot.{i}")


def _check_few_shot(task: Task) -> None:
    from extractor.tasks.validation import Validator
    validator = Validator(task.schema, task.registry)
    for i, shot in enumerate(task.spec.few_shot):
        missing = [f for f in task.spec.input_fields if f not in shot.input]
        if missing:
            raise TaskError(f"{task.prompt_path}: few_shot.{i}.input lacks {', '.join(missing)}; "
                            "give a value for every input field")
        error = validator.first_error(shot.output)
        if error is not None:
            raise TaskError(f"{task.prompt_path}: few_shot.{i}.output does not match the schema: {error}")


def check_scoring_fields(scoring, schema, prompt_path: Path, schema_path: Path) -> None:
    """Every field a scoring spec names must be a property of the schema: a misspelt field would score as
    'no fact on either side' on every record, which reads as a perfect score."""
    key, names, declared = scoring_kind(scoring.kind).schema_fields(scoring, schema)
    if not names:
        return
    declared = declared or set()
    for name in names:
        if name not in declared:
            have = ", ".join(sorted(declared)) or "none (declare them under properties)"
            raise TaskError(f"{prompt_path}: scoring.{key} names '{name}', which is not a property of the "
                            f"schema {schema_path.name}; its properties: {have}")
