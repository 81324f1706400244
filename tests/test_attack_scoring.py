"""Attacks on scoring: eval, compare and validate as a hostile user or model would drive them.

Each case runs the real CLI (`python -m extractor ...`) in a subprocess and checks the exact outcome: the
exit code, one `error:` line naming the file or field, no traceback, and every input byte-identical. Scores
are checked against an independent typed scorer written here from scratch.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from extractor.scoring.evaluate import evaluate
from extractor.tasks.task import load_task_file
from tests.conftest import write_jsonl
from tests.helpers import HtmlTags

ABSENT = "N/A"


# --- an independent typed scorer ----------------------------------------------------------------------------

def norm_text(s: str, match: str) -> str:
    if match == "exact":
        return s
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def typed_facts(obj, fields: list[str], match: str, absent: str | None) -> set:
    """Facts of one output: strings by normalized text, numbers by exact value (Fraction: 1 == 1.0),
    booleans by value (tagged apart from numbers), lists element by element, objects as field.key."""
    absent_key = norm_text(absent, match) if absent else None
    facts = set()

    def walk(cls, v):
        if v is None:
            return
        if isinstance(v, bool):
            facts.add((cls, ("bool", v)))
        elif isinstance(v, (int, float)):
            facts.add((cls, ("num", Fraction(v))))
        elif isinstance(v, str):
            t = norm_text(v, match)
            if t and t != absent_key:
                facts.add((cls, ("str", t)))
        elif isinstance(v, list):
            for x in v:
                walk(cls, x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{cls}.{k}", x)

    if isinstance(obj, dict):
        for f in fields:
            walk(f, obj.get(f))
    return facts


def typed_count(pairs, facts, shape: type) -> dict:
    """Micro TP/FP/FN/F1 over (pred, gold) pairs; a gold of another shape is left out, a pred of another shape
    is empty (both counted as malformed)."""
    tp = fp = fn = malformed = malformed_gold = 0
    for pred, gold in pairs:
        if not isinstance(gold, shape):
            malformed_gold += 1
            continue
        malformed += not isinstance(pred, shape)
        p, g = facts(pred), facts(gold)
        tp, fp, fn = tp + len(p & g), fp + len(p - g), fn + len(g - p)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1, "malformed": malformed, "malformed_gold": malformed_gold}


def typed_score(pairs, fields, match, absent) -> dict:
    return typed_count(pairs, lambda obj: typed_facts(obj, fields, match, absent), dict)


# --- task folders --------------------------------------------------------------------------------------------

def write_task(root: Path, name: str, properties: dict, fields: list[str], match: str = "normalized",
               absent: str | None = None, kind: str = "fields", schema_type: str = "object") -> Path:
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "schemas").mkdir(exist_ok=True)
    schema = ({"type": "object", "properties": properties} if schema_type == "object"
              else {"type": "array", "items": {"type": "object", "properties": properties}})
    (root / "schemas" / f"{name}.json").write_text(json.dumps(schema), encoding="utf-8")
    scoring = {"kind": kind, "match": match}
    if kind == "fields":
        scoring["fields"] = fields
    else:
        scoring.update(class_field=fields[0], key_fields=fields)
    spec = {"name": name, "version": "1", "description": "test task", "schema": f"{name}.json",
            "input_fields": ["text"], "messages": [{"role": "user", "content": "Extract: {{ text }}"}],
            "scoring": scoring}
    if absent:
        spec["absent_marker"] = absent
    path = root / "prompts" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return path


TYPES = {"integer": {"type": "integer"}, "number": {"type": "number"}, "boolean": {"type": "boolean"},
         "string": {"type": "string"}, "list": {"type": "array"},
         "object": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}}
STRINGS = ["a", "A", " a ", "a  b", "A B", "b", "", ABSENT, "n/a", "ß", "SS", "Ａ"]
SCALARS = {"integer": st.integers(-2, 3), "number": st.sampled_from([0, 0.0, 1, 1.0, 0.5, 2.5, -1, -1.0, 1e300, 3]),
           "boolean": st.booleans(), "string": st.sampled_from(STRINGS)}
ANY_SCALAR = st.one_of(*SCALARS.values())


def value_for(kind: str):
    if kind == "list":
        return st.lists(st.one_of(ANY_SCALAR, st.none()), max_size=4)
    if kind == "object":
        return st.fixed_dictionaries({}, optional={"a": SCALARS["integer"], "b": SCALARS["string"]})
    return st.one_of(SCALARS[kind], st.lists(SCALARS[kind], max_size=3))


@st.composite
def task_and_pairs(draw):
    kinds = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=5))
    fields = [f"f{i}_{k}" for i, k in enumerate(kinds)]

    def obj():
        out = {}
        for f, k in zip(fields, kinds):
            choice = draw(st.sampled_from(["value", "value", "value", "null", "missing"]))
            if choice == "value":
                out[f] = draw(value_for(k))
            elif choice == "null":
                out[f] = None
        return out

    malformed = st.sampled_from([7, "text", [1, 2], None, True])
    pairs = []
    for _ in range(draw(st.integers(1, 6))):
        gold = obj() if draw(st.integers(0, 9)) else draw(malformed)
        pred = obj() if draw(st.integers(0, 7)) else draw(malformed)
        pairs.append((pred, gold))
    return kinds, fields, draw(st.sampled_from(["exact", "normalized"])), draw(st.sampled_from([None, ABSENT])), pairs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(task_and_pairs())
def test_eval_counts_like_an_independent_typed_scorer(tmp_path_factory, case):
    kinds, fields, match, absent, pairs = case
    root = tmp_path_factory.mktemp("task")
    task = load_task_file(write_task(root, "typed", {f: TYPES[k] for f, k in zip(fields, kinds)}, fields,
                                     match, absent))
    write_jsonl(root / "gold.jsonl", [{"id": str(i), "gold": g} for i, (_, g) in enumerate(pairs)])
    write_jsonl(root / "pred.jsonl", [{"id": str(i), "prediction": p, "status": "ok"} for i, (p, _) in enumerate(pairs)])
    got = evaluate(task, root / "pred.jsonl", root / "gold.jsonl").result()
    want = typed_score(pairs, fields, match, absent)
    assert (got["micro"]["tp"], got["micro"]["fp"], got["micro"]["fn"]) == (want["tp"], want["fp"], want["fn"])
    assert got["micro"]["f1"] == pytest.approx(want["f1"], rel=1e-12, abs=1e-15)
    assert got["records"]["malformed"] == want["malformed"]
    assert got["records"]["malformed_gold"] == want["malformed_gold"]


# --- the tuples kind, typed alike ------------------------------------------------------------------------------

def typed_value(v, match: str):
    """One key field's value: a string by normalized text (null and a missing key are empty text), a number by
    exact value, a boolean by value, a list or object by its typed parts (keys as written, in any order)."""
    if v is None:
        return ("str", "")
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", Fraction(v))
    if isinstance(v, str):
        return ("str", norm_text(v, match))
    if isinstance(v, list):
        return ("list", tuple(typed_value(x, match) if x is not None else ("null",) for x in v))
    return ("obj", frozenset((k, typed_value(x, match) if x is not None else ("null",)) for k, x in v.items()))


def typed_tuples(obj, fields: list[str], match: str) -> set:
    """(class, typed key values) for each item of a list whose class (fields[0]) is a string."""
    if not isinstance(obj, list):
        return set()
    return {(item[fields[0]], tuple(typed_value(item.get(f), match) for f in fields))
            for item in obj if isinstance(item, dict) and isinstance(item.get(fields[0]), str)}


def typed_tuple_score(pairs, fields, match) -> dict:
    return typed_count(pairs, lambda obj: typed_tuples(obj, fields, match), list)


SLOT = st.one_of(st.none(), SCALARS["integer"], SCALARS["number"], SCALARS["boolean"], SCALARS["string"],
                 st.lists(st.one_of(st.none(), ANY_SCALAR), max_size=3),
                 st.dictionaries(st.sampled_from(["a", "b"]), st.one_of(st.none(), ANY_SCALAR), max_size=2))


@st.composite
def tuple_task_and_pairs(draw):
    fields = ["p", *[f"k{i}" for i in range(draw(st.integers(1, 3)))]]

    def item():
        out = {"p": draw(st.sampled_from(["born in", "works at", 7]))}  # a class that is no string: no fact
        for f in fields[1:]:
            if draw(st.integers(0, 5)):
                out[f] = draw(SLOT)
        return out

    def obj():  # now and then an item that is no object: no fact
        return [item() if draw(st.integers(0, 9)) else draw(st.sampled_from([3, "x", None]))
                for _ in range(draw(st.integers(0, 4)))]

    malformed = st.sampled_from([7, "text", {"p": "x"}, None, True])
    pairs = [(obj() if draw(st.integers(0, 7)) else draw(malformed),
              obj() if draw(st.integers(0, 9)) else draw(malformed)) for _ in range(draw(st.integers(1, 5)))]
    return fields, draw(st.sampled_from(["exact", "normalized"])), pairs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(tuple_task_and_pairs())
def test_tuples_count_like_an_independent_typed_scorer(tmp_path_factory, case):
    fields, match, pairs = case
    root = tmp_path_factory.mktemp("task")
    props = {"p": {"type": ["string", "integer"]}, **{f: {} for f in fields[1:]}}
    task = load_task_file(write_task(root, "facts", props, fields, match, kind="tuples", schema_type="array"))
    write_jsonl(root / "gold.jsonl", [{"id": str(i), "gold": g} for i, (_, g) in enumerate(pairs)])
    write_jsonl(root / "pred.jsonl", [{"id": str(i), "prediction": p, "status": "ok"}
                                      for i, (p, _) in enumerate(pairs)])
    got = evaluate(task, root / "pred.jsonl", root / "gold.jsonl").result()
    want = typed_tuple_score(pairs, fields, match)
    assert (got["micro"]["tp"], got["micro"]["fp"], got["micro"]["fn"]) == (want["tp"], want["fp"], want["fn"])
    assert got["records"]["malformed"] == want["malformed"]
    assert got["records"]["malformed_gold"] == want["malformed_gold"]


def test_typed_tuples_through_the_cli(tmp_path):
    """`extractor eval --report` on a tuples task with integer, number and boolean key fields: 1 == 1.0, true is
    not 1, "5" is not 5; the report shows the typed values."""
    from click.testing import CliRunner
    from extractor.cli.main import cli as main
    props = {"p": {"type": "string"}, "s": {"type": "string"}, "n": {"type": "number"}, "b": {"type": "boolean"}}
    write_task(tmp_path / "tasks", "facts", props, ["p", "s", "n", "b"], kind="tuples", schema_type="array")
    gold = [[{"p": "age", "s": "Ann", "n": 30, "b": True}, {"p": "age", "s": "Bo", "n": 2.5, "b": False}],
            [{"p": "size", "s": "x", "n": 5, "b": True}]]
    pred = [[{"p": "age", "s": "ann ", "n": 30.0, "b": True}, {"p": "age", "s": "Bo", "n": 2.5, "b": 0}],
            [{"p": "size", "s": "x", "n": "5", "b": True}]]
    write_jsonl(tmp_path / "gold.jsonl", [{"id": f"r{i}", "gold": g} for i, g in enumerate(gold)])
    write_jsonl(tmp_path / "pred.jsonl", [{"id": f"r{i}", "prediction": p, "status": "ok"} for i, p in enumerate(pred)])
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "pred.jsonl"), "--gold", str(tmp_path / "gold.jsonl"),
                                       "--task", "facts", "--tasks-dir", str(tmp_path / "tasks"), "--report",
                                       str(tmp_path / "rep"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    want = typed_tuple_score(list(zip(pred, gold)), ["p", "s", "n", "b"], "normalized")
    micro = doc["micro"]
    assert (micro["tp"], micro["fp"], micro["fn"]) == (want["tp"], want["fp"], want["fn"]) == (1, 2, 2)
    assert "age | bo | 2.5 | false" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    from extractor.scoring.facts import FactExtractor, key_text
    facts = FactExtractor(load_task_file(tmp_path / "tasks" / "prompts" / "facts.yaml"))
    hits = [{key_text(k) for _, k in facts(p) & facts(g)} for p, g in zip(pred, gold)]
    assert hits == [{"age | ann | 30 | true"}, set()]  # 30.0 is 30; the text "5" is not the number 5


# --- the real CLI ---------------------------------------------------------------------------------------------

def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


SALARY_PROPS = {"salary": {"type": "integer"}, "rating": {"type": "number"}, "remote": {"type": "boolean"},
                "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}
SALARY_FIELDS = list(SALARY_PROPS)


def test_typed_task_through_the_cli(tmp_path):
    """Integer, number and boolean fields scored by `extractor eval` exactly as the independent scorer."""
    write_task(tmp_path / "tasks", "jobs", SALARY_PROPS, SALARY_FIELDS)
    gold = [{"salary": 50000, "rating": 4.5, "remote": True, "title": "Engineer", "tags": ["python", "sql"]},
            {"salary": 60000, "rating": 3, "remote": False, "title": "Analyst", "tags": []},
            {"salary": 70000, "rating": 1.0, "remote": True, "title": None, "tags": ["go"]}]
    pred = [{"salary": 51000, "rating": 4.5, "remote": 1, "title": "engineer ", "tags": ["Python", "sql", "r"]},
            {"salary": 60000.0, "rating": 3.0, "remote": False, "title": "Analyst"},  # 60000 == 60000.0
            {"salary": "70000", "rating": 1, "remote": True, "title": "x", "tags": ["go", "go"]}]
    write_jsonl(tmp_path / "gold.jsonl", [{"id": f"r{i}", "gold": g} for i, g in enumerate(gold)])
    write_jsonl(tmp_path / "pred.jsonl", [{"id": f"r{i}", "prediction": p, "status": "ok"} for i, p in enumerate(pred)])
    result = cli("eval", tmp_path / "pred.jsonl", "--gold", tmp_path / "gold.jsonl", "--task", "jobs",
                 "--tasks-dir", tmp_path / "tasks", "--metrics", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    want = typed_score(list(zip(pred, gold)), SALARY_FIELDS, "normalized", None)
    assert (doc["micro"]["tp"], doc["micro"]["fp"], doc["micro"]["fn"]) == (want["tp"], want["fp"], want["fn"])
    assert doc["micro"]["f1"] == pytest.approx(want["f1"])
    c = doc["classes"]
    # salary: r0 wrong (51000), r1 right as a float, r2 a string "70000" is not the number 70000
    assert (c["salary"]["tp"], c["salary"]["fp"], c["salary"]["fn"]) == (1, 2, 2)
    assert (c["remote"]["tp"], c["remote"]["fp"], c["remote"]["fn"]) == (2, 1, 1)  # 1 is not true
    assert (c["rating"]["tp"], c["rating"]["fp"], c["rating"]["fn"]) == (3, 0, 0)  # 3 == 3.0, 1 == 1.0
    assert doc["micro"]["f1"] < 0.8


def test_every_salary_wrong_is_not_a_perfect_score(tmp_path):
    """The issue's case: integer salaries all wrong once scored micro F1 1.0."""
    write_task(tmp_path / "tasks", "pay", {"salary": {"type": "integer"}}, ["salary"])
    write_jsonl(tmp_path / "gold.jsonl", [{"id": str(i), "gold": {"salary": 1000 * i}} for i in range(1, 6)])
    write_jsonl(tmp_path / "pred.jsonl", [{"id": str(i), "prediction": {"salary": 1000 * i + 1}, "status": "ok"}
                                          for i in range(1, 6)])
    result = cli("eval", tmp_path / "pred.jsonl", "--gold", tmp_path / "gold.jsonl", "--task", "pay",
                 "--tasks-dir", tmp_path / "tasks", "--metrics", tmp_path / "m.json", "--quiet")
    assert result.returncode == 0 and "micro F1 0.0000" in result.stdout
    micro = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["micro"]
    assert (micro["tp"], micro["fp"], micro["fn"]) == (0, 5, 5)


