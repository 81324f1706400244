"""`extractor run --ray` on a local Ray instance: the same records and statuses as a single-process run."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray.data")

from tests.conftest import read_jsonl, synth_corpus  # noqa: E402


def run(corpus, model, out, *extra):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model", str(model),
           "--out", str(out), "--max-new-tokens", "12", "--quiet", "--window", "8", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_ray_run_equals_single_process_and_resumes(tmp_path, tiny_model):
    corpus, _ = synth_corpus(tmp_path, n=40, seed=9)
    single, distributed = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    assert run(corpus, tiny_model, single).returncode == 0
    result = run(corpus, tiny_model, distributed, "--ray", "--ray-workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_jsonl(single), read_jsonl(distributed)
    assert [r["id"] for r in b] == [r["id"] for r in a]
    assert [(r["status"], r["raw"], r["output_tokens"]) for r in b] == [(r["status"], r["raw"], r["output_tokens"])
                                                                         for r in a]
    # Lose the last 15 rows (a run cut short), resume on Ray: each id once, same rows.
    lines = distributed.read_text(encoding="utf-8").splitlines(keepends=True)
    distributed.write_text("".join(lines[:25]), encoding="utf-8")
    resumed = run(corpus, tiny_model, distributed, "--ray", "--ray-workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = read_jsonl(distributed)
    assert sorted(r["id"] for r in c) == sorted(r["id"] for r in a) and len(c) == 40
    assert {r["id"]: r["raw"] for r in c} == {r["id"]: r["raw"] for r in a}


def test_cuda_workers_without_gpus_is_one_clear_error(tmp_path, tiny_model):
    """Ray would hold GPU actors pending forever on a cluster without GPUs: refused up front instead."""
    corpus, _ = synth_corpus(tmp_path, n=4, seed=1)
    result = run(corpus, tiny_model, tmp_path / "o.jsonl", "--ray", "--ray-workers", "2", "--device", "cuda")
    assert result.returncode == 2 and "the Ray cluster has no GPUs" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
