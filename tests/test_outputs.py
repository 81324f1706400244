import functools
import json

from hypothesis import given, settings, strategies as st

from extractor.results.judge import (INVALID_JSON, OK, REPAIRED, SCHEMA_VIOLATION, TRUNCATED, Validator, judge,
                               parse_json)
from extractor.tasks.task import load_task

V = Validator(load_task("jd_requirements").schema)
GOOD = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"], "编程语言": ["java"], "加分项": ["该JD未要求"]}


def test_fenced_and_prose():
    text = "好的，结果如下：\n```json\n" + json.dumps(GOOD, ensure_ascii=False) + "\n```\n希望有帮助"
    assert judge(text, "stop", V).status == OK


def test_each_status():
    good = json.dumps(GOOD, ensure_ascii=False)
    assert judge(good, "stop", V).status == OK
    assert judge(good.replace('"', "'"), "stop", V).status == REPAIRED
    assert judge(good[:-1] + ",}", "stop", V).status == REPAIRED
    assert judge(good[:40], "length", V).status == TRUNCATED
    assert judge("no json", "stop", V).status == INVALID_JSON
    bad = judge(json.dumps({**GOOD, "学历要求": "本科"}, ensure_ascii=False), "stop", V)
    assert bad.status == SCHEMA_VIOLATION and bad.error.startswith("$.学历要求") and bad.prediction is not None


def test_control_characters_inside_strings_parse():
    value, found, repaired = parse_json('{"a": "x\x01y\nz"}')
    assert found and not repaired and value == {"a": "x\x01y\nz"}


def test_deep_nesting_and_huge_numbers():
    assert parse_json("[" * 100_000)[1] is False
    assert parse_json("[" * 5000 + "]" * 5000)[1] in (True, False)  # no crash either way
    value, found, _ = parse_json('{"n": 1' + "0" * 1000 + ', "f": 1e400}')
    assert found and value["n"] > 10 ** 999 and value["f"] == float("inf")
    # Beyond Python's int digit limit the value is not JSON we can read: a status, not a crash.
    assert judge('{"n": 1' + "0" * 5000 + "}", "stop", V).status == INVALID_JSON


def test_unicode_escapes():
    assert parse_json('{"a": "\\u672c\\u79d1"}')[0] == {"a": "本科"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_raises(text):
    parsed = judge(text, "stop", V)
    assert parsed.status in (OK, REPAIRED, INVALID_JSON, SCHEMA_VIOLATION)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(json_values, st.text(max_size=20), st.text(max_size=20))
def test_first_json_value_found_in_prose(value, before, after):
    """A JSON object or array embedded in prose is found as is (prose without brackets around it)."""
    before = before.replace("{", "").replace("[", "")
    text = before + json.dumps({"v": value}, ensure_ascii=False) + after
    got, found, repaired = parse_json(text)
    assert found and not repaired and got == {"v": value}


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(min_value=1, max_value=200))
def test_truncation_is_repaired_or_reported(value, cut):
    text = json.dumps({"v": value, "w": [1, 2, 3]}, ensure_ascii=False)
    parsed = judge(text[: max(1, len(text) - cut)], "length", V)
    beyond_64_bits = parsed.status == INVALID_JSON and "does not fit in 64 bits" in parsed.error
    assert parsed.status in (TRUNCATED, SCHEMA_VIOLATION, OK) or beyond_64_bits


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_validation_agrees_with_jsonschema(value):
    """The compiled fast path and the reference validator agree on every bundled schema."""
    for validator, reference in _bundled_validators():
        assert validator._fast is not None
        for candidate in (value, {"学历要求": value}, [value], [{"predicate": "主演", "subject": value}]):
            assert (validator.first_error(candidate) is None) == reference.is_valid(candidate)


@functools.lru_cache(maxsize=1)
def _bundled_validators() -> list:
    """Each bundled schema's Validator and jsonschema's reference validator, built once (not per example)."""
    from jsonschema import Draft202012Validator
    schemas = [load_task(name).schema for name in ("jd_requirements", "spo", "review_topic", "skills")]
    return [(Validator(schema), Draft202012Validator(schema)) for schema in schemas]