# --- the attack table -----------------------------------------------------------------------------------------

JD_FIELDS = ["学历要求", "专业要求", "工作年限要求", "编程语言", "加分项"]


def jd_gold(i: int) -> dict:
    return {f: [f"v{i % 4}"] for f in JD_FIELDS}


def make_world(d: Path) -> None:
    """Gold for 100 ids, a full run, and the hostile variants the cases point at."""
    golds = [{"id": f"g{i}", "gold": jd_gold(i)} for i in range(100)]
    write_jsonl(d / "gold.jsonl", golds)
    write_jsonl(d / "run.jsonl", [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds])
    (d / "empty.jsonl").write_text("", encoding="utf-8")
    write_jsonl(d / "half.jsonl", [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds[:50]])
    write_jsonl(d / "most.jsonl", [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds[:95]])
    write_jsonl(d / "other.jsonl", [{"id": f"x{i}", "prediction": jd_gold(i), "status": "ok"} for i in range(100)])
    write_jsonl(d / "superset.jsonl", [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds]
                + [{"id": f"x{i}", "prediction": jd_gold(i), "status": "ok"} for i in range(100)])
    write_jsonl(d / "malformed.jsonl", [{"id": "g0", "prediction": 7, "status": "ok"},
                                        {"id": "g1", "prediction": "text", "status": "ok"},
                                        {"id": "g2", "prediction": [1, 2], "status": "ok"},
                                        {"id": "g3", "prediction": None, "status": "ok"},
                                        {"id": "g4", "prediction": None, "status": "invalid_json"}]
                + [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds[5:]])
    write_jsonl(d / "badgold.jsonl", [{"id": "g0", "gold": ["not", "an", "object"]}, {"id": "g1", "gold": 3}]
                + golds[2:])
    labels = ["[/x]", "[bold red]hi", "$x^$", "a`<b>`|c"]
    write_jsonl(d / "labels_gold.jsonl", [{"id": str(i), "gold": ["水果"]} for i in range(4)])
    write_jsonl(d / "labels_run.jsonl", [{"id": str(i), "prediction": ["水果", lab], "status": "ok"}
                                         for i, lab in enumerate(labels)])
    write_jsonl(d / "markup.jsonl", [{"id": "a", "prediction": ["[/x]"]}])
    (d / "sub").mkdir()
    os.symlink(d / "gold.jsonl", d / "gold_link.jsonl")
    os.link(d / "run.jsonl", d / "run_hardlink.jsonl")
    (d / "rep").mkdir()
    write_jsonl(d / "m2.json.tmp", golds)  # a gold file named as --metrics m2.json's temporary file
    write_jsonl(d / "rep" / "summary.md", golds)  # a gold file where --report rep would write its summary
    write_jsonl(d / "rep" / "metrics.json", [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for g in golds])
    root = d / "tasks"
    write_task(root, "typo", {"salary": {"type": "integer"}}, ["salray"])
    write_task(root, "noprops", {}, ["salary"])
    write_task(root, "tuple_typo", {"s": {"type": "string"}, "p": {"type": "string"}}, ["p", "o"],
               kind="tuples", schema_type="array")


