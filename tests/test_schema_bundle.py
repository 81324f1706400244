"""Constrained decoding compiles one self-contained document: references to other schema files of the task
folder are bundled under $defs, so their constraints are enforced (xgrammar reads an outside reference as
"any value"), and the bundled schema accepts exactly what the original (with its registry) accepts."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractor.tasks.task import load_task_file
from extractor.tasks.validation import Validator
from tests.test_attack_tasks import write_task

COMMON = {"$defs": {"level": {"enum": ["junior", "senior"]},
                    "skill": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                               "level": {"$ref": "#/$defs/level"}},
                              "required": ["name"], "additionalProperties": False}}}
SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
          "properties": {"v": {"type": "array", "items": {"$ref": "common.json#/$defs/skill"}},
                         "lead": {"$ref": "#/$defs/person"},
                         "tree": {"$ref": "tree.json"},
                         "enum": {"$ref": "common.json#/$defs/level"}},  # a property named like a keyword
          "$defs": {"person": {"type": "string"}}, "required": ["v"]}
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "tree.json"}}},
        "additionalProperties": False}  # a reference cycle through another file


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = write_task(tmp_path_factory.mktemp("bundle"), schema=SCHEMA,
                      files={"schemas/common.json": COMMON, "schemas/tree.json": TREE})
    return load_task_file(root / "prompts" / "t.yaml")


def _refs(node):
    if isinstance(node, dict):
        yield from ([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_stays_inside_the_document(task):
    bundled = task.constraint_schema
    assert all(ref.startswith("#") for ref in _refs(bundled)), list(_refs(bundled))
    assert bundled["$defs"]["person"] == {"type": "string"}  # the root's own $defs kept
    assert task.schema["properties"]["v"]["items"] == {"$ref": "common.json#/$defs/skill"}  # the original untouched
    json.dumps(bundled)  # plain JSON: a worker process gets it pickled, xgrammar as text


def test_the_grammar_enforces_the_referenced_file(task):
    xgr = pytest.importorskip("xgrammar")
    grammar = str(xgr.Grammar.from_json_schema(json.dumps(task.constraint_schema), any_whitespace=False))
    assert "junior" in grammar and "senior" in grammar  # the enum of common.json's level, two files away


values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["junior", "senior", "x", "abcdefghij"]),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["v", "lead", "tree", "kids", "name", "level", "enum"]), inner,
                                        max_size=3),
                      max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_bundled_schema_accepts_what_the_original_accepts(task, value):
    original = Validator(task.schema, task.registry).first_error(value) is None
    bundled = Validator(task.constraint_schema).first_error(value) is None
    assert original == bundled, value


@pytest.mark.parametrize("value, ok", [
    ({"v": [{"name": "a", "level": "senior"}], "lead": "x", "tree": {"kids": [{"kids": []}]}}, True),
    ({"v": [{"name": "a", "level": "boss"}]}, False),  # common.json's enum, reached through skill
    ({"v": [{"name": "abcdefghij"}]}, False),  # maxLength in the other file
    ({"v": [], "tree": {"kids": [{"kids": [{"other": 1}]}]}}, False),  # the cycle, two levels down
    ({"v": [], "lead": 3}, False),  # the root's own $defs
    ({"v": [], "enum": "boss"}, False),  # the reference under a property named "enum"
    ({"v": [], "enum": "junior"}, True),
])
def test_known_values(task, value, ok):
    assert (Validator(task.schema, task.registry).first_error(value) is None) == ok
    assert (Validator(task.constraint_schema).first_error(value) is None) == ok


def _level_task(root, level):
    schema = {"type": "object", "properties": {"v": {"$ref": "common.json#/$defs/level"}},
              "required": ["v"], "additionalProperties": False}  # write_task scores field v
    return write_task(root, schema=schema, files={"schemas/common.json": {"$defs": {"level": level}}})


def test_constrained_run_enforces_a_referenced_file(tmp_path, tiny_model, run_cli):
    """A random tiny model under --constrained: every output takes the enum of the other schema file."""
    from conftest import read_jsonl
    tasks = _level_task(tmp_path / "tasks", {"enum": ["junior", "senior"]})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"posting {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "o.jsonl"
    result = run_cli("run", corpus, "--task", "t", "--tasks-dir", tasks, "--model", tiny_model, "--out", out,
                     "--constrained", "--max-new-tokens", "24", "--quiet", "--fast", "on", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["status"] for r in rows] == ["ok"] * 6 and {r["prediction"]["v"] for r in rows} <= {"junior", "senior"}


def test_constrained_refuses_a_keyword_in_a_referenced_file(tmp_path, tiny_model, run_cli):
    tasks = _level_task(tmp_path / "tasks", {"type": "array", "uniqueItems": True})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "1", "text": "x"}) + "\n")
    result = run_cli("run", corpus, "--task", "t", "--tasks-dir", tasks, "--model", tiny_model,
                     "--out", tmp_path / "o.jsonl", "--constrained", "--device", "cpu")
    assert result.exit_code == 2 and "uniqueItems" in result.stderr, result.output
    assert not (tmp_path / "o.jsonl").exists()
