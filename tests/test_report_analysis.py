"""The report as an error-analysis tool: wrong values as predicted/expected pairs with both values marked in the
record's text, confusion matrices for enum and boolean fields, failed outputs with their raw text, filters by
class and status that work in a real browser (headless Chromium: DOM and screenshot), hostile values inert in
every format; and `--json` on eval and compare (stdout holds the JSON and nothing else)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from extractor.scoring.analysis import MAX_SCORED_PAIRS, RAW_CHARS, pair_errors
from extractor.scoring.lenient import overlap_f1
from extractor.scoring.metrics import ConfusionMatrix
from extractor.scoring.report.charts import f1_figure
from extractor.scoring.report.filters import FILTER_JS
from extractor.scoring.report.marks import layered
from tests.conftest import write_jsonl
from tests.helpers import HtmlTags

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")

SCHEMA = {"type": "object", "$defs": {"level": {"enum": ["junior", "senior"]}},
          "properties": {"company": {"type": "string"}, "salary": {"type": "string"},
                         "remote": {"enum": ["yes", "no", "unknown"]}, "visa": {"type": ["boolean", "null"]},
                         "level": {"type": "array", "items": {"$ref": "#/$defs/level"}},
                         "tags": {"type": "array", "items": {"enum": ["python", "go", "sql"]}},
                         "mode": {"anyOf": [{"enum": ["full", "part"]}, {"type": "null"}]}}}
FIELDS = list(SCHEMA["properties"])
CITIES = ["Berlin", "Lyon", "Oslo", "Porto"]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def write_task(root: Path) -> Path:
    (root / "prompts").mkdir(parents=True)
    (root / "schemas").mkdir()
    (root / "schemas" / "jobs.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    spec = {"name": "jobs", "version": "1", "description": "company, salary range, remote", "schema": "jobs.json",
            "input_fields": ["text"], "messages": [{"role": "user", "content": "Extract: {{ text }}"}],
            "scoring": {"kind": "fields", "fields": FIELDS, "match": "normalized"}}
    (root / "prompts" / "jobs.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return root


def posting(i: int) -> tuple[str, dict]:
    company, low = f"{CITIES[i % 4]} Works {i}", 30 + i
    remote = ("yes", "no", "unknown")[i % 3]
    text = (f"{company} hires a {'senior' if i % 2 else 'junior'} engineer for {low}k-{low + 10}k a year; "
            f"remote: {remote}. Stack: python and sql.")
    gold = {"company": company, "salary": f"{low}k-{low + 10}k", "remote": remote, "visa": bool(i % 2),
            "level": ["senior" if i % 2 else "junior"], "tags": ["python", "sql"], "mode": "full"}
    return text, gold


N = 40


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A user's own task (enum, boolean, array-of-enum fields), its corpus and gold, a good run and a bad one
    (wrong values, a truncated, an invalid and a schema-violating output), and the bad run's report."""
    d = tmp_path_factory.mktemp("jobs")
    write_task(d / "tasks")
    texts, golds = zip(*(posting(i) for i in range(N)))
    write_jsonl(d / "corpus.jsonl", [{"id": f"j{i}", "text": t} for i, t in enumerate(texts)])
    write_jsonl(d / "gold.jsonl", [{"id": f"j{i}", "gold": g} for i, g in enumerate(golds)])
    good = [{"id": f"j{i}", "prediction": g, "status": "ok", "raw": json.dumps(g)} for i, g in enumerate(golds)]
    write_jsonl(d / "good.jsonl", good)
    bad = []
    for i, g in enumerate(golds):
        p = dict(g)
        if i % 2 == 0:
            p["remote"] = "yes"  # a wrong enum value on half the records
            p["salary"] = g["salary"].split("-")[0]  # "30k" for "30k-40k": a wrong value, partly overlapping
        bad.append({"id": f"j{i}", "prediction": p, "status": "ok", "raw": json.dumps(p)})
    bad[1] = {"id": "j1", "prediction": None, "status": "truncated", "raw": '{"company": "Lyon Works 1", "sal',
              "error": "output hit max-new-tokens before a complete JSON value"}
    bad[3] = {"id": "j3", "prediction": None, "status": "invalid_json",
              "raw": "<script>alert('raw')</script> sorry, no JSON", "error": "no JSON value found in the output"}
    bad[5] = {"id": "j5", "prediction": {**golds[5], "remote": "maybe"}, "status": "schema_violation",
              "raw": json.dumps({**golds[5], "remote": "maybe"}), "error": "$.remote: 'maybe' is not one of [...]"}
    write_jsonl(d / "bad.jsonl", bad)
    made = cli("eval", d / "bad.jsonl", "--gold", d / "gold.jsonl", "--corpus", d / "corpus.jsonl", "--task", "jobs",
               "--tasks-dir", d / "tasks", "--report", d / "report", "--quiet")
    assert made.returncode == 0, made.stderr
    return d