JD = ["--task", "jd_requirements"]
GATE = ["--task", "jd_requirements", "--fail-if-drop", "0.01"]

# (case id, kind, argv, exit code, text the one error line must hold, or None when the command succeeds)
CASES = [
    ("eval-metrics-is-predictions", "data loss", ["eval", "run.jsonl", "--gold", "gold.jsonl", *JD, "--metrics", "run.jsonl"], 2, "--metrics run.jsonl: is the predictions file"),
    ("eval-metrics-is-gold", "data loss", ["eval", "run.jsonl", "--gold", "gold.jsonl", *JD, "--metrics", "gold.jsonl"], 2, "is the gold file"),
    ("eval-metrics-is-gold-dotdot", "data loss", ["eval", "run.jsonl", "--gold", "gold.jsonl", *JD, "--metrics", "sub/../gold.jsonl"], 2, "is the gold file"),
    ("eval-metrics-is-gold-symlink", "data loss", ["eval", "run.jsonl", "--gold", "gold_link.jsonl", *JD, "--metrics", "gold.jsonl"], 2, "is the gold file"),
    ("eval-metrics-is-predictions-hardlink", "data loss", ["eval", "run.jsonl", "--gold", "gold.jsonl", *JD, "--metrics", "run_hardlink.jsonl"], 2, "is the predictions file"),
    ("eval-report-summary-is-gold", "data loss", ["eval", "run.jsonl", "--gold", "rep/summary.md", *JD, "--report", "rep", "--metrics", "m.json"], 2, "--report (summary.md) rep/summary.md: is the gold file"),
    ("eval-report-metrics-is-predictions", "data loss", ["eval", "rep/metrics.json", "--gold", "gold.jsonl", *JD, "--report", "rep"], 2, "--metrics rep/metrics.json: is the predictions file"),
    ("eval-metrics-temp-file-is-gold", "data loss", ["eval", "run.jsonl", "--gold", "m2.json.tmp", *JD, "--metrics", "m2.json"], 2, "--metrics (its temporary file) m2.json.tmp: is the gold file"),
    ("compare-json-temp-file-is-gold", "data loss", ["compare", "run.jsonl", "run.jsonl", "--gold", "m2.json.tmp", *JD, "--json", "m2.json"], 2, "--json (its temporary file) m2.json.tmp: is the gold file"),
    ("eval-empty-gold", "silently wrong", ["eval", "run.jsonl", "--gold", "empty.jsonl", *JD, "--metrics", "m.json"], 2, "empty.jsonl: the gold file holds no records"),
    ("eval-scoring-field-not-in-schema", "silently wrong", ["eval", "run.jsonl", "--gold", "gold.jsonl", "--task", "typo", "--tasks-dir", "tasks", "--metrics", "m.json"], 2, "scoring.fields names 'salray', which is not a property of the schema typo.json; its properties: salary"),
    ("eval-scoring-schema-without-properties", "silently wrong", ["eval", "run.jsonl", "--gold", "gold.jsonl", "--task", "noprops", "--tasks-dir", "tasks"], 2, "names 'salary', which is not a property"),
    ("eval-tuple-key-not-in-schema", "silently wrong", ["eval", "run.jsonl", "--gold", "gold.jsonl", "--task", "tuple_typo", "--tasks-dir", "tasks"], 2, "scoring.class_field/key_fields names 'o'"),
    ("validate-scoring-field-not-in-schema", "silently wrong", ["validate", "run.jsonl", "--task", "typo", "--tasks-dir", "tasks"], 2, "names 'salray'"),
    ("validate-empty", "silently wrong", ["validate", "empty.jsonl", "--task", "review_topic"], 2, "empty.jsonl: holds no records"),
    ("validate-markup-in-model-output", "traceback", ["validate", "markup.jsonl", "--task", "review_topic"], 1, None),
    ("eval-markup-and-mathtext-labels", "traceback", ["eval", "labels_run.jsonl", "--gold", "labels_gold.jsonl", "--task", "review_topic", "--report", "out"], 0, None),
    ("compare-markup-labels", "traceback", ["compare", "labels_gold.jsonl", "labels_run.jsonl", "--gold", "labels_gold.jsonl", "--task", "review_topic"], 0, None),
    ("compare-empty-gold", "traceback", ["compare", "run.jsonl", "run.jsonl", "--gold", "empty.jsonl", *JD], 2, "the gold holds no record to score"),
    ("compare-empty-baseline", "silently wrong", ["compare", "empty.jsonl", "run.jsonl", "--gold", "gold.jsonl", *JD], 2, "empty.jsonl: holds no predictions"),
    ("gate-empty-later-run", "silently wrong", ["compare", "run.jsonl", "empty.jsonl", "--gold", "gold.jsonl", *GATE], 2, "empty.jsonl: holds no predictions"),
    ("gate-partial-run", "silently wrong", ["compare", "run.jsonl", "half.jsonl", "--gold", "gold.jsonl", *GATE], 2, "half.jsonl: covers 50 of 100 gold ids (50.0%), below --min-coverage 0.99"),
    ("gate-partial-run-within-tolerance", "silently wrong", ["compare", "run.jsonl", "most.jsonl", "--gold", "gold.jsonl", *GATE, "--min-coverage", "0.9"], 1, None),  # accepted: its 5 missing records are misses, a real drop
    ("gate-partial-run-beyond-tolerance", "silently wrong", ["compare", "run.jsonl", "most.jsonl", "--gold", "gold.jsonl", *GATE], 2, "most.jsonl: covers 95 of 100"),
    ("gate-another-corpus", "silently wrong", ["compare", "run.jsonl", "other.jsonl", "--gold", "gold.jsonl", *GATE], 2, "other.jsonl: none of its 100 ids is in the gold"),
    ("gate-superset-corpus", "silently wrong", ["compare", "run.jsonl", "superset.jsonl", "--gold", "gold.jsonl", *GATE], 2, "superset.jsonl: 100 of its 200 ids are not in the gold"),
    ("compare-json-is-a-run", "data loss", ["compare", "run.jsonl", "most.jsonl", "--gold", "gold.jsonl", *JD, "--json", "most.jsonl"], 2, "--json most.jsonl: is the run 2 file"),
    ("compare-json-is-gold", "data loss", ["compare", "run.jsonl", "run.jsonl", "--gold", "gold.jsonl", *JD, "--json", "sub/../gold.jsonl"], 2, "is the gold file"),
    ("gate-identical-runs-pass", "silently wrong", ["compare", "run.jsonl", "run_hardlink.jsonl", "--gold", "gold.jsonl", *GATE], 0, None),
]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    make_world(d)
    return d


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, kind, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_attack(world, tmp_path, case, kind, argv, code, message):
    before = snapshot(world)
    try:
        result = cli(*argv, cwd=world)
        after = snapshot(world)
    finally:  # outputs of the accepted cases are one-off: remove them, so every case sees the same world
        for name in set(snapshot(world)) - set(before):
            (world / name).unlink()
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr)
    assert {k: v for k, v in after.items() if k in before} == before  # every input byte-identical
    if message is not None:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert set(after) == set(before)  # a refused command writes nothing


