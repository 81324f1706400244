"""Attack suite: hostile task folders (schema refs that escape or reach for the network, schemas that loop or
nest without end, regexes that backtrack, templates that loop, recurse or build huge strings) and hostile
chat templates. Each is run through the real CLI in a subprocess: exit 2, one `error:` line naming the
file (and the JSON pointer for schemas), no traceback, no hang, and no connection to a real local server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parent.parent
BASE_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
               "properties": {"v": {"type": "array", "items": {"type": "string"}}}}
SLOW = "^(a|a)+$"  # backtracks exponentially even in the regex engine
SLOW_TEXT = "a" * 40 + "!"


def write_task(root: Path, schema=None, content: str = "{{ text }}", few_shot=None, files=None) -> Path:
    """A tasks dir holding task 't': prompts/t.yaml and schemas/t.json (+ other files, relative to root)."""
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "schemas").mkdir(exist_ok=True)
    spec = {"name": "t", "version": "1", "description": "attack", "schema": "t.json", "input_fields": ["text"],
            "prompt_format": "auto", "messages": [{"role": "user", "content": content}],
            "few_shot": few_shot or [], "scoring": {"kind": "fields", "fields": ["v"]}}
    (root / "prompts" / "t.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    schema = BASE_SCHEMA if schema is None else schema
    text = schema if isinstance(schema, str) else json.dumps(schema)
    (root / "schemas" / "t.json").write_text(text, encoding="utf-8")
    for name, value in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    return root


def cli(*args, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EXTRACTOR_TASKS_DIR"}
    return subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


def one_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, one `error:` line naming each of `names`, no traceback; the line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return {**BASE_SCHEMA, "properties": {**BASE_SCHEMA["properties"], "deep": schema}}


def chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {**BASE_SCHEMA, "$defs": defs, "properties": {**BASE_SCHEMA["properties"], "c": {"$ref": "#/$defs/d0"}}}


def with_prop(sub: dict, **top) -> dict:
    return {**BASE_SCHEMA, **top, "properties": {**BASE_SCHEMA["properties"], "x": sub}}


# --- schema faults found at load: one line naming the file and the JSON pointer ----------------------------
# id -> (schema, other files, substrings of the error line)
SCHEMA_FAULTS = {
    "schema true": (True, {}, ["t.json", "accepts every output"]),
    "schema false": (False, {}, ["t.json", "rejects every output", "write an object schema"]),
    "not a schema": ([1, 2], {}, ["t.json", "invalid JSON Schema"]),
    "meta-invalid type": (with_prop({"type": "strng"}), {}, ["t.json", "/properties/x/type", "invalid JSON Schema"]),
    "self $ref": ({**BASE_SCHEMA, "$ref": "#"}, {}, ["t.json", "reference cycle"]),
    "$ref cycle a<->b": (with_prop({"$ref": "#/$defs/a"}, **{"$defs": {"a": {"$ref": "#/$defs/b"},
                                                                     "b": {"$ref": "#/$defs/a"}}}),
                         {}, ["t.json", "/$defs/a", "reference cycle"]),
    "allOf cycle": (with_prop({"$ref": "#/$defs/a"}, **{"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}}),
                    {}, ["t.json", "/$defs/a", "reference cycle"]),
    "cycle across files": (with_prop({"$ref": "o.json"}), {"schemas/o.json": {"$ref": "t.json#/properties/x"}},
                           ["reference cycle", "o.json"]),
    "dangling pointer": (with_prop({"$ref": "#/$defs/missing"}), {},
                         ["t.json", "/properties/x/$ref", "points to nothing"]),
    "dangling anchor": (with_prop({"$ref": "#nope"}), {}, ["t.json", "/properties/x/$ref", "points to nothing"]),
    "missing file": (with_prop({"$ref": "nope.json"}), {}, ["t.json", "/properties/x/$ref", "does not exist"]),
    "ref to non-schema": (with_prop({"$ref": "#/required"}, required=["v"]), {},
                          ["t.json", "/properties/x/$ref", "not a schema"]),
    "referenced file invalid": (with_prop({"$ref": "o.json"}), {"schemas/o.json": "{not json"},
                                ["t.json", "/properties/x/$ref", "o.json", "not a readable JSON file"]),
    "referenced file meta-invalid": (with_prop({"$ref": "o.json"}), {"schemas/o.json": {"minLength": -1}},
                                     ["/properties/x/$ref", "o.json", "/minLength"]),
    "nesting 200 deep": (nested(100), {}, ["t.json", "nested deeper than 100 levels"]),
    "nesting 100000 deep": ('{"a":' * 100000 + "1" + "}" * 100000, {}, ["t.json", "nested deeper"]),
    "ref chain 150 long": (chain(150), {}, ["t.json", "deeper than 100 levels"]),
    "bad regex": (with_prop({"type": "string", "pattern": "(unclosed"}), {}, ["t.json", "/properties/x/pattern"]),
    "foreign dialect": ({**BASE_SCHEMA, "$schema": "http://json-schema.org/draft-04/schema#"}, {},
                        ["t.json", "/$schema", "2020-12"]),
    "patternProperties with unevaluatedProperties": (
        {**BASE_SCHEMA, "patternProperties": {"^a": {}}, "unevaluatedProperties": False}, {},
        ["t.json", "unevaluatedProperties"]),
    "few-shot output invalid": (None, {}, ["t.yaml", "few_shot.0.output"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(SCHEMA_FAULTS))
def test_schema_fault_is_one_line_at_load(tmp_path, case):
    schema, files, expected = SCHEMA_FAULTS[case]
    few_shot = [{"input": {"text": "x"}, "output": {"v": [1]}}] if case.startswith("few-shot") else None
    root = write_task(tmp_path / "tasks", schema, files=files, few_shot=few_shot)
    one_error(cli("tasks", "t", "--tasks-dir", root, timeout=30), *expected)


# --- escapes: refs outside the task folder or to the network, refused at load, nothing read or fetched --------
@pytest.fixture
def listener():
    """A real TCP server on loopback; yields (port, connections()) where connections() counts the clients that
    connected so far (they wait in the accept queue)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.setblocking(False)

    def connections() -> int:
        count = 0
        while True:
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1
    with socket.create_connection(server.getsockname(), timeout=5):  # the detector detects
        time.sleep(0.05)
    assert connections() == 1
    yield server.getsockname()[1], connections
    server.close()


