"""scoring/grounding.py and the grounded rate: offsets checked by slicing (Chinese and English, the demo's
synthetic postings), normalized and fuzzy matches, values copied from the few-shot examples, linear time on
hostile texts, and the grounded rate through the real CLI: run, validate --corpus, eval with and without gold,
compare's gold-free gate, the report's highlighted spans."""
import json
import random
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractor.scoring.alignment import EXACT, FUZZY, FUZZY_THRESHOLD, NORMALIZED, Aligner
from extractor.scoring.edit_distance import best_substring, levenshtein, similarity
from extractor.scoring.grounding import Grounder
from extractor.datasets.synth import generate
from extractor.tasks.task import load_task
from tests.conftest import read_jsonl, write_jsonl

EXTRACTOR = [sys.executable, "-m", "extractor"]
JD = load_task("jd_requirements")
G = Grounder(JD)
A = Aligner()


def holds(text: str, value: str, e: dict) -> bool:
    """The property every span keeps: its slice is the value under its match kind."""
    piece = text[e["start"]:e["end"]]
    if e["match"] == EXACT:
        return piece == value
    if e["match"] == NORMALIZED:
        return A.key(piece) == A.key(value)
    return similarity(A.key(value), A.key(piece)) >= FUZZY_THRESHOLD


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_demo_postings_ground_every_gold_value_exactly(lang):
    for rec, gold in generate(300, seed=11, lang=lang):
        spans = G.ground(rec["text"], gold["gold"])
        n = 0
        for field, entries in spans.items():
            for e in entries:
                assert e["match"] == EXACT and rec["text"][e["start"]:e["end"]] == e["value"], (rec, e)
                n += 1
        assert n == sum(1 for vs in gold["gold"].values() for v in vs if v != "该JD未要求")


@pytest.mark.parametrize("text, value, match, piece", [
    # exact, and never inside a word of a spaced script
    ("We use Go daily at Google.", "Go", EXACT, "Go"),
    ("Google and golang only.", "go", None, None),
    ("3年以上经验，不是13年以上", "3年以上", EXACT, "3年以上"),
    ("至少13年以上经验", "3年以上", None, None),
    ("熟悉python3与python", "python", EXACT, "python"),
    # normalized: case, full/half width, whitespace, the separators 、，,
    ("熟练掌握Ｐｙｔｈｏｎ编程", "python", NORMALIZED, "Ｐｙｔｈｏｎ"),
    ("strong PYTHON skills", "Python", NORMALIZED, "PYTHON"),
    ("a background in Computer   Science.", "computer science", NORMALIZED, "Computer   Science"),
    ("熟练掌握python，c++", "python、c++", NORMALIZED, "python，c++"),
    ("熟练掌握 C ++ 开发", "c++", NORMALIZED, "C ++"),
    ("学历：本科", " 本科 ", NORMALIZED, "本科"),
    ("ﬁnance background", "finance", NORMALIZED, "ﬁnance"),
    # fuzzy, at similarity ≥ 0.8
    ("有自然语言处理的获奖经历者优先", "自然语言处理获奖经历", FUZZY, None),
    ("experience with distributed sytems is a plus", "experience with distributed systems", FUZZY, None),
    ("有大厂实习经历者优先", "开源项目经验", None, None),
    ("本科学历", "硕士", None, None),  # two characters: no room for a typo
])
def test_match_kinds_slice_to_the_value(text, value, match, piece):
    span = A.locate(A.text(text), value)
    if match is None:
        assert span is None
        return
    assert span is not None and span.match == match
    e = {"start": span.start, "end": span.end, "match": span.match}
    assert holds(text, value, e)
    if piece is not None:
        assert text[span.start:span.end] == piece


def test_values_copied_from_the_few_shot_example_are_flagged_only_when_absent():
    text = "本科及以上学历，熟悉java。"
    spans = G.ground(text, {"学历要求": ["硕士", "本科"], "编程语言": ["python", "java", "fortran"],
                            "加分项": ["该JD未要求"]})
    flags = {e["value"]: e.get("copied_from_prompt", False) for es in spans.values() for e in es}
    assert flags == {"硕士": True, "本科": False, "python": True, "java": False, "fortran": False}
    assert "加分项" not in spans  # the absent marker is no value
    assert G.ground("硕士学历", {"学历要求": ["硕士"]})["学历要求"][0]["match"] == EXACT


def test_tuples_ground_subject_and_object_not_the_predicate():
    g = Grounder(load_task("spo"))
    text = "《流浪地球》是郭帆执导的电影，由吴京主演。"
    spans = g.ground(text, [{"subject": "流浪地球", "predicate": "主演", "object": "吴京"},
                            {"subject": "流浪地球", "predicate": "导演", "object": "张艺谋"}])
    assert set(spans) == {"subject", "object"}
    assert [text[e["start"]:e["end"]] if e["start"] is not None else None for e in spans["object"]] == ["吴京", None]