def test_malformed_predictions_and_gold_are_counted_and_named(world):
    result = cli("eval", "malformed.jsonl", "--gold", "badgold.jsonl", *JD, "--metrics", "mal.json", cwd=world)
    try:
        assert result.returncode == 0 and "Traceback" not in result.stderr
        doc = json.loads((world / "mal.json").read_text(encoding="utf-8"))
    finally:
        (world / "mal.json").unlink(missing_ok=True)
    # g0, g1: gold not an object -> malformed_gold, not scored; g2, g3: a list and null with status ok -> malformed
    assert doc["status_counts"] == {"invalid_json": 1, "malformed": 2, "malformed_gold": 2, "ok": 95}
    assert doc["records"] == {"gold": 100, "scored": 98, "missing": 0, "extra_predictions": 0, "malformed": 2,
                              "malformed_gold": 2}
    assert doc["malformed_ids"] == ["g2", "g3"] and doc["malformed_gold_ids"] == ["g0", "g1"]
    assert doc["micro"]["fn"] == 3 * 5 and doc["micro"]["fp"] == 0  # g2..g4 lose their gold facts
    assert "malformed predictions (scored as empty): g2, g3" in result.stdout
    assert "malformed gold (not scored): g0, g1" in result.stdout
    assert "malformed" in result.stdout.split("status")[1]  # in the printed status table