def metrics(jobs) -> dict:
    return json.loads((jobs / "report" / "metrics.json").read_text(encoding="utf-8"))


# --- pairs -----------------------------------------------------------------------------------------------------

facts = st.sets(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["x", "x y", "y z", "w", "v v"])), max_size=6)


@settings(max_examples=200, deadline=None)
@given(facts, facts)
def test_pairing_keeps_every_error_once_and_pairs_within_a_class(fps, fns):
    fns = fns - fps  # a fact is never both a false positive and a false negative
    items = pair_errors(fps, fns, overlap_f1)
    assert sorted((i.cls, i.predicted) for i in items if i.predicted is not None) == sorted(fps)
    assert sorted((i.cls, i.expected) for i in items if i.expected is not None) == sorted(fns)
    for cls in ("a", "b"):
        wrong = [i for i in items if i.cls == cls and i.kind == "wrong"]
        assert len(wrong) == min(sum(c == cls for c, _ in fps), sum(c == cls for c, _ in fns))


def test_pairing_prefers_the_overlapping_value():
    items = pair_errors({("salary", "30k"), ("salary", "remote")}, {("salary", "30k-40k")}, overlap_f1)
    assert [(i.kind, i.predicted, i.expected) for i in items] == [("wrong", "30k", "30k-40k"),
                                                                  ("fp", "remote", None)]


def test_pairing_a_huge_record_is_bounded():
    fps = {("f", f"p{i}") for i in range(200)}
    fns = {("f", f"g{i}") for i in range(200)}
    assert len(fps) * len(fns) > MAX_SCORED_PAIRS
    items = pair_errors(fps, fns, overlap_f1)
    assert sum(i.kind == "wrong" for i in items) == 200 and len(items) == 200


def test_eval_shows_wrong_values_as_pairs_with_both_marked(jobs):
    doc = metrics(jobs)
    wrong = {(w["predicted"], w["expected"]) for w in doc["examples"]["salary"]["wrong_values"]}
    assert ("30k", "30k-40k") in wrong
    # the wrong salaries are pairs, not false positives; the false negatives left are the failed records'
    assert doc["examples"]["salary"]["false_positives"] == []
    assert {x["id"] for x in doc["examples"]["salary"]["false_negatives"]} == {"j1", "j3", "j5"}
    rec = next(r for r in doc["errors"]["records"] if r["id"] == "j2")
    assert {(e["class"], e["kind"], e["predicted"], e["expected"]) for e in rec["errors"]} == {
        ("salary", "wrong", "32k", "32k-42k"), ("remote", "wrong", "yes", "unknown")}
    roles = {(h["role"], rec["snippet"][h["start"]:h["end"]]) for h in rec["highlights"]}
    assert {("pred", "32k"), ("gold", "32k-42k"), ("gold", "unknown")} <= roles
    # counts are unchanged by pairing: TP/FP/FN as ever
    assert doc["classes"]["salary"]["fp"] == N // 2 and doc["classes"]["salary"]["fn"] == N // 2 + 3


def test_error_records_are_bounded_per_class_and_status(tmp_path):
    write_task(tmp_path / "tasks")
    gold = [{"id": str(i), "gold": {"company": "A"}} for i in range(100)]
    write_jsonl(tmp_path / "g.jsonl", gold)
    write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prediction": {"company": "B"}, "status": "ok"}
                                       for i in range(100)])
    result = cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", "--task", "jobs", "--tasks-dir",
                 tmp_path / "tasks", "--metrics", tmp_path / "m.json", "--quiet")
    assert result.returncode == 0, result.stderr
    errors = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["errors"]
    assert errors["records_with_errors"] == 100 and errors["shown"] == errors["per_class"] == 20


# --- confusion matrices ----------------------------------------------------------------------------------------