def escape_cases(port: int, secret: Path) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {
        "$ref http": (with_prop({"$ref": f"{url}/s.json"}), {}, ["/properties/x/$ref", "leaves the task folder"]),
        "$ref https": (with_prop({"$ref": f"https://127.0.0.1:{port}/s.json"}), {}, ["/properties/x/$ref"]),
        "$ref http pointer": (with_prop({"$ref": f"{url}/s.json#/$defs/a"}), {}, ["/properties/x/$ref"]),
        "$id http then relative $ref": (with_prop({"$id": f"{url}/base/", "$ref": "s.json"}), {},
                                        ["/properties/x/$id", "leaves the task folder"]),
        "root $id http": ({**BASE_SCHEMA, "$id": f"{url}/t.json"}, {}, ["t.json", "/$id"]),
        "$dynamicRef http": (with_prop({"$dynamicRef": f"{url}/s.json#meta"}), {}, ["/properties/x/$dynamicRef"]),
        "$ref file:// outside": (with_prop({"$ref": secret.as_uri()}), {}, ["/properties/x/$ref"]),
        "$ref ../ escape": (with_prop({"$ref": "../../secret.json"}), {}, ["/properties/x/$ref"]),
        "$ref urn": (with_prop({"$ref": "urn:example:secret"}), {}, ["/properties/x/$ref"]),
        "$ref via symlink": (with_prop({"$ref": "link.json"}), {}, ["/properties/x/$ref", "leaves the task folder"]),
        "$ref in referenced file": (with_prop({"$ref": "o.json"}), {"schemas/o.json": {"$ref": f"{url}/s.json"}},
                                    ["o.json", "/$ref"]),
        "$ref hidden in unknown keyword": (with_prop({"$ref": "#/x-hidden"}, **{"x-hidden": {"$ref": f"{url}/s"}}),
                                           {}, ["t.json: /x-hidden/$ref"]),
    }


ESCAPES = list(escape_cases(1, Path("/x")))
RUN_TOO = {"$ref http", "$dynamicRef http", "$ref file:// outside", "$ref in referenced file"}  # via `run` too


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ESCAPES)
def test_escape_refused_at_load_without_a_connection(tmp_path, listener, case):
    port, connections = listener
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"type": "string", "description": "SECRET-CONTENT"}), encoding="utf-8")
    schema, files, expected = escape_cases(port, secret)[case]
    root = write_task(tmp_path / "tasks", schema, files=files)
    if case == "$ref via symlink":
        (root / "schemas" / "link.json").symlink_to(secret)
    line = one_error(cli("tasks", "t", "--tasks-dir", root, timeout=30), *expected)
    assert "SECRET-CONTENT" not in line and connections() == 0
    if case not in RUN_TOO:
        return
    write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": "x"} for i in range(3)])
    write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": {"v": ["a"]}} for i in range(3)])
    run = cli("run", tmp_path / "c.jsonl", "--task", "t", "--tasks-dir", root, "--backend", "echo",
              "--model", tmp_path / "g.jsonl", "--out", tmp_path / "o.jsonl", "--quiet", timeout=30)
    assert "SECRET-CONTENT" not in one_error(run, *expected)
    assert connections() == 0
    assert not (tmp_path / "o.jsonl").exists() or not read_jsonl(tmp_path / "o.jsonl")


