"""scoring/compare.py: the paired tests, the family-wise adjustment, the drop seen with 80% power, and the CLI."""
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from extractor.scoring.compare import (DROP, MICRO, TWO_SIDED, RunCounts, CompareSettings, compare_pair, maxt_stepdown,
                               regressions, too_small)
from extractor.datasets.synth import generate
from tests.conftest import write_jsonl
from tests.test_eval_cli import perturb


def runs_from(counts_a: np.ndarray, counts_b: np.ndarray) -> tuple[RunCounts, RunCounts]:
    """Two aligned runs from per-record class counts (records, classes, 3); micro is their sum."""
    ids = [f"r{i}" for i in range(len(counts_a))]
    classes = [f"c{j}" for j in range(counts_a.shape[1])]
    with_micro = [np.concatenate([c.sum(axis=1, keepdims=True), c], axis=1) for c in (counts_a, counts_b)]
    return RunCounts("a", ids, classes, with_micro[0]), RunCounts("b", ids, classes, with_micro[1])


count_arrays = st.integers(3, 25).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda c: st.tuples(arrays(np.int64, (n, c, 3), elements=st.integers(0, 3)),
                        arrays(np.int64, (n, c, 3), elements=st.integers(0, 3)))))

FAST = CompareSettings(resamples=200, seed=1)


@settings(max_examples=40, deadline=None)
@given(count_arrays)
def test_p_values_are_valid_and_adjusted_ones_never_smaller(pair):
    a, b = runs_from(*pair)
    tests = compare_pair(a, b, FAST)["tests"]
    assert list(tests) == [MICRO] + a.classes
    for t in tests.values():
        assert 0 < t["p_value"] <= t["p_adjusted"] <= 1
        assert t["ci95"][0] <= t["ci95"][1] and t["se"] >= 0
        assert t["mde80"] is None or t["mde80"] >= 0


@settings(max_examples=40, deadline=None)
@given(count_arrays)
def test_swapping_the_runs_negates_every_delta_and_keeps_two_sided_p(pair):
    a, b = runs_from(*pair)
    ab, ba = compare_pair(a, b, FAST)["tests"], compare_pair(b, a, FAST)["tests"]
    for name in ab:
        assert ab[name]["delta"] == pytest.approx(-ba[name]["delta"], abs=1e-12)
        assert ab[name]["p_value"] == pytest.approx(ba[name]["p_value"])
        assert ab[name]["p_adjusted"] == pytest.approx(ba[name]["p_adjusted"])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(lambda m: arrays(np.float64, (50, m), elements=st.floats(-3, 3))),
       st.integers(0, 2**32 - 1))
def test_stepdown_is_monotone_in_the_statistic(null, seed):
    observed = np.random.default_rng(seed).normal(size=null.shape[1]) * 2
    raw, adjusted = maxt_stepdown(observed, null)
    assert np.all(adjusted >= raw - 1e-12)
    order = np.argsort(-observed, kind="stable")
    assert np.all(np.diff(adjusted[order]) >= 0)  # a more extreme column never gets a larger adjusted p
    if null.shape[1] == 1:
        assert adjusted == pytest.approx(raw)


def test_identical_runs_flag_nothing_and_size_the_drop_as_independent():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2, size=(200, 3, 3))
    a, b = runs_from(counts, counts.copy())
    tests = compare_pair(a, b, CompareSettings(alternative=DROP))["tests"]
    for t in tests.values():
        assert t["delta"] == 0 and t["p_value"] == 1 and t["mde_basis"] == "independent" and t["mde80"] > 0
    assert regressions(tests, 0.0) == []
    assert too_small(tests, 1.0) == {} and set(too_small(tests, 0.0)) == set(tests)


def test_one_flipped_record_of_a_one_instance_class_is_not_significant():
    """Where a centred bootstrap says p ~ 0.001, the swap test is exact: p ~ 0.5."""
    a = np.zeros((100, 2, 3), dtype=np.int64)
    a[:, 0, 0] = 1  # c0: right everywhere in both runs
    a[7, 1, 0] = 1  # c1: one gold instance, right in A ...
    b = a.copy()
    b[7, 1] = (0, 0, 1)  # ... missed in B
    tests = compare_pair(*runs_from(a, b), CompareSettings(alternative=DROP))["tests"]
    assert tests["c1"]["delta"] == -1.0
    assert 0.4 < tests["c1"]["p_value"] < 0.6 and tests["c1"]["p_adjusted"] >= tests["c1"]["p_value"]


def test_a_lost_class_is_flagged_and_its_neighbours_are_not():
    a = np.zeros((300, 3, 3), dtype=np.int64)
    a[:, :, 0] = 1  # three classes, right on every record
    b = a.copy()
    b[::3, 2] = (0, 0, 1)  # B misses c2 on a third of the records
    tests = compare_pair(*runs_from(a, b), CompareSettings(alternative=DROP))["tests"]
    assert regressions(tests, 0.05) == [MICRO, "c2"]
    assert tests["c2"]["p_adjusted"] < 0.01 and tests["c0"]["p_adjusted"] == 1


