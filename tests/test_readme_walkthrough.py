"""The README's walkthrough, run as written; and the docs kept whole (every task key explained, links valid).

The walkthrough's blocks are marked in README.md: `<!-- walkthrough: PATH -->` before a block whose text is
a file the reader saves at PATH, `<!-- walkthrough -->` before a bash block of commands. The files are
written from the README's own blocks and the commands run in one bash process (so `export` and variables
carry over), in a temporary folder laid out like the repository root for what they read: `eval/demo/model`,
the committed demo checkpoint (a real trained model, 1.8 MB, seconds on a CPU). No network, no ../shared.
The nightly gate's block (`<!-- nightly -->`) runs the same way with that checkpoint as $CHECKPOINT, on the
committed eval set cut to its first records.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from extractor.results.judge import STATUSES
from extractor.tasks.task import Generation, PromptSpec, Scoring

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"

MARK = re.compile(r"<!-- walkthrough(?::\s*(?P<path>\S+))?\s*-->\n```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)\n```",
                  re.DOTALL)


def walkthrough(text: str) -> tuple[dict[str, str], list[str]]:
    """(files by path, command blocks) in README order."""
    files, commands = {}, []
    for m in MARK.finditer(text):
        if m["path"]:
            files[m["path"]] = m["body"] + "\n"
        else:
            assert m["lang"] == "bash", f"a walkthrough command block must be bash, not {m['lang']!r}"
            commands.append(m["body"])
    return files, commands


def test_walkthrough_blocks_are_found():
    files, commands = walkthrough(README.read_text(encoding="utf-8"))
    assert set(files) == {"my_task/job_facts.json", "my_task/job_facts.yaml", "my_task/postings.jsonl",
                          "my_task/gold.jsonl"}
    assert len(commands) == 1 and "extractor run" in commands[0] and "extractor eval" in commands[0]
    # Every marker was matched: a marker whose block was mistyped would silently drop a step.
    assert README.read_text(encoding="utf-8").count("<!-- walkthrough") == len(files) + len(commands)


@pytest.mark.timeout(240)
def test_walkthrough_runs_as_written(tmp_path):
    files, commands = walkthrough(README.read_text(encoding="utf-8"))
    for rel, body in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    (tmp_path / "eval" / "demo").mkdir(parents=True)
    (tmp_path / "eval" / "demo" / "model").symlink_to(REPO / "eval" / "demo" / "model", target_is_directory=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTRACTOR_", "OPENAI_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=230)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr

    # tasks: the task as loaded; --dry-run: the first record's exact model input, chat template applied
    assert "job_facts v1" in proc.stdout
    assert "<|im_start|>user" in proc.stdout and "Acme Corp hires a data engineer" in proc.stdout

    # run: one row per record, in input order, each judged, its raw text kept
    rows = [json.loads(line) for line in (tmp_path / "my_task/preds.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"]
    for r in rows:
        assert r["task"] == "job_facts" and r["status"] in STATUSES and isinstance(r["raw"], str)
    manifest = json.loads((tmp_path / "my_task/preds.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["summary"]["records"] == 3 and manifest["summary"]["complete"] is True

    # eval --report: the per-field classes the README names, the grounded rate, the report's files
    report = tmp_path / "my_task/report"
    for name in ("report.html", "summary.md", "metrics.json"):
        assert (report / name).is_file(), name
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    text = json.dumps(metrics, ensure_ascii=False)
    for cls in ("company", "salary.min", "salary.max", "remote", "skills"):
        assert f'"{cls}"' in text, cls
    assert "remote" in metrics["confusion_fields"]  # the README promises a confusion matrix for the enum
    assert "grounding" in metrics
    assert "micro F1" in proc.stdout or "micro F1" in proc.stderr
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "remote" in html


NIGHTLY = re.compile(r"<!-- nightly -->\n```bash\n(?P<body>.*?)\n```", re.DOTALL)
NIGHTLY_RECORDS = 40


def _first_records(src: Path, dst: Path, ids: set[str] | None) -> set[str]:
    lines = src.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if ids is None or json.loads(line)["id"] in ids][:NIGHTLY_RECORDS]
    dst.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return {json.loads(line)["id"] for line in kept}


@pytest.mark.timeout(240)
def test_nightly_gate_runs_as_written(tmp_path):
    """The gate's commands as the README gives them, the gold-free one included: the demo checkpoint scored
    again passes both gates (exit 0, a top-level pass in the JSON), and the gold-free gate compares the grounded
    rate alone."""
    blocks = NIGHTLY.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1 and "--corpus" in blocks[0] and "--gold" in blocks[0]
    demo, ours = REPO / "eval" / "demo", tmp_path / "eval" / "demo"
    ours.mkdir(parents=True)
    (ours / "model").symlink_to(demo / "model", target_is_directory=True)
    ids = _first_records(demo / "test.jsonl", ours / "test.jsonl", None)
    _first_records(demo / "test.gold.jsonl", ours / "test.gold.jsonl", ids)
    _first_records(demo / "baseline.preds.jsonl", ours / "baseline.preds.jsonl", ids)
    # as in a CI log: no terminal, no COLUMNS (another test's may linger in this worker), so tables at full width
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTRACTOR_", "OPENAI_")) and k != "COLUMNS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", CHECKPOINT="eval/demo/model")
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + blocks[0] + "\n"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    gate = json.loads((tmp_path / "nightly-compare.json").read_text(encoding="utf-8"))
    assert gate["pass"] is True and gate["gold"] == "eval/demo/test.gold.jsonl"
    # the gold-free gate: a table of the grounded rate (micro and per field), and its verdict
    words = " ".join(proc.stdout.split())  # rich wraps a title to its table's width, which the values decide
    assert "grounded rate (values found in the text / extracted)" in words
    assert "grounded: 学历要求" in proc.stdout and proc.stdout.count("no significant drop") == 2


def _yaml_block(text: str, path: str) -> dict:
    import yaml
    files, _ = walkthrough(text)
    return yaml.safe_load(files[path])


def _keys(model) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def test_every_task_key_is_explained():
    """README's task file shows every key of a prompt spec (the chunk sizes aside, which only `on_long: chunk`
    reads), each with a comment; docs/tasks.md's tables name every key, the nested ones included."""
    text = README.read_text(encoding="utf-8")
    spec = _yaml_block(text, "my_task/job_facts.yaml")
    assert set(spec) == _keys(PromptSpec) - {"chunk_tokens", "chunk_overlap"}
    PromptSpec.model_validate(spec)
    yaml_text = walkthrough(text)[0]["my_task/job_facts.yaml"]
    for key in spec:
        line = next(line for line in yaml_text.splitlines() if line.startswith(f"{key}:"))
        assert "#" in line or key in ("description", "scoring"), f"README's task file: key {key} has no comment"
    reference = (DOCS / "tasks.md").read_text(encoding="utf-8")
    for key in _keys(PromptSpec) | _keys(Scoring) | _keys(Generation):
        assert f"`{key}`" in reference, key


HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    body = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(h) for h in HEADING.findall(body)}


@pytest.mark.parametrize("doc", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_are_valid(doc):
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: link to {target}: no such heading"