def test_confusion_matrices_of_enum_boolean_and_enum_array_fields(jobs):
    cm = metrics(jobs)["confusion_fields"]
    assert set(cm) == {"remote", "visa", "level", "tags", "mode"}  # company and salary are free text
    assert cm["remote"]["labels"] == ["yes", "no", "unknown", "(none)"]
    assert cm["visa"]["labels"] == ["true", "false", "(none)"] and cm["mode"]["labels"] == ["full", "part", "(none)"]
    assert "skipped" in cm["tags"] and "more than one value" in cm["tags"]["skipped"]  # multi-label: no matrix
    # an independent count: remote is "yes" on even records, missing on the 3 failed ones, else right
    want = {}
    for i in range(N):
        gold = ("yes", "no", "unknown")[i % 3]
        pred = "(none)" if i in (1, 3, 5) else "yes" if i % 2 == 0 else gold
        want[gold, pred] = want.get((gold, pred), 0) + 1
    labels, matrix = cm["remote"]["labels"], cm["remote"]["matrix"]
    got = {(g, p): matrix[i][j] for i, g in enumerate(labels) for j, p in enumerate(labels) if matrix[i][j]}
    assert got == want and cm["remote"]["records"] == N == sum(map(sum, matrix))


def test_confusion_matrix_orders_labels_and_counts_none():
    m = ConfusionMatrix(["yes", "no"])
    for g, p in [("yes", "yes"), ("no", None), (None, "maybe"), ("no", "yes")]:
        m.add(g, p)
    d = m.as_dict()
    assert d["labels"] == ["yes", "no", "maybe", "(none)"]
    assert d["matrix"] == [[1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]] and d["correct"] == 1


# --- failed outputs --------------------------------------------------------------------------------------------

def test_failed_outputs_are_listed_per_status_with_raw_and_error(jobs):
    failed = metrics(jobs)["failed"]
    assert set(failed) == {"truncated", "invalid_json", "schema_violation"}
    assert failed["truncated"]["records"][0] == {"id": "j1", "error": "output hit max-new-tokens before a complete "
                                                 "JSON value", "raw": '{"company": "Lyon Works 1", "sal',
                                                 "raw_chars": 32, "prediction_type": None}
    assert failed["schema_violation"]["records"][0]["error"].startswith("$.remote")
    html = (jobs / "report" / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#x27;raw&#x27;)&lt;/script&gt; sorry, no JSON" in html


def test_a_long_raw_output_is_cut_and_says_so(tmp_path):
    write_task(tmp_path / "tasks")
    write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "gold": {"company": "A"}}])
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": None, "status": "invalid_json", "raw": "x" * 10_000,
                                        "error": "no JSON value found in the output"}])
    result = cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", "--task", "jobs", "--tasks-dir",
                 tmp_path / "tasks", "--report", tmp_path / "r", "--quiet")
    assert result.returncode == 0, result.stderr
    rec = json.loads((tmp_path / "r" / "metrics.json").read_text(encoding="utf-8"))["failed"]["invalid_json"]
    assert rec["records"][0]["raw_chars"] == 10_000 and len(rec["records"][0]["raw"]) == RAW_CHARS
    assert f"(first {RAW_CHARS} of 10000 characters)" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")


# --- rendering -------------------------------------------------------------------------------------------------

def parse(text: str) -> HtmlTags:
    return HtmlTags(text)


HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a|b", "&amp;", "[x](javascript:alert(1))",
           "\"'><b>", "熟练<掌握>"]


@pytest.mark.parametrize("text", HOSTILE)
def test_overlapping_marks_render_the_text_as_written(text):
    record = {"snippet": f"{text} and {text}x", "errors": [{"class": "f<i>"}, {"class": "g"}],
              "highlights": [{"start": 0, "end": len(text), "match": "exact", "role": "pred", "item": 0},
                             {"start": 2, "end": len(text) + 5, "match": "fuzzy", "role": "gold", "item": 1}]}
    page = parse(layered(record))
    assert set(page.tags) == {"mark"} and "".join(page.text) == record["snippet"]
    assert ("class", "gold pred") in page.attrs and ("class", "pred") in page.attrs
    assert ("title", "predicted, exact match; expected, fuzzy match") in page.attrs


