import json
import random
import shutil
import subprocess

import pytest

from extractor.datasets.synth import generate
from tests.conftest import read_jsonl, shared_path, write_jsonl


def perturb(gold: dict, rng: random.Random, rate: float) -> dict:
    out = {}
    for field, values in gold.items():
        values = list(values)
        if rng.random() < rate:
            values = values[:-1] + ["噪声"] if values else ["噪声"]
        out[field] = values
    return out


@pytest.fixture
def jd_runs(tmp_path):
    """Gold for 400 synthetic postings, a baseline run (5% errors), an equal copy and a regressed run."""
    rng = random.Random(0)
    golds = [g for _, g in generate(400, seed=5)]
    write_jsonl(tmp_path / "gold.jsonl", golds)
    base = [{"id": g["id"], "prediction": perturb(g["gold"], rng, 0.05), "status": "ok"} for g in golds]
    worse = [{"id": g["id"], "prediction": perturb(g["gold"], rng, 0.25), "status": "ok"} for g in golds]
    write_jsonl(tmp_path / "base.jsonl", base)
    write_jsonl(tmp_path / "same.jsonl", base)
    write_jsonl(tmp_path / "worse.jsonl", worse)
    return tmp_path


def test_eval_writes_metrics_with_provenance(jd_runs, run_cli):
    result = run_cli("eval", jd_runs / "base.jsonl", "--gold", jd_runs / "gold.jsonl", "--task", "jd_requirements")
    assert result.exit_code == 0 and "学历要求" in result.output and "micro" in result.output
    doc = json.loads((jd_runs / "base.jsonl.metrics.json").read_text(encoding="utf-8"))
    assert doc["format"] == "extractor.metrics/1"
    prov = doc["provenance"]
    assert prov["task"] == "jd_requirements" and prov["schema_hash"] and prov["package_version"]
    assert 0.85 < doc["micro"]["f1"] < 1.0


def test_compare_flags_planted_regression(jd_runs, run_cli):
    args = ["--gold", jd_runs / "gold.jsonl", "--task", "jd_requirements", "--fail-if-drop", "0.01"]
    same = run_cli("compare", jd_runs / "base.jsonl", jd_runs / "same.jsonl", *args)
    assert same.exit_code == 0 and "no significant drop" in same.output
    worse = run_cli("compare", jd_runs / "base.jsonl", jd_runs / "worse.jsonl", *args, "--json", jd_runs / "c.json")
    assert worse.exit_code == 1 and "REGRESSION" in worse.output and "micro" in worse.output
    report = json.loads((jd_runs / "c.json").read_text(encoding="utf-8"))
    tests = report["comparisons"][0]["tests"]
    assert tests["micro"]["delta"] < -0.05 and tests["micro"]["p_value"] < 0.05
    assert tests["micro"]["ci95"][0] <= tests["micro"]["delta"] <= tests["micro"]["ci95"][1]
    assert report["comparisons"][0]["flipped"]  # records that flipped are listed


def test_compare_trend_table_for_three_runs(jd_runs, run_cli):
    result = run_cli("compare", jd_runs / "base.jsonl", jd_runs / "same.jsonl", jd_runs / "worse.jsonl",
                     "--gold", jd_runs / "gold.jsonl", "--task", "jd_requirements")
    assert result.exit_code == 0 and "F1 trend" in result.output


def test_validate(tmp_path, run_cli):
    write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prediction": ["水果"]},
        {"id": "b", "prediction": ["苹果"]},
        {"id": "c", "raw": "答案：['水果', '衣服']"},
        {"id": "d", "raw": "no json here"}])
    result = run_cli("validate", tmp_path / "p.jsonl", "--task", "review_topic")
    assert result.exit_code == 1
    assert "4 records, 2 invalid" in result.output
    assert "schema_violation" in result.output and "line 2 (id b)" in result.output
    assert "repaired" in result.output


def test_eval_bad_gold_line(tmp_path, run_cli):
    write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "foo": 1}])
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": [], "status": "ok"}])
    result = run_cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", "--task", "review_topic")
    assert result.exit_code == 2 and "g.jsonl:1: unknown gold line" in result.stderr


def test_seed_dev_per_topic_and_predicate(tmp_path, run_cli):
    dev = shared_path("data", "seed_mixed", "mixed_dev_dataset.jsonl")
    rows = read_jsonl(dev)
    preds = [{"id": str(i), "raw": r["target"], "status": "ok", "prediction": None} for i, r in enumerate(rows, 1)]
    write_jsonl(tmp_path / "p.jsonl", preds)
    for task, cls in (("spo", "主演"), ("review_topic", "酒店")):
        result = run_cli("eval", tmp_path / "p.jsonl", "--gold", dev, "--task", task, "--reparse",
                         "--metrics", tmp_path / f"{task}.json")
        doc = json.loads((tmp_path / f"{task}.json").read_text(encoding="utf-8"))
        assert result.exit_code == 0 and cls in result.output
        assert doc["micro"]["f1"] == 1.0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_report_renders_in_chromium(jd_runs, run_cli, tmp_path):
    # A hostile record: its text must be shown escaped, never run.
    write_jsonl(jd_runs / "evil.jsonl", [{"id": "x1", "prediction": {"学历要求": ["<script>document.title='pwned'</script>"],
                                                                     "专业要求": [], "工作年限要求": [], "编程语言": [], "加分项": []},
                                          "status": "ok", "text": "<img src=x onerror=alert(1)>"}])
    write_jsonl(jd_runs / "evil_gold.jsonl", [{"id": "x1", "gold": {"学历要求": ["本科"], "专业要求": [], "工作年限要求": [],
                                                                    "编程语言": [], "加分项": []}}])
    report = tmp_path / "report"
    run_cli("eval", jd_runs / "evil.jsonl", "--gold", jd_runs / "evil_gold.jsonl", "--task", "jd_requirements",
            "--report", report)
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "<script>document" not in html and "&lt;script&gt;" in html
    report2 = tmp_path / "report2"
    run_cli("eval", jd_runs / "worse.jsonl", "--gold", jd_runs / "gold.jsonl", "--task", "jd_requirements",
            "--report", report2)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    for page in (report, report2):
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"file://{page / 'report.html'}"],
                             capture_output=True, text=True, timeout=120).stdout
        assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]
        assert 'id="per-class"' in dom and "学历要求" in dom
    # The images must decode: a screenshot of the page with the chart is non-trivial in size.
    from extractor.scoring.report.filters import FILTER_JS
    page_text = (report2 / "report.html").read_text(encoding="utf-8")
    assert page_text.count("<script") == 1 and f"<script>{FILTER_JS}</script>" in page_text  # the filter only
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    f"file://{report2 / 'report.html'}"], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 30_000
    assert (report2 / "f1_per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert (report2 / "summary.md").read_text(encoding="utf-8").startswith("# jd_requirements")