def test_listing_tasks_fetches_nothing(tmp_path, listener):
    port, connections = listener
    root = write_task(tmp_path / "tasks", with_prop({"$ref": f"http://127.0.0.1:{port}/s.json"}))
    one_error(cli("tasks", "--tasks-dir", root, timeout=30), "t.json", "/properties/x/$ref")
    assert connections() == 0


# --- refs that stay inside the folder work, at load and at run time (the registry reaches the validator) -----
def test_refs_inside_the_folder_resolve_at_run_time(tmp_path):
    item = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": {"word": {"type": "string",
            "minLength": 2}}, "type": "array", "items": {"$ref": "#/$defs/word"}}
    tree = {"type": "object", "properties": {"name": {"type": "string"}, "kids": {"type": "array",
            "items": {"$ref": "#/$defs/tree"}}}}
    schema = {**BASE_SCHEMA, "$id": "extractor/t/1", "$defs": {"tree": tree},
              "properties": {"v": {"$ref": "items/word_list.json"}, "tree": {"$ref": "#/$defs/tree"}}}
    root = write_task(tmp_path / "tasks", schema, files={"schemas/items/word_list.json": item},
                      few_shot=[{"input": {"text": "x"}, "output": {"v": ["ab"], "tree": {"kids": [{"kids": []}]}}}])
    shown = cli("tasks", "t", "--tasks-dir", root, timeout=30)
    assert shown.returncode == 0, shown.stderr
    write_jsonl(tmp_path / "c.jsonl", [{"id": "ok", "text": "x"}, {"id": "short", "text": "x"},
                                       {"id": "deep", "text": "x"}])
    deep = '{"v": ["ab"], "tree": ' + '{"kids": [' * 300 + "{}" + "]}" * 300 + "}"  # too deep to check
    write_jsonl(tmp_path / "g.jsonl", [{"id": "ok", "gold": {"v": ["ab"]}}, {"id": "short", "gold": {"v": ["a"]}},
                                       {"id": "deep", "raw": deep}])
    run = cli("run", tmp_path / "c.jsonl", "--task", "t", "--tasks-dir", root, "--backend", "echo", "--model",
              tmp_path / "g.jsonl", "--out", tmp_path / "o.jsonl", "--quiet", timeout=60)
    assert "Traceback" not in run.stderr and run.returncode == 0, run.stderr[-2000:]
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "o.jsonl")}
    assert rows["ok"]["status"] == "ok"
    assert rows["short"]["status"] == "schema_violation" and "too short" in rows["short"]["error"]
    assert rows["deep"]["status"] != "ok"  # nested past what can be written or checked: an error of the record