def test_malformed_with_each_top_level_shape(tmp_path):
    """A number, a string, a list and null with status ok, each against a fields task: all malformed."""
    write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": jd_gold(i)} for i in range(4)])
    write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prediction": v, "status": "ok"}
                                       for i, v in enumerate([42, "本科", ["本科"], None])])
    result = cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", *JD, "--metrics", tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert result.returncode == 0 and doc["status_counts"] == {"malformed": 4}
    assert doc["malformed_ids"] == ["0", "1", "2", "3"] and doc["micro"]["fn"] == 20


# --- escapes: every report format -----------------------------------------------------------------------------

HOSTILE = ["<script>alert(1)</script>", "`</code><img src=x onerror=alert(1)>`", "a|b|c", "line1\nline2\r\n<b>x</b>",
           "[link](javascript:alert(1))", "![i](http://evil.example/x.png)", "&lt;script&gt;", "*em* _u_ ~~s~~",
           "<!-- c -->", "\\`x\\`", "$x^$"]


def parse_html(text: str) -> HtmlTags:
    return HtmlTags(text)


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("escape")
    name = "evil`<b>`|x.jsonl"
    write_jsonl(d / "gold.jsonl", [{"id": f"id<{i}>|`", "gold": ["水果"], "text": h} for i, h in enumerate(HOSTILE)])
    write_jsonl(d / name, [{"id": f"id<{i}>|`", "prediction": [h], "status": "ok"} for i, h in enumerate(HOSTILE)])
    result = cli("eval", name, "--gold", "gold.jsonl", "--task", "review_topic", "--report", "rep", cwd=d)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return d / "rep"