def test_numbers_and_booleans_are_not_grounded():
    g = Grounder(load_task("skills"))
    assert g.ground("Python 3 and SQL", {"skills": ["Python", 3, True], "knowledge": None}) == {
        "skills": [{"value": "Python", "start": 0, "end": 6, "match": EXACT}]}


def test_best_substring_and_levenshtein_agree_with_the_textbook_table():
    rng = random.Random(0)

    def lev(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j - 1] + (ca != cb), prev[j] + 1, cur[j - 1] + 1))
            prev = cur
        return prev[-1]

    for _ in range(3000):
        a = "".join(rng.choice("ab中") for _ in range(rng.randint(1, 8)))
        w = "".join(rng.choice("ab中c") for _ in range(rng.randint(0, 14)))
        d, s, e = best_substring(a, w)
        assert levenshtein(a, w) == lev(a, w)
        assert lev(a, w[s:e]) == d == min(lev(a, w[i:j]) for i in range(len(w) + 1) for j in range(i, len(w) + 1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, value", [
    ("a" * 300_000, "aaaab" * 40),  # every bigram hits everywhere
    ("ab" * 150_000, "abababababx"),
    ("自然语言" * 75_000, "自然语言处理获奖经历"),
    ("x" * 300_000, "y" * 5000),  # a value past the fuzzy bound: exact and normalized only
    ("a" * 300_000, "A" * 5000),  # every normalized hit cuts a word
    ("a" * 300_000, "a" * 5000 + "b"),
])
def test_hostile_texts_stay_linear(text, value):
    start = time.perf_counter()
    G.locate(text, value)
    assert time.perf_counter() - start < 5


ALPHABET = "abAB中文本科 、，,Ｐｙ+ﬁ3１"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60), st.data())
def test_every_span_slices_to_the_value_under_its_match_kind(text, data):
    if data.draw(st.booleans()) and text:
        i = data.draw(st.integers(0, len(text) - 1))
        j = data.draw(st.integers(i + 1, len(text)))
        value = text[i:j]
        edit = data.draw(st.sampled_from(["none", "upper", "space", "drop"]))
        if edit == "upper":
            value = value.upper()
        elif edit == "space":
            value = " ".join(value)
        elif edit == "drop" and len(value) > 5:
            k = data.draw(st.integers(0, len(value) - 1))
            value = value[:k] + value[k + 1:]
    else:
        value = data.draw(st.text(alphabet=ALPHABET, min_size=1, max_size=12))
    span = A.locate(A.text(text), value)
    if span is not None:
        assert 0 <= span.start < span.end <= len(text)
        assert holds(text, value, {"start": span.start, "end": span.end, "match": span.match})


# --- through the CLI ------------------------------------------------------------------------------------------