# --- schema regexes meet model output: bounded per record, never a hang, Ctrl-C works --------------------------
PATTERN_CASES = {
    # schema, model output, the error each record gets
    "pattern backtracks": (with_prop({"type": "string", "pattern": SLOW}), {"x": SLOW_TEXT},
                           "pattern check exceeded its time limit"),
    "pattern in items": ({**BASE_SCHEMA, "properties": {"v": {"type": "array", "items": {"pattern": SLOW}}}},
                         {"v": [SLOW_TEXT]}, "pattern check exceeded its time limit"),
    "patternProperties backtracks": ({**BASE_SCHEMA, "patternProperties": {SLOW: {"type": "string"}}},
                                     {SLOW_TEXT: 1}, "pattern check exceeded its time limit"),
    "additionalProperties with patterns": ({**BASE_SCHEMA, "patternProperties": {SLOW: {}},
                                            "additionalProperties": False}, {SLOW_TEXT: 1},
                                           "pattern check exceeded its time limit"),
    "propertyNames pattern": ({**BASE_SCHEMA, "propertyNames": {"pattern": SLOW + "|^v$"}}, {SLOW_TEXT: 1},
                              "pattern check exceeded its time limit"),
    "(a+)+ answered at once": (with_prop({"type": "string", "pattern": "^(a+)+$"}), {"x": "a" * 36 + "!"},
                               "does not match"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_backtracking_pattern_is_a_record_error(tmp_path, case):
    schema, output, error = PATTERN_CASES[case]
    root = write_task(tmp_path / "tasks", schema)
    write_jsonl(tmp_path / "c.jsonl", [{"id": "0", "text": "x"}, {"id": "good", "text": "x"}])
    write_jsonl(tmp_path / "g.jsonl", [{"id": "0", "raw": json.dumps(output)}, {"id": "good", "raw": json.dumps({"v": ["a"]})}])
    start = time.monotonic()
    run = cli("run", tmp_path / "c.jsonl", "--task", "t", "--tasks-dir", root, "--backend", "echo", "--model",
              tmp_path / "g.jsonl", "--out", tmp_path / "o.jsonl", "--quiet", timeout=45)
    assert time.monotonic() - start < 30
    assert "Traceback" not in run.stderr and run.returncode == 0, run.stderr[-2000:]
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "o.jsonl")}
    assert rows["good"]["status"] == "ok"
    assert rows["0"]["status"] == "schema_violation" and error in rows["0"]["error"], rows["0"]


@pytest.mark.timeout(60)
def test_ctrl_c_during_pattern_checks(tmp_path):
    root = write_task(tmp_path / "tasks", with_prop({"type": "string", "pattern": SLOW}))
    write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": "x"} for i in range(40)])
    write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "raw": json.dumps({"x": SLOW_TEXT})} for i in range(40)])
    env = {k: v for k, v in os.environ.items() if k != "EXTRACTOR_TASKS_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "extractor", "run", str(tmp_path / "c.jsonl"), "--task", "t",
                             "--tasks-dir", str(root), "--backend", "echo", "--model", str(tmp_path / "g.jsonl"),
                             "--out", str(tmp_path / "o.jsonl"), "--quiet", "--batch-size", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # 40 records at up to 1 s of pattern checks each: well inside the checks now
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)  # the first stops after the rows in hand (each bounded), the second at once
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=20)
    assert time.monotonic() - sent < 5, "Ctrl-C took too long"
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]


# --- templates: limits on time and size, no loader, every render failure one line ------------------------------
TEMPLATE_CASES = {
    "range 10**10": ("{% for i in range(10**10) %}x{% endfor %}", "Range too big"),
    "nested loops 10**10": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                            "took longer than"),
    "macro recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion too deep"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                          "took longer than"),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recursion too deep"),
    "1 GB by *": ("{{ 'x' * 10**9 }}", "over the limit"),
    "1 GB by center": ("{{ 'x'|center(10**9) }}", "over the limit"),
    "1 GB by ljust": ("{{ text.ljust(10**9) }}", "over the limit"),
    "1 GB by % width": ("{{ '%0999999999d' % 1 }}", "format width"),
    "1 GB by format width": ("{{ '{:>999999999}'.format(1) }}", "format width"),
    "doubling by ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s }}", "over the limit"),
    "replace blow-up": ("{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}", "over the limit"),
    "join blow-up": ("{{ range(100000)|map('string')|join('x' * 500000) }}", "over the limit"),
    "output too large": ("{% for i in range(99999) %}{{ 'y' * 100 }}{% endfor %}", "output over the limit"),
    "huge power": ("{{ 10 ** (10 ** 10) }}", "4096 bits"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "bad filter argument": ("{{ text|round('x') }}", "TypeError"),
    "bad filter argument 2": ("{{ text|truncate('many') }}", "failed to render"),
    "raise in sandbox": ("{{ text.__class__ }}", "template"),
    "include": ("{% include 'x.txt' %}", "include %} is not allowed"),
    "import": ("{% import 'x.txt' as m %}", "import %} is not allowed"),
    "from import": ("{% from 'x.txt' import m %}", "import %} is not allowed"),
    "extends": ("{% extends 'x.txt' %}", "extends %} is not allowed"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_template_fault_is_one_line_at_load(tmp_path, case):
    content, expected = TEMPLATE_CASES[case]
    root = write_task(tmp_path / "tasks", content=content)
    start = time.monotonic()
    one_error(cli("tasks", "t", "--tasks-dir", root, timeout=30), "t.yaml", "messages.0.content", expected)
    assert time.monotonic() - start < 15


@pytest.mark.timeout(60)
def test_template_failing_on_one_record_stops_the_run_with_one_line(tmp_path):
    root = write_task(tmp_path / "tasks", content="{{ 100 // (text|length - 4) }}")  # 'boom' divides by zero
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "fine"[:3]}, {"id": "b", "text": "boom"}])
    write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "gold": {"v": []}}, {"id": "b", "gold": {"v": []}}])
    run = cli("run", tmp_path / "c.jsonl", "--task", "t", "--tasks-dir", root, "--backend", "echo", "--model",
              tmp_path / "g.jsonl", "--out", tmp_path / "o.jsonl", "--quiet", timeout=30)
    one_error(run, "t.yaml", "messages.0.content", "ZeroDivisionError")


