"""Parquet outputs: `prediction` a typed column built from the task's JSON Schema (struct, lists, int64,
float64, bool), `prediction_json` the exact value; a value that does not fit exactly is null in the typed
view (never cut: 1.5 is no int64), and everything reads back as written."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_jsonl, synth_corpus, write_jsonl
from extractor.store.arrow_types import arrow_type, compile_type, conforms
from extractor.tasks.task import load_task
from extractor.store.writers import iter_rows, write_parquet

SCHEMA = {"$defs": {"money": {"type": "integer"}},
          "type": "object", "additionalProperties": False,
          "properties": {"company": {"type": ["string", "null"]},
                         "salary": {"type": "object", "properties": {"min": {"$ref": "#/$defs/money"},
                                                                     "max": {"$ref": "#/$defs/money"}}},
                         "remote": {"enum": ["yes", "no", "unknown"]},
                         "equity": {"type": "boolean"}, "score": {"type": "number"},
                         "skills": {"type": "array", "items": {"type": "string"}}}}


def test_schema_to_arrow_type():
    node, why = compile_type(SCHEMA)
    assert why is None
    assert arrow_type(node) == pa.struct([
        ("company", pa.string()), ("salary", pa.struct([("min", pa.int64()), ("max", pa.int64())])),
        ("remote", pa.string()), ("equity", pa.bool_()), ("score", pa.float64()), ("skills", pa.list_(pa.string()))])
    jd = compile_type(load_task("jd_requirements").schema)[0]
    assert jd[0] == "struct" and all(child == ("list", ("string",)) for _, child in jd[1])
    for schema, reason in (({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "several types"),
                           ({"type": "object"}, "without properties"),
                           ({"$ref": "other.json#/x"}, "outside the schema's own file")):
        assert compile_type(schema)[0] is None and reason in compile_type(schema)[1]


def test_conforms_refuses_what_arrow_would_cut():
    node = compile_type(SCHEMA)[0]
    assert conforms({"salary": {"min": 1, "max": 2}, "score": 3, "skills": ["a"]}, node)
    assert not conforms({"salary": {"min": 1.5}}, node)  # pyarrow would write 1
    assert not conforms({"equity": 1}, node) and not conforms({"salary": {"min": True}}, node)
    assert not conforms({"unknown_key": 1}, node)  # pyarrow would drop it
    assert not conforms({"salary": {"min": 2 ** 63}}, node)


def test_typed_column_round_trip(tmp_path):
    values = [{"company": "Acme", "salary": {"min": 50000, "max": 70000}, "remote": "yes", "equity": False,
               "score": 0.5, "skills": ["go", "sql"]},
              {"company": None, "salary": {"min": 1.5}, "skills": []},  # does not fit: null in the view
              None]
    rows = [{"id": str(i), "status": "ok", "prediction": v, "raw": json.dumps(v)} for i, v in enumerate(values)]
    out = tmp_path / "p.parquet"
    write_parquet(rows, out, prediction_schema=SCHEMA)
    table = pq.read_table(out)
    assert table.schema.field("prediction").type == arrow_type(compile_type(SCHEMA)[0])
    typed = table.column("prediction").to_pylist()
    assert typed[0]["salary"] == {"min": 50000, "max": 70000} and typed[0]["equity"] is False
    assert typed[1] is None and typed[2] is None
    assert [row for _, row in iter_rows(out)] == rows  # read back exactly as written
    assert pq.read_table(out, columns=["prediction"]).column(0).combine_chunks().field("salary").field(
        "max").to_pylist() == [70000, None, None]


@pytest.mark.parametrize("suffix", [".parquet"])
def test_run_writes_a_typed_prediction_column_that_eval_reads(tmp_path, run_cli, suffix):
    corpus, gold = synth_corpus(tmp_path, n=12)
    out = tmp_path / f"preds{suffix}"
    result = run_cli("run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold,
                     "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert pa.types.is_struct(table.schema.field("prediction").type)
    first = table.column("prediction").to_pylist()[0]
    gold_rows = read_jsonl(gold)
    assert first == {k: gold_rows[0]["gold"].get(k) for k in first}
    jsonl = tmp_path / "preds.jsonl"
    write_jsonl(jsonl, [row for _, row in iter_rows(out)])
    scored = [run_cli("eval", p, "--gold", gold, "--task", "jd_requirements", "--json", "--quiet") for p in (out, jsonl)]
    assert all(r.exit_code == 0 for r in scored)
    micro = [json.loads(r.stdout)["micro"] for r in scored]
    assert micro[0] == micro[1] and micro[0]["f1"] == 1.0
