"""Templates (a task file's messages, a model's chat template) compiled and rendered in a limited sandbox.

Templates run in an immutable Jinja sandbox with no loader: no file access, no attribute access to Python
internals, no calls to unsafe callables; `include`, `import` and `extends` are refused when compiling.
Undefined variables are errors, so a misspelt field fails. A render also runs under limits, since a task
file or a model folder is input like any other:

- time: every loop iteration, call, filter and operator checks the render's deadline (RENDER_SECONDS), so
  `range(10**5)` nested twice, or a macro that calls itself twice per call, ends with an error, not a hang;
- size: no string or list the template builds, and not the output, may exceed the render's size limit
  (MAX_CHARS plus a multiple of the values passed in); an operation whose result would be larger (`'x' *
  10**9`, `center(10**9)`, a `join` or `replace` that multiplies) is refused before it allocates.

Any failure while rendering (a limit, division by zero, a bad filter argument, recursion) is one TaskError
naming the file (the task file, or the model's chat template), never a traceback. Loading a task compiles
and test-renders its templates (`tasks.load_task_file`); prompting compiles them from the Task it is handed.
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from functools import wraps
from pathlib import Path

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from extractor.errors import InputError, TaskError

RENDER_SECONDS = 2.0  # one render (one record's prompt)
MAX_CHARS = 1_000_000  # the largest string or list a render may build, beyond the values passed in
INPUT_FACTOR = 8  # ... plus this many times the size of the values passed in

_limits = threading.local()


class RenderLimit(Exception):
    """A render went past its time or size limit."""


@contextmanager
def render_limits(values_chars: int, seconds: float = RENDER_SECONDS):
    _limits.deadline = time.monotonic() + seconds
    _limits.max_chars = MAX_CHARS + INPUT_FACTOR * values_chars
    try:
        yield
    finally:
        _limits.deadline = None


def _tick() -> None:
    deadline = getattr(_limits, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise RenderLimit(f"took longer than {RENDER_SECONDS:g} s (a loop or recursion too large?)")


def _ticking(iterable):
    for item in iterable:
        _tick()
        yield item


def _cap() -> int:
    return getattr(_limits, "max_chars", MAX_CHARS)


def _check_size(value, what: str = "a value"):
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > _cap():
        raise RenderLimit(f"built {what} of {len(value):,} items, over the limit of {_cap():,}")
    return value


def _check_ints(args) -> None:
    """An integer argument larger than the size limit (a width, a count) would build a huge value."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > _cap():
            shown = f"{arg:,}" if arg.bit_length() < 64 else f"of {arg.bit_length()} bits"
            raise RenderLimit(f"argument {shown} is over the limit of {_cap():,}")


_FORMAT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?|\{[^{}]*:([^{}]*)\}")


def _check_format(fmt) -> None:
    """A width or precision in a format string must stay under the size limit too."""
    if not isinstance(fmt, str):
        return
    for match in _FORMAT_SPEC.finditer(fmt):
        spec = "".join(g or "" for g in match.groups())
        if "*" in spec:
            raise RenderLimit("a '*' width in a format string is not allowed; write the width")
        for digits in re.findall(r"\d+", spec):
            if len(digits) > 12 or int(digits) > _cap():
                raise RenderLimit(f"format width {digits[:20]} is over the limit of {_cap():,}")