@pytest.mark.timeout(60)
def test_template_failing_on_a_few_shot_example_is_one_line(tmp_path):
    root = write_task(tmp_path / "tasks", content="{{ text|int // (text|int - 7) }}",
                      few_shot=[{"input": {"text": "7"}, "output": {"v": []}}])
    one_error(cli("tasks", "t", "--tasks-dir", root, timeout=30), "t.yaml", "ZeroDivisionError")


# --- chat templates: rendered by us under the same limits, equal to transformers' own rendering ----------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small model folder (its tokenizer trained on a few lines) with the tiny models' chat template."""
    from extractor.datasets.tiny_models import build_tiny_model
    texts = ["硕士 计算机 python", '{"v": ["a"]}', "Instruction Input Answer"] * 20
    return build_tiny_model(tmp_path_factory.mktemp("models") / "m", vocab_size=300, hidden=32, layers=1, heads=1,
                            intermediate=32, texts=texts)


CHAT_TEMPLATES = {
    "tiny models'": None,
    "system, namespace, loop controls, tojson": (
        "{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- if m.role == 'system' %}{% continue %}{% endif %}"
        "{%- set ns.n = ns.n + 1 %}{{ '<|im_start|>' + m.role + '\n' + m.content | trim + '<|im_end|>\n' }}"
        "{%- endfor %}{{ ns.n }}{{ {'a': [1, 'é']} | tojson }}{% if tools %}{{ tools }}{% endif %}"
        "{{ eos_token }}{{ bos_token or '' }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "generation tag": ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                       "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"),
}


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_chat_template_rendered_as_transformers_does(small_model, name):
    from transformers import AutoTokenizer

    from extractor.tasks.prompting import PromptBuilder
    from extractor.tasks.task import load_task
    tokenizer = AutoTokenizer.from_pretrained(small_model)
    if CHAT_TEMPLATES[name] is not None:
        tokenizer.chat_template = CHAT_TEMPLATES[name]
    for task_name in ("jd_requirements", "spo"):
        builder = PromptBuilder(load_task(task_name), tokenizer)
        for text in ("本科，java {{ x }} {% raw %}", "", "<|im_end|> \n\t"):
            messages = builder.messages({"text": text})
            assert builder.build({"text": text}) == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)


HOSTILE_CHAT = {
    "loops 10**10": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                     "took longer than"),
    "raise_exception": ("{{ raise_exception('no system role') }}", "no system role"),
    "include": ("{% include 'other.jinja' %}", "include %} is not allowed"),
    "1 GB": ("{{ messages[0].content * 10**9 }}", "over the limit"),
    "syntax": ("{% for m in messages %}", "syntax error"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(HOSTILE_CHAT))
def test_hostile_chat_template_is_one_line(small_model, tmp_path, case):
    from transformers import AutoTokenizer

    from extractor.errors import TaskError
    from extractor.tasks.prompting import PromptBuilder
    from extractor.tasks.task import load_task
    template, expected = HOSTILE_CHAT[case]
    tokenizer = AutoTokenizer.from_pretrained(small_model)
    tokenizer.chat_template = template
    start = time.monotonic()
    with pytest.raises(TaskError) as exc:
        PromptBuilder(load_task("jd_requirements"), tokenizer)
    assert time.monotonic() - start < 10
    assert "chat template" in str(exc.value) and expected in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.timeout(120)
def test_looping_chat_template_jinja_stops_the_run(small_model, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(small_model, model)
    template = model / "chat_template.jinja"
    assert template.is_file()
    template.write_text("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                        encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科"}])
    start = time.monotonic()
    run = cli("run", tmp_path / "c.jsonl", "--task", "jd_requirements", "--model", model, "--out",
              tmp_path / "o.jsonl", "--quiet", "--max-new-tokens", "4", timeout=90)
    one_error(run, "chat template", "took longer than")
    assert time.monotonic() - start < 60
