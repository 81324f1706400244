"""Each GPU bench script (bench/gpu/) in its CPU smoke mode, as a subprocess from a clean checkout: it starts,
measures its rows on a tiny model and writes its result file and table. Speed is not checked (that is the GPU's
job); the GPU correctness checks are tests/gpu/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"


def smoke(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(GPU / script), "--smoke", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work folder: the run-path tokenizer is trained once for the scripts that need it."""
    return tmp_path_factory.mktemp("bench_gpu")


def test_no_script_imports_another():
    """Scripts share code through common.py only."""
    scripts = {p.stem for p in GPU.glob("*.py")} - {"common"}
    for path in GPU.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in scripts - {path.stem}:
            assert f"import {name}" not in text and f"from {name} " not in text, f"{path.name} imports {name}"


def test_decoder_smoke(tmp_path):
    proc = smoke("decoder.py", "--n", 8, "--parts", "fast,eos", "--out", tmp_path)
    d = json.loads((tmp_path / "gpu_decoder.json").read_text())
    assert d["card"] == "cpu (smoke run)" and d["date"] and d["n"] == 8
    assert d["fast"]["tokens"] == 8 * 12 and d["fast_eos"]["stops_honoured"] == 8
    table = (tmp_path / "gpu_decoder.md").read_text()
    assert "| FastDecoder | fixed |" in table and "| FastDecoder | EOS at 16-128 |" in table
    assert table.strip() in proc.stdout


def test_run_path_smoke(work):
    out = work / "run_path"
    smoke("run_path.py", "--n", 8, "--parts", "run", "--out", out)
    d = json.loads((out / "gpu_run_path.json").read_text())
    assert d["run_path"]["records"] == 8 and sum(d["run_path"]["statuses"].values()) == 8
    assert "`extractor run` path (hf, fast)" in (out / "gpu_run_path.md").read_text()


def test_cli_smoke(work, tmp_path):
    smoke("cli.py", "--out", tmp_path, "--work", work / "run_path" / "work", "--records", 6,
          "--variants", "ours_off", "--repeats", 1)
    d = json.loads((tmp_path / "gpu_cli.json").read_text())
    (line,) = d["table"]
    assert line["variant"] == "ours_off" and line["ok"] == 1, d["rows"][0]["stderr_tail"]
    assert line["wall_s"] > 0
    assert d["rows"][0]["records_written"] == 6 and d["date"]


def test_fast_on_off_smoke(tmp_path):
    proc = smoke("fast_on_off.py", "--n", 6, "--out", tmp_path)
    table = (tmp_path / "gpu_fast_on_off.md").read_text()
    assert "| extractor run --fast off |" in table and "| extractor run --fast on |" in table
    assert "same ids in order: True" in table and table.strip() in proc.stdout


def test_lora_mixed_smoke(tmp_path):
    smoke("lora_mixed.py", "--n", 4, "--out", tmp_path)
    d = json.loads((tmp_path / "gpu_lora_mixed.json").read_text())
    assert d["mixed_rr"]["tokens"] == 4 * 12 and d["mixed_all"]["tokens"] == 4 * 4 * 12
    assert set(d["ratios_to_base"]) == {"mixed_rr", "mixed_all"}


def test_vllm_rows_smoke(tmp_path):
    """Without vLLM importable the row records why, and the script still writes its file."""
    smoke("vllm_rows.py", "--n", 4, "--parts", "fixed", "--out", tmp_path)
    d = json.loads((tmp_path / "gpu_vllm.json").read_text())
    row = d["vllm_fixed_default"]
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "vllm" in row["error"]
    else:
        assert row["tokens"] == 4 * 12
    assert "best" in d and d["smoke"]