def _sized(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 0


def _check_growth(name: str, owner, args) -> None:
    """`join` and `replace` multiply sizes: estimate the result before building it."""
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        seq = args[0]
        size = sum(_sized(x) or 16 for x in seq) + _sized(owner) * max(len(seq) - 1, 0)
    elif name == "replace" and len(args) >= 2 and isinstance(owner, str):
        size = len(owner) + (len(owner) + 1) * _sized(args[1])
    else:
        return
    if size > _cap():
        raise RenderLimit(f"'{name}' would build a string of about {size:,} characters, over the limit of {_cap():,}")


class _LimitedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every for-loop's iterable passed through `environment.ticking` and every
    `~` concatenation through `environment.limited_join` (both check the limits, and templates cannot rebind
    either)."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("ticking"), [node.iter], [], None, None,
                               lineno=node.lineno)
        super().visit_For(node, frame)

    def _no_loader(self, node, tag: str) -> None:
        # There is no loader: say so when compiling rather than at the first render.
        self.fail(f"{{% {tag} %}} is not allowed: templates cannot load other files; put the text in the "
                  "template itself", node.lineno)

    def visit_Include(self, node, frame) -> None:
        self._no_loader(node, "include")

    def visit_Import(self, node, frame) -> None:
        self._no_loader(node, "import")

    def visit_FromImport(self, node, frame) -> None:
        self._no_loader(node, "from ... import")

    def visit_Extends(self, node, frame) -> None:
        self._no_loader(node, "extends")

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.limited_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with deadline and size checks on loops, calls, filters and operators."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%", "/", "//"})

    def __init__(self, **kwargs):
        super().__init__(autoescape=False, **kwargs)
        self.filters = {name: _limited_filter(f, name) for name, f in self.filters.items()}

    def ticking(self, iterable):
        return _ticking(iterable)

    def limited_join(self, parts) -> str:
        parts = [str(p) for p in parts]
        if sum(map(len, parts)) > _cap():
            raise RenderLimit(f"'~' would build a string over the limit of {_cap():,} characters")
        return "".join(parts)

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * max(abs(left), 2).bit_length() > 4096:
                raise RenderLimit(f"{operator} would build a number of more than 4096 bits")
        if operator == "*":
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(count, int) and _sized(seq) * max(count, 0) > _cap():
                raise RenderLimit(f"'*' would build a value of {_sized(seq) * count:,} items, over the limit of "
                                  f"{_cap():,}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
                raise RenderLimit("'*' would build a number of more than 4096 bits")
        if operator == "+" and _sized(left) + _sized(right) > _cap():
            raise RenderLimit(f"'+' would build a value over the limit of {_cap():,} items")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_ints(right if isinstance(right, tuple) else right.values() if isinstance(right, dict) else [right])
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _tick()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, (str, bytes, list, tuple, dict)):
            _check_ints([*args, *kwargs.values()])
            name = getattr(target, "__name__", "")
            if name in ("format", "format_map"):
                _check_format(owner)
            if name == "join" and args and not isinstance(args[0], (list, tuple, str)):
                args = (list(_ticking(args[0])), *args[1:])  # a generator: count what it yields
            _check_growth(name, owner, args)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


def _limited_filter(func, name: str):
    value_at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # after the context it takes

    @wraps(func)
    def limited(*args, **kwargs):
        _tick()
        value, rest = (args[value_at], args[value_at + 1:]) if len(args) > value_at else (None, ())
        _check_ints([*rest, *kwargs.values()])
        if name == "format":
            _check_format(value)
        elif name == "join" and value is not None and not isinstance(value, (str, dict)):
            value = list(_ticking(value))
            args = (*args[:value_at], value, *rest)
            _check_growth("join", rest[0] if rest else kwargs.get("d", ""), [value])
        elif name == "replace":
            _check_growth("replace", value, rest)
        return _check_size(func(*args, **kwargs))
    return limited


_TASK_ENV = LimitedSandbox(undefined=StrictUndefined, keep_trailing_newline=True)


def _describe(exc: BaseException) -> str:
    """One line for a render failure."""
    if isinstance(exc, RenderLimit):
        return f"render limit: {exc}"
    if isinstance(exc, RecursionError):
        return "recursion too deep (a macro calling itself?)"
    if isinstance(exc, MemoryError):
        return "ran out of memory"
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:200] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _values_chars(values) -> int:
    return sum(len(v) for v in values.values() if isinstance(v, str)) if isinstance(values, dict) else 0