def cli(*args, timeout=60):
    return subprocess.run([*EXTRACTOR, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """200 demo postings, their gold, a faithful run and one that writes the prompt's 'python' into a third of
    the records (absent from most of those texts)."""
    d = tmp_path_factory.mktemp("grounding")
    rng = random.Random(2)
    pairs = list(generate(200, seed=21))
    write_jsonl(d / "corpus.jsonl", [r for r, _ in pairs])
    write_jsonl(d / "gold.jsonl", [g for _, g in pairs])
    good = [{"id": g["id"], "prediction": g["gold"], "status": "ok"} for _, g in pairs]
    bad = []
    for _, g in pairs:
        pred = dict(g["gold"])
        if rng.random() < 0.35:
            pred["编程语言"] = ["python"]
        bad.append({"id": g["id"], "prediction": pred, "status": "ok"})
    write_jsonl(d / "good.jsonl", good)
    write_jsonl(d / "bad.jsonl", bad)
    return d


def test_run_rows_carry_spans_that_slice_to_their_values(runs, tmp_path):
    out = tmp_path / "run.jsonl"
    result = cli("run", runs / "corpus.jsonl", "--task", "jd_requirements", "--backend", "echo", "--model",
                 runs / "bad.jsonl", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    texts = {r["id"]: r["text"] for r in read_jsonl(runs / "corpus.jsonl")}
    rows = read_jsonl(out)
    copied = 0
    for row in rows:
        for entries in row["spans"].values():
            for e in entries:
                if e["start"] is not None:
                    assert holds(texts[row["id"]], e["value"], e)
                copied += e.get("copied_from_prompt", False)
    assert copied > 20
    # eval reads the rows' spans: no gold, no corpus
    result = cli("eval", out, "--task", "jd_requirements", "--metrics", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    g = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["grounding"]
    assert 0.8 < g["micro"]["rate"] < 1.0 and g["fields"]["编程语言"]["copied_from_prompt"] == copied


def test_eval_grounded_rate_without_and_with_gold(runs, tmp_path):
    result = cli("eval", runs / "good.jsonl", "--corpus", runs / "corpus.jsonl", "--task", "jd_requirements",
                 "--metrics", tmp_path / "good.json")
    assert result.returncode == 0, result.stderr
    assert "grounded rate 1.0000" in result.stdout
    doc = json.loads((tmp_path / "good.json").read_text(encoding="utf-8"))
    assert doc["provenance"]["gold"] is None and "micro" not in doc
    assert doc["grounding"]["micro"]["rate"] == 1.0 and doc["grounding"]["micro"]["exact"] > 500

    result = cli("eval", runs / "bad.jsonl", "--gold", runs / "gold.jsonl", "--corpus", runs / "corpus.jsonl",
                 "--task", "jd_requirements", "--metrics", tmp_path / "bad.json", "--report", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "bad.json").read_text(encoding="utf-8"))
    split = doc["grounding"]["by_outcome"]["micro"]
    fp = doc["micro"]["fp"]
    # every FP is the planted 'python' (ungrounded) or a 'python' the text did hold (grounded)
    assert split["fp_grounded"] + split["fp_ungrounded"] == fp and split["fp_ungrounded"] > 0
    assert split["tp_ungrounded"] == 0 and split["tp_grounded"] == doc["micro"]["tp"]
    ungrounded = doc["grounding"]["ungrounded"]["编程语言"]
    assert ungrounded[0]["value"] == "python" and ungrounded[0]["copied_from_prompt"] is True
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "<mark class='exact'" in html and "id='grounding'" in html and "copied from the prompt" in html


def test_eval_without_gold_or_text_is_one_error_line(runs):
    result = cli("eval", runs / "good.jsonl", "--task", "jd_requirements")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "pass --corpus" in result.stderr


def test_report_escapes_the_text_around_a_highlighted_span(tmp_path):
    text = "<script>alert(1)</script> 熟练掌握<b>java</b>&amp;"
    write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "status": "ok", "text": text, "prediction": {
        "学历要求": [], "专业要求": [], "工作年限要求": [], "编程语言": ["<b>java</b>"], "加分项": []}}])
    write_jsonl(tmp_path / "g.jsonl", [{"id": "x", "gold": {"学历要求": [], "专业要求": [], "工作年限要求": [],
                                                          "编程语言": ["<script>alert(1)</script>"], "加分项": []}}])
    result = cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", "--task", "jd_requirements",
                 "--report", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<b>java" not in html
    assert "<mark class='exact' title='exact match'>&lt;b&gt;java&lt;/b&gt;</mark>&amp;amp;" in html
    assert "<mark class='exact' title='exact match'>&lt;script&gt;alert(1)&lt;/script&gt;</mark>" in html


def test_validate_corpus_writes_spans_that_eval_reads(runs, tmp_path):
    out = tmp_path / "with_spans.jsonl"
    result = cli("validate", runs / "bad.jsonl", "--task", "jd_requirements", "--corpus", runs / "corpus.jsonl",
                 "--spans-out", out)
    assert result.returncode == 0, result.stderr
    assert "grounded rate" in result.stdout and "'python'" in result.stdout
    rows = read_jsonl(out)
    assert len(rows) == 200 and all("spans" in r for r in rows)
    result = cli("eval", out, "--task", "jd_requirements", "--quiet", "--metrics", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["grounding"]["micro"]["rate"] < 0.97


def test_compare_gates_a_drop_in_the_grounded_rate_without_gold(runs, tmp_path):
    args = ["--corpus", runs / "corpus.jsonl", "--task", "jd_requirements", "--fail-if-drop", "0.01"]
    same = cli("compare", runs / "good.jsonl", runs / "good.jsonl", *args)
    assert same.returncode == 0, same.stderr
    assert "no significant drop" in same.stdout
    worse = cli("compare", runs / "good.jsonl", runs / "bad.jsonl", *args, "--json", tmp_path / "c.json")
    assert worse.returncode == 1, worse.stderr
    assert "REGRESSION" in worse.stdout and "bad.jsonl: grounded" in worse.stdout
    tests = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["comparisons"][0]["tests"]
    assert set(tests) == {"grounded", *(f"grounded: {f}" for f in JD.spec.scoring.fields)}
    assert tests["grounded"]["metric"] == "grounded_rate" and tests["grounded"]["delta"] < -0.02
    assert tests["grounded"]["p_value"] <= tests["grounded"]["p_adjusted"] < 0.05
    # with gold and texts the rates join the F1 family
    both = cli("compare", runs / "good.jsonl", runs / "bad.jsonl", *args, "--gold", runs / "gold.jsonl",
               "--json", tmp_path / "c2.json")
    assert both.returncode == 1
    tests = json.loads((tmp_path / "c2.json").read_text(encoding="utf-8"))["comparisons"][0]["tests"]
    assert {"micro", "编程语言", "grounded", "grounded: 编程语言"} <= set(tests)


def test_compare_without_gold_needs_texts(runs):
    result = cli("compare", runs / "good.jsonl", runs / "bad.jsonl", "--task", "jd_requirements")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "pass --corpus" in result.stderr
