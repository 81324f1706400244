import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from extractor.results.judge import parse_json
from extractor.scoring.evaluate import Evaluator, evaluate
from extractor.scoring.join import GoldRecord, PredRecord
from extractor.scoring.lenient import overlap_f1
from extractor.scoring.facts import FactExtractor
from extractor.scoring.metrics import Counts
from extractor.scoring.normalize import make_normalizer
from extractor.tasks.task import load_task
from tests.conftest import shared_path, write_jsonl

LABELS = ["水果", "衣服", "洗浴", "平板", "酒店", "书籍", "电脑", "蒙牛"]


def score(task, preds, golds):
    ev = Evaluator(task)
    for i, (p, g) in enumerate(zip(preds, golds)):
        ev.add(str(i), PredRecord(str(i), p, "ok"), GoldRecord(str(i), g))
    return ev.result()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(LABELS)), st.sets(st.sampled_from(LABELS))),
                min_size=1, max_size=40))
def test_labels_match_sklearn(pairs):
    task = load_task("review_topic")
    golds = [sorted(g) for g, _ in pairs]
    preds = [sorted(p) for _, p in pairs]
    result = score(task, preds, golds)
    classes = sorted({c for row in golds + preds for c in row})
    if not classes:
        assert result["classes"] == {}
        return
    # All 8 columns, so scikit-learn sees a multilabel indicator matrix; average over the classes seen.
    mlb = MultiLabelBinarizer(classes=LABELS)
    yt, yp = mlb.fit_transform(golds), mlb.transform(preds)
    seen = [LABELS.index(c) for c in classes]
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=seen, zero_division=0)
    for i, c in enumerate(classes):
        got = result["classes"][c]
        assert got["precision"] == pytest.approx(p[i]) and got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i]) and got["support"] == s[i]
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(yt, yp, labels=seen, average=avg, zero_division=0)
        assert result[avg]["precision"] == pytest.approx(p)
        assert result[avg]["recall"] == pytest.approx(r)
        assert result[avg]["f1"] == pytest.approx(f)


def test_fields_hand_computed():
    task = load_task("jd_requirements")
    gold = {"学历要求": ["本科"], "专业要求": ["计算机", "数学"], "工作年限要求": ["该JD未要求"],
            "编程语言": ["Python", "java"], "加分项": ["该JD未要求"]}
    pred = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"],
            "编程语言": ["python ", "JAVA", "java"], "加分项": ["该JD未要求"]}
    r = score(task, [pred], [gold])
    assert r["classes"]["编程语言"] == {**r["classes"]["编程语言"], "tp": 2, "fp": 0, "fn": 0}
    assert (r["classes"]["专业要求"]["tp"], r["classes"]["专业要求"]["fn"]) == (1, 1)
    assert (r["classes"]["工作年限要求"]["fp"], r["classes"]["工作年限要求"]["support"]) == (1, 0)
    assert "加分项" not in r["classes"]  # absent marker on both sides: no fact
    assert (r["micro"]["tp"], r["micro"]["fp"], r["micro"]["fn"]) == (4, 1, 1)
    assert r["micro"]["f1"] == pytest.approx(0.8)


def test_tuples_duie_rules():
    task = load_task("spo")
    gold = [{"subject": "喜剧之王", "predicate": "主演", "object": "周星驰", "subject_type": "影视作品", "object_type": "人物"}]
    pred = [{"subject": "《喜剧之王》", "predicate": "主演", "object": "周星驰", "subject_type": "x", "object_type": "y"},
            {"subject": "《喜剧之王》", "predicate": "主演", "object": "周星驰", "subject_type": "x", "object_type": "y"},
            {"subject": "喜剧之王", "predicate": "导演", "object": "李力持", "subject_type": "影视作品", "object_type": "人物"}]
    r = score(task, [pred], [gold])
    assert r["classes"]["主演"]["tp"] == 1 and r["classes"]["主演"]["fp"] == 0  # 《》 stripped, duplicate once
    assert r["classes"]["导演"]["fp"] == 1 and r["micro"]["precision"] == pytest.approx(0.5)


def test_normalizer():
    norm = make_normalizer("normalized", strip_punctuation=".,", strip_book_title=True)
    assert norm("  《Ｐｙｔｈｏｎ  3.》 ") == "python 3"
    assert norm("《a》《b》") == "a》《b"  # only one surrounding pair
    assert make_normalizer("exact")(" A ") == " A "