class Templates:
    """The compiled templates of a task's messages (each a role and a Jinja content), from the file at `path`."""

    def __init__(self, messages, path: Path, input_fields: list[str]):
        self.roles = [msg.role for msg in messages]
        self.path = path
        self.input_fields = input_fields
        self.compiled = []
        for i, msg in enumerate(messages):
            try:
                self.compiled.append(_TASK_ENV.from_string(msg.content))
            except TemplateSyntaxError as exc:
                raise TaskError(f"{path}: messages.{i}.content line {exc.lineno}: "
                                f"template syntax error ({exc.message})") from None

    def render(self, values: dict, where: str) -> list[dict]:
        """One {role, content} turn per message, rendered with `values`."""
        out = []
        for i, (role, template) in enumerate(zip(self.roles, self.compiled)):
            try:
                with render_limits(_values_chars(values)):
                    content = _render(template, values)
            except UndefinedError as exc:
                raise InputError(f"{where}: template needs a value that is missing ({exc.message}); "
                                 f"check the task's input_fields ({', '.join(self.input_fields)})") from None
            except SecurityError as exc:
                raise TaskError(f"{self.path}: messages.{i}.content: template refused by the sandbox "
                                f"({_describe(exc)})") from None
            except Exception as exc:  # noqa: BLE001 - a template is input: any failure is one line
                raise TaskError(f"{self.path}: messages.{i}.content: template failed to render "
                                f"({_describe(exc)}); fix the template") from None
            out.append({"role": role, "content": content})
        return out


def _render(template, values: dict) -> str:
    """Render chunk by chunk, so the output's size and the deadline are checked as it grows."""
    parts, size = [], 0
    for chunk in template.generate(**values):
        size += len(chunk)
        if size > _cap():
            raise RenderLimit(f"output over the limit of {_cap():,} characters")
        _tick()
        parts.append(chunk)
    return "".join(parts)


# --- chat templates ------------------------------------------------------------------------------------
# A model's chat template is rendered here rather than by transformers' apply_chat_template, in the same
# limited sandbox, with what transformers gives it (its environment's options, filters and globals, the
# special tokens, add_generation_prompt); tests hold the result equal to apply_chat_template's.

class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold underscore-prefixed attributes ({name!r})")


def _chat_env() -> LimitedSandbox:
    # transformers' options: a chat template may test variables that were not passed (plain Undefined).
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _limited_filter(_tojson, "tojson")
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


_CHAT_ENV = _chat_env()


class ChatTemplate:
    """A tokenizer's chat template, compiled once in the limited sandbox; `render` = apply_chat_template's
    text (tokenize=False, add_generation_prompt=True) for plain {role, content} messages."""

    def __init__(self, tokenizer):
        self.where = f"{getattr(tokenizer, 'name_or_path', '') or 'the model'}: chat template"
        source = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template
        self.special = {k: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
                        for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
        try:
            self.template = _CHAT_ENV.from_string(source)
        except TemplateSyntaxError as exc:
            raise TaskError(f"{self.where}: line {exc.lineno}: template syntax error ({exc.message}); "
                            "fix chat_template.jinja or use --prompt-format raw") from None
        except Exception as exc:  # noqa: BLE001 - a model folder is input: any failure is one line
            raise TaskError(f"{self.where}: cannot be compiled ({_describe(exc)})") from None

    def render(self, messages: list[dict]) -> str:
        chars = sum(len(m.get("content", "")) for m in messages)
        try:
            with render_limits(chars):
                return _render(self.template, {**self.special, "messages": messages, "tools": None,
                                               "documents": None, "add_generation_prompt": True})
        except Exception as exc:  # noqa: BLE001 - a model folder is input: any failure is one line
            raise TaskError(f"{self.where}: failed to render ({_describe(exc)}); fix the model's "
                            "chat_template.jinja") from None