@pytest.mark.parametrize("where", ["class", "value", "id", "raw", "text"])
def test_hostile_values_are_inert_in_html_and_markdown(tmp_path, where):
    """A hostile string as a field name, a value, a record id, a raw output or a source text: shown as text,
    never markup, in the HTML report (whose only script is the filter) and the Markdown summary."""
    evil = "<img src=x onerror=alert(1)>|`*[a](javascript:alert(1))"
    field = evil if where == "class" else "company"
    root = tmp_path / "tasks"
    (root / "prompts").mkdir(parents=True)
    (root / "schemas").mkdir()
    schema = {"type": "object", "properties": {field: {"enum": ["x", "y", evil]}}}
    (root / "schemas" / "t.json").write_text(json.dumps(schema), encoding="utf-8")
    spec = {"name": "t", "version": "1", "description": "t", "schema": "t.json", "input_fields": ["text"],
            "messages": [{"role": "user", "content": "{{ text }}"}],
            "scoring": {"kind": "fields", "fields": [field], "match": "exact"}}
    (root / "prompts" / "t.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    rid = evil if where == "id" else "r1"
    text = evil if where in ("text", "value") else "plain x text"
    write_jsonl(tmp_path / "g.jsonl", [{"id": rid, "gold": {field: "x"}}, {"id": "r2", "gold": {field: "x"}}])
    write_jsonl(tmp_path / "c.jsonl", [{"id": rid, "text": text}, {"id": "r2", "text": "x"}])
    write_jsonl(tmp_path / "p.jsonl", [
        {"id": rid, "prediction": {field: evil if where == "value" else "y"}, "status": "ok"},
        {"id": "r2", "prediction": None, "status": "invalid_json", "raw": evil if where == "raw" else "no",
         "error": "no JSON value found in the output"}])
    result = cli("eval", tmp_path / "p.jsonl", "--gold", tmp_path / "g.jsonl", "--corpus", tmp_path / "c.jsonl",
                 "--task", "t", "--tasks-dir", root, "--report", tmp_path / "r", "--quiet")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    assert page.tags.count("script") == 1 and html.count(f"<script>{FILTER_JS}</script>") == 1
    assert "img" not in page.tags and not any(k.startswith("on") for k, _ in page.attrs)
    assert not any("javascript:" in (v or "") for _, v in page.attrs)
    assert evil in "".join(page.text)
    markdown_it = pytest.importorskip("markdown_it")
    md = (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")
    rendered = parse(markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table"]).render(md))
    assert "img" not in rendered.tags or {v for k, v in rendered.attrs if k == "src"} <= {"f1_per_class.png"}
    assert not any(k.startswith("on") or k == "href" for k, _ in rendered.attrs)


def test_the_legend_covers_no_bar():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = {f"class {i}": {"f1": f1} for i, f1 in enumerate([1.0, 0.98, 0.95, 0.9, 1.0, 0.99])}
    fig = f1_figure(plt, {"classes": classes, "micro": {"f1": 0.97}})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    ax = fig.axes[0]
    assert not legend.overlaps(ax.get_window_extent(renderer))  # outside the axes altogether
    assert all(not legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    plt.close(fig)


# --- --json ----------------------------------------------------------------------------------------------------

def test_eval_json_prints_the_metrics_document_alone(jobs, tmp_path):
    args = [jobs / "bad.jsonl", "--gold", jobs / "gold.jsonl", "--task", "jobs", "--tasks-dir", jobs / "tasks",
            "--metrics", tmp_path / "m.json", "--json"]
    result = cli("eval", *args)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing but the document
    assert doc == json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert doc["format"] == "extractor.metrics/1" and "confusion_fields" in doc
    assert "micro F1" in result.stderr and "remote" in result.stderr  # the tables went to stderr
    for flag in ("--quiet", "-q"):
        quiet = cli("eval", *args, flag)
        assert quiet.returncode == 0 and json.loads(quiet.stdout)["micro"] == doc["micro"] and quiet.stderr == ""
    broken = cli("eval", jobs / "bad.jsonl", "--gold", jobs / "missing.jsonl", "--task", "jobs", "--tasks-dir",
                 jobs / "tasks", "--json")
    assert broken.returncode == 2 and broken.stdout == "" and "Traceback" not in broken.stderr


def test_eval_json_without_gold(jobs):
    result = cli("eval", jobs / "bad.jsonl", "--corpus", jobs / "corpus.jsonl", "--task", "jobs", "--tasks-dir",
                 jobs / "tasks", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["provenance"]["gold"] is None and doc["failed"]["truncated"]["count"] == 1


@pytest.mark.parametrize("run, gate, code, verdict", [
    ("good.jsonl", ["--fail-if-drop", "0.01"], 0, True),
    ("bad.jsonl", ["--fail-if-drop", "0.01"], 1, False),
    ("bad.jsonl", [], 0, None),  # no gate: nothing passed or failed
])
@pytest.mark.parametrize("flag", [["--json"], ["--json", "-"]])
def test_compare_json_on_stdout_with_a_top_level_pass(jobs, run, gate, code, verdict, flag):
    result = cli("compare", jobs / "good.jsonl", jobs / run, "--gold", jobs / "gold.jsonl", "--task", "jobs",
                 "--tasks-dir", jobs / "tasks", *gate, *flag)
    assert result.returncode == code, result.stderr
    report = json.loads(result.stdout)
    assert report["pass"] is verdict and report["format"] == "extractor.compare/2"
    assert list(report)[0] == "pass"  # first, for a reader of the head of the file
    if verdict is False:
        assert any(r.endswith("remote") or r.endswith("micro") for r in report["gate"]["regressed"])
        assert "REGRESSION" in result.stderr
    elif gate:
        assert "no significant drop" in result.stderr


def test_compare_json_to_a_file_and_a_run_read_as_its_path(jobs, tmp_path):
    common = ["--gold", jobs / "gold.jsonl", "--task", "jobs", "--tasks-dir", jobs / "tasks", "--fail-if-drop", "0.01"]
    out = tmp_path / "c.json"
    result = cli("compare", jobs / "good.jsonl", jobs / "bad.jsonl", *common, "--json", out)
    assert result.returncode == 1 and "REGRESSION" in result.stdout
    assert json.loads(out.read_text(encoding="utf-8"))["pass"] is False
    again = cli("compare", jobs / "good.jsonl", jobs / "good.jsonl", *common, "--json", out)  # a report: replaced
    assert again.returncode == 0 and json.loads(out.read_text(encoding="utf-8"))["pass"] is True
    before = (jobs / "good.jsonl").read_bytes()
    swallowed = cli("compare", "--json", jobs / "good.jsonl", jobs / "bad.jsonl", *common)
    assert swallowed.returncode == 2 and swallowed.stderr.count("\n") == 1 and "put --json after the runs" in swallowed.stderr
    assert (jobs / "good.jsonl").read_bytes() == before


# --- in a browser ----------------------------------------------------------------------------------------------

def chromium(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@needs_chromium
def test_report_renders_filters_and_is_not_blank_in_chromium(jobs, tmp_path):
    from PIL import Image, ImageStat
    page = jobs / "report" / "report.html"
    shot = tmp_path / "report.png"
    chromium(tmp_path, "--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot}", f"file://{page}")
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        gray = img.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 20  # text, tables and bars, not a blank page
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # the chart's and the marks' colours
    dom = chromium(tmp_path, "--dump-dom", f"file://{page}").stdout
    assert 'id="f-class"' in dom and 'id="f-status"' in dom and ">remote</option>" in dom
    assert ">truncated</option>" in dom and ">schema_violation</option>" in dom
    assert 'class="fc err-wrong"' in dom and "predicted <code class=\"pred\">30k</code>, expected" in dom
    assert 'class="cm"' in dom and "gold \\ predicted" in dom
    assert 'id="f-shown">' + str(len(metrics(jobs)["errors"]["records"])) + "<" in dom  # the script ran


@needs_chromium
def test_filters_from_the_address_hide_the_rest(jobs, tmp_path):
    page = jobs / "report" / "report.html"
    dom = chromium(tmp_path, "--dump-dom", f"file://{page}#class=salary&status=truncated").stdout
    records = dom.split('<div id="error-records">')[1].split("</div></div>")[0]
    shown = [b for b in records.split('<div class="rec"')[1:] if not b.split(">")[0].strip().endswith('hidden=""')]
    assert len(shown) == 1 and "record j1" in shown[0]  # the truncated record, which lacks a salary
    assert 'id="f-shown">1<' in dom
    failed = dom.split('<div id="failed">')[1]
    visible = [b.split("</h3>")[0] for b in failed.split('<div class="fs"')[1:] if 'hidden=""' not in b.split(">")[0]]
    assert len(visible) == 1 and "truncated" in visible[0]


@needs_chromium
def test_the_pages_policy_blocks_any_other_script(jobs, tmp_path):
    """Defence in depth: were a value ever to slip past escaping, the page's CSP would not run it."""
    html = (jobs / "report" / "report.html").read_text(encoding="utf-8")
    injected = tmp_path / "injected.html"
    injected.write_text(html.replace("</h1>", "</h1><script>document.title='pwned'</script>", 1), encoding="utf-8")
    dom = chromium(tmp_path, "--dump-dom", f"file://{injected}").stdout
    assert "<title>pwned</title>" not in dom and 'id="f-shown">' in dom