def test_statuses_score_as_empty_and_missing_counted(tmp_path):
    task = load_task("review_topic")
    write_jsonl(tmp_path / "gold.jsonl", [{"id": str(i), "gold": ["水果"]} for i in range(4)])
    write_jsonl(tmp_path / "pred.jsonl", [
        {"id": "0", "prediction": ["水果"], "status": "ok"},
        {"id": "1", "prediction": ["水果"], "status": "schema_violation"},
        {"id": "2", "prediction": None, "status": "invalid_json"},
        {"id": "9", "prediction": ["水果"], "status": "ok"}])
    r = evaluate(task, tmp_path / "pred.jsonl", tmp_path / "gold.jsonl").result()
    assert r["classes"]["水果"]["tp"] == 1 and r["classes"]["水果"]["fn"] == 3 and r["classes"]["水果"]["fp"] == 0
    assert r["status_counts"] == {"invalid_json": 1, "missing": 1, "ok": 1, "schema_violation": 1}
    assert r["missing_ids"] == ["3"] and r["extra_ids"] == ["9"]


def test_gold_vs_gold_and_empty():
    task = load_task("spo")
    path = shared_path("data", "seed_mixed", "mixed_dev_dataset.jsonl")
    gold_objs = [parse_json(json.loads(line)["target"])[0] for line in path.read_text(encoding="utf-8").splitlines()]
    assert score(task, gold_objs, gold_objs)["micro"]["f1"] == 1.0
    empty = score(task, [[] for _ in gold_objs], gold_objs)
    assert empty["micro"]["recall"] == 0 and empty["micro"]["fn"] > 0


def test_seed_dev_eval_matches_sklearn(tmp_path):
    """Gold vs a perturbed copy on the seed's dev set, per predicate, checked against scikit-learn."""
    path = shared_path("data", "seed_mixed", "mixed_dev_dataset.jsonl")
    task = load_task("spo")
    rng = random.Random(1)
    preds, golds = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        g = parse_json(json.loads(line)["target"])[0]
        p = [dict(x) for x in g if isinstance(x, dict) and rng.random() > 0.2]
        for x in p:
            if rng.random() < 0.15:
                x["object"] += "X"
        golds.append(g)
        preds.append(p)
    write_jsonl(tmp_path / "pred.jsonl", [{"id": str(i + 1), "prediction": p, "status": "ok"} for i, p in enumerate(preds)])
    result = evaluate(task, tmp_path / "pred.jsonl", path).result()
    fx = FactExtractor(task)
    facts_g = [fx(g) for g in golds]
    facts_p = [fx(p) for p in preds]
    universe = sorted(set().union(*facts_g, *facts_p), key=str)
    index = {f: i for i, f in enumerate(universe)}
    yt = np.zeros((len(golds), len(universe)), int)
    yp = np.zeros_like(yt)
    for i, (fg, fp) in enumerate(zip(facts_g, facts_p)):
        for f in fg:
            yt[i, index[f]] = 1
        for f in fp:
            yp[i, index[f]] = 1
    for cls, got in result["classes"].items():
        cols = [index[f] for f in universe if f[0] == cls]
        p, r, f, _ = precision_recall_fscore_support(yt[:, cols].ravel(), yp[:, cols].ravel(), average="binary",
                                                     zero_division=0)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
    p, r, f, _ = precision_recall_fscore_support(yt.ravel(), yp.ravel(), average="binary", zero_division=0)
    assert result["micro"]["f1"] == pytest.approx(f)
    assert len(result["classes"]) > 20


def test_zero_division():
    assert Counts(0, 0, 0).f1 == 0 and Counts(0, 3, 0).precision == 0 and Counts(0, 0, 2).recall == 0


def test_lenient_overlap_beside_strict():
    task = load_task("skills")
    r = score(task, [{"skills": ["design scalable services"], "knowledge": []}],
              [{"skills": ["design scalable backend services"], "knowledge": []}])
    assert r["micro"]["f1"] == 0
    assert 0.8 < r["lenient"]["micro"]["f1"] < 1
    assert overlap_f1("熟悉分布式系统", "分布式系统") == pytest.approx(2 * 5 / 12)


@given(st.text(max_size=50), st.text(max_size=50))
def test_overlap_bounds(a, b):
    assert 0.0 <= overlap_f1(a, b) <= 1.0
