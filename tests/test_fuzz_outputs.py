"""Property-based fuzzing of model outputs through parse -> validate -> write -> eval: any text a model can
emit (huge integers, unpaired surrogates, deep nesting, NaN/Infinity, control characters, long strings,
fences) ends as a row with a documented status and its raw text, written to JSONL and Parquet, read back,
judged again the same way, and counted by eval."""
import json
from collections import Counter

from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings, strategies as st

from extractor.backends.base import Generation
from extractor.cli.main import cli
from extractor.results.judge import SCORED_STATUSES, STATUSES, Validator, judge, writable_text
from extractor.results.rows import prediction_row
from extractor.scoring.evaluate import evaluate
from extractor.tasks.task import load_task
from extractor.store.writers import JsonlAppender, iter_rows, write_parquet
from tests.conftest import write_jsonl

TASK = load_task("jd_requirements")
V = Validator(TASK.schema)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
BIG = "123456789012345678901234567890"
GOOD = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"], "编程语言": ["java"], "加分项": ["该JD未要求"]}
GOOD_TEXT = json.dumps(GOOD, ensure_ascii=False)
FRAGMENTS = ["{", "}", "[", "]", '"', "'", ",", ":", " ", "\n", "```json\n", "```", "NaN", "Infinity", "-Infinity",
             "1e400", BIG, "-" + BIG, "18446744073709551615", "-9223372036854775809", "9" * 5000, '"\\ud800"',
             '"\\udc00"', '"\\ud83d\\ude00"', "\\", "\x00", "\x01", "\x1f", "\u2028", "\ud800", "\udfff", '"学历要求"',
             '"加分项"', '"本科"', "true", "false", "null", "0", "-1.5e-7", "该JD未要求"]

any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=200)  # surrogates included
fragments = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=40).map("".join)
deep = st.builds(lambda n, closed, opener: opener * n + ("]" * n if closed and opener == "[" else ""),
                 st.integers(1, 100_000), st.booleans(), st.sampled_from(["[", "{", '{"a":', "[{"]))
leaf = (st.none() | st.booleans() | st.integers(-(1 << 80), 1 << 80) | st.floats() | st.text(max_size=12)
        | st.sampled_from(["\ud800", "\x00", "本科"]))
values = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                      max_leaves=20)
as_json = st.builds(lambda v: _dump(v), values)
long_string = st.integers(0, 300_000).map(lambda n: GOOD_TEXT.replace("本科", "长" * n))
hostile = st.builds(lambda token, where: GOOD_TEXT.replace(where, token, 1),
                    st.sampled_from(FRAGMENTS[11:33]), st.sampled_from(['"本科"', '"计算机"', "[", "]", ",", ":"]))
outputs = st.one_of(any_text, fragments, deep, as_json, long_string, hostile)
finishes = st.sampled_from(["stop", "length"])


def _dump(value) -> str:
    return json.dumps({**GOOD, "学历要求": [value]}, ensure_ascii=False, allow_nan=True)


def _kind(error: str | None) -> str:
    """The hostile cases the fuzzer reaches (hypothesis statistics: --hypothesis-show-statistics)."""
    kinds = ("64 bits", "surrogate", "NaN", "nested", "no JSON", "max-new-tokens", "required", "not of type")
    return next((k for k in kinds if k in (error or "")), "")


def _rows(texts, finishes_):
    rows = []
    for i, (text, finish) in enumerate(zip(texts, finishes_)):
        parsed = judge(text, finish, V)
        assert parsed.status in STATUSES
        event(f"{parsed.status} {_kind(parsed.error)}")
        rows.append(prediction_row(str(i), TASK.name, Generation(text, 1, len(text), finish), parsed, None))
    return rows


@FUZZ
@given(st.lists(st.tuples(outputs, finishes), min_size=1, max_size=4))
def test_any_output_is_written_read_back_and_counted(tmp_path, cases):
    texts, fins = [t for t, _ in cases], [f for _, f in cases]
    rows = _rows(texts, fins)
    out = tmp_path / "p.jsonl"
    out.unlink(missing_ok=True)
    with JsonlAppender(out, fsync=False) as writer:
        writer.write_batch(rows)  # an unwritable row would raise here
    back = [row for _, row in iter_rows(out)]
    assert len(back) == len(texts)
    for row, text, fin in zip(back, texts, fins):
        assert row["raw"] == writable_text(text)  # kept; only an unpaired surrogate is escaped
        again = judge(row["raw"], fin, V)  # eval --reparse sees what the run saw
        assert (again.status, again.prediction) == (row["status"], row["prediction"])
        if row["status"] not in SCORED_STATUSES and row["prediction"] is None:
            assert row["error"]
    parquet = tmp_path / "p.parquet"
    write_parquet(back, parquet)
    assert [row for _, row in iter_rows(parquet)] == back
    gold = write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": {"学历要求": ["本科"]}} for i in range(len(texts))])
    statuses = Counter(row["status"] for row in back)
    for reparse in (False, True):
        counts = evaluate(TASK, out, gold, reparse=reparse).result()["status_counts"]
        assert sum(counts.values()) == len(texts)
        assert {s: n for s, n in counts.items() if n and s not in SCORED_STATUSES} == \
            {s: n for s, n in statuses.items() if s not in SCORED_STATUSES}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(st.tuples(outputs, finishes), min_size=1, max_size=5))
def test_any_output_through_extractor_run_and_eval(tmp_path, cases):
    """The same through the CLI: `extractor run --backend echo` writes a row per record with its raw text,
    `extractor eval` counts them. (The echo file is JSON, so it carries surrogates escaped.)"""
    texts = [writable_text(t) for t, _ in cases]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"JD {i}"} for i in range(len(texts))])
    model = write_jsonl(tmp_path / "m.jsonl", [{"id": str(i), "raw": t, "finish_reason": f}
                                               for i, (t, (_, f)) in enumerate(zip(texts, cases))])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": {"学历要求": ["本科"]}} for i in range(len(texts))])
    out = tmp_path / "o.jsonl"
    run = CliRunner().invoke(cli, ["run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model",
                                   str(model), "--out", str(out), "--quiet", "--overwrite"], catch_exceptions=False)
    assert run.exit_code in (0, 1, 2) and "Traceback" not in run.output
    rows = [row for _, row in iter_rows(out)]
    assert [row["raw"] for row in rows] == texts
    if run.exit_code:  # a run without any ok record may end non-zero, with one line saying so
        assert not any(row["status"] in SCORED_STATUSES for row in rows), run.output
    scored = CliRunner().invoke(cli, ["eval", str(out), "--gold", str(gold), "--task", "jd_requirements",
                                      "--metrics", str(tmp_path / "m.json"), "--quiet"], catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