def test_later_runs_share_one_family():
    rng = np.random.default_rng(3)
    a, b = runs_from(rng.integers(0, 3, size=(150, 2, 3)), rng.integers(0, 3, size=(150, 2, 3)))
    one = compare_pair(a, b, CompareSettings(alternative=TWO_SIDED))["tests"]
    three = compare_pair(a, b, CompareSettings(alternative=TWO_SIDED, comparisons=3))["tests"]
    for name in one:
        assert three[name]["p_adjusted"] == pytest.approx(min(1.0, 3 * one[name]["p_adjusted"]))
        assert three[name]["mde80"] > one[name]["mde80"]  # a larger family needs a larger drop


def test_the_drop_seen_shrinks_with_more_records():
    def mde(n):
        rng = np.random.default_rng(n)
        a = rng.binomial(1, 0.9, size=(n, 1, 3)) * np.array([1, 0, 0]) + rng.binomial(1, 0.1, size=(n, 1, 3)) * np.array([0, 1, 1])
        b = rng.binomial(1, 0.9, size=(n, 1, 3)) * np.array([1, 0, 0]) + rng.binomial(1, 0.1, size=(n, 1, 3)) * np.array([0, 1, 1])
        return compare_pair(*runs_from(a, b), CompareSettings(alternative=DROP))["tests"]["c0"]["mde80"]
    small, large = mde(200), mde(3200)
    assert large < small / 3  # about 1/sqrt(16) = 1/4


# --- the command -------------------------------------------------------------------------------------------

@pytest.fixture
def gold_and_runs(tmp_path):
    """300 postings; a baseline (8% errors), an equally good rerun and one that loses 编程语言 half the time."""
    rng = random.Random(1)
    golds = [g for _, g in generate(300, seed=9)]
    write_jsonl(tmp_path / "gold.jsonl", golds)
    runs = {name: [perturb(g["gold"], rng, 0.08) for g in golds] for name in ("base", "same", "drop")}
    for pred in runs["drop"][1::2]:
        pred["编程语言"] = ["噪声"]
    for name, preds in runs.items():
        write_jsonl(tmp_path / f"{name}.jsonl", [{"id": g["id"], "prediction": p, "status": "ok"}
                                                 for g, p in zip(golds, preds)])
    return tmp_path


def test_cli_prints_and_writes_adjusted_p_and_the_drop_seen(gold_and_runs, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps tables and lines at the terminal's width
    d = gold_and_runs
    result = run_cli("compare", d / "base.jsonl", d / "same.jsonl", d / "drop.jsonl", "--gold", d / "gold.jsonl",
                     "--task", "jd_requirements", "--fail-if-drop", "0.01", "--json", d / "c.json")
    assert result.exit_code == 1
    out = result.output
    assert "p adj" in out and "drop seen (80%)" in out and "F1 trend" in out and "▼" in out
    assert "REGRESSION" in out and "drop.jsonl: 编程语言" in out and "same.jsonl:" not in out.split("REGRESSION")[1]
    assert "warning: same.jsonl: 300 records are too few to see a drop of 0.01" in out
    report = json.loads((d / "c.json").read_text(encoding="utf-8"))
    assert report["format"] == "extractor.compare/2"
    assert report["test"]["alternative"] == "drop" and report["test"]["later_runs"] == 2
    same, drop = report["comparisons"]
    assert same["regressed"] == [] and "编程语言" in drop["regressed"]
    for t in drop["tests"].values():
        assert 0 < t["p_value"] <= t["p_adjusted"] <= 1 and t["mde80"] > 0
    assert set(same["too_small"]) == set(same["tests"])  # 300 records cannot see 0.01 anywhere


def test_cli_no_warning_when_the_threshold_is_visible(gold_and_runs, run_cli):
    d = gold_and_runs
    result = run_cli("compare", d / "base.jsonl", d / "same.jsonl", "--gold", d / "gold.jsonl",
                     "--task", "jd_requirements", "--fail-if-drop", "0.2")
    assert result.exit_code == 0 and "warning" not in result.output
    assert "no significant drop > 0.2 (family-wise alpha 0.05)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "0"], "--alpha"),
    (["--fail-if-drop", "-0.1"], "--fail-if-drop"),
])
def test_cli_refuses_bad_settings(gold_and_runs, run_cli, args, message):
    d = gold_and_runs
    result = run_cli("compare", d / "base.jsonl", d / "same.jsonl", "--gold", d / "gold.jsonl",
                     "--task", "jd_requirements", *args)
    assert result.exit_code == 2 and message in result.output