def test_markdown_summary_renders_inert(hostile_report):
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a rich dependency) renders the test")
    md = (hostile_report / "summary.md").read_text(encoding="utf-8")
    # The most permissive common setting: raw HTML allowed, GFM tables and strikethrough on.
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(md)
    page = parse_html(rendered)
    assert set(page.tags) <= {"h1", "p", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "img"}, page.tags
    assert set(v for k, v in page.attrs if k == "src") <= {"f1_per_class.png", "confusion.png"}
    assert not any(k.startswith("on") or k == "href" for k, _ in page.attrs)
    text = "".join(page.text)
    for h in HOSTILE:
        assert " ".join(h.replace("\r\n", "\n").split("\n")) in text  # shown as written, on one line
    assert "evil`<b>`|x.jsonl" in text  # the file name in the title too
    classes = len(json.loads((hostile_report / "metrics.json").read_text(encoding="utf-8"))["classes"])
    first_table = rendered.split("</table>")[0]
    assert first_table.count("<tr>") == 1 + classes + 3  # no row broken by a pipe or a newline
    assert all(row.count("<td>") == 5 for row in first_table.split("<tr>")[2:])


def test_html_report_escapes_every_value(hostile_report):
    html_text = (hostile_report / "report.html").read_text(encoding="utf-8")
    page = parse_html(html_text)
    from extractor.scoring.report.filters import FILTER_JS
    # the one script is the report's own filter, and the page's CSP allows no other
    assert page.tags.count("script") == 1 and html_text.count(f"<script>{FILTER_JS}</script>") == 1
    assert "script-src 'sha256-" in html_text and "img" not in page.tags
    assert not any(k.startswith("on") for k, _ in page.attrs)
    assert not any("javascript:" in (v or "") for _, v in page.attrs)
    text = "".join(page.text)
    for h in HOSTILE:
        assert h.replace("\r\n", "\n").split("\n")[0] in text


def test_metrics_json_is_json(hostile_report):
    doc = json.loads((hostile_report / "metrics.json").read_text(encoding="utf-8"))
    assert set(HOSTILE) <= set(doc["classes"])  # labels round-trip exactly
