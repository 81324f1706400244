"""`extractor run --ray` on a local Ray instance (started by the driver): the same records and statuses as a
single-process run."""
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


def test_ray_run_equals_single_process(tmp_path, tiny_model, run_cli):
    """The hf backend on Ray actors of a local instance, with a LoRA adapter: the workers decode with it (each
    request names it), equal to the single-process run. Resume after a kill, object storage, a real two-node
    cluster and the refusals are in test_ray_cluster.py (echo backend)."""
    from tests.conftest import make_adapter
    adapter = make_adapter(tiny_model, "lora", tmp_path / "lora")
    corpus, _ = synth_corpus(tmp_path, n=40, seed=9)
    base, single, distributed = tmp_path / "base.jsonl", tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    # The references run in this process (a subprocess each would only add start-up); the Ray run is the
    # real command, its driver and actors in processes of their own.
    common = ("--task", "jd_requirements", "--max-new-tokens", "12", "--quiet", "--window", "8")
    assert run_cli("run", corpus, "--model", tiny_model, "--out", base, *common).exit_code == 0
    assert run_cli("run", corpus, "--model", tiny_model, "--out", single, "--adapter", adapter, *common).exit_code == 0
    result = run(corpus, tiny_model, distributed, "--adapter", adapter, "--ray", "--ray-workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_jsonl(single), read_jsonl(distributed)
    assert [r["id"] for r in b] == [r["id"] for r in a]
    assert [(r["status"], r["raw"], r["output_tokens"]) for r in b] == [(r["status"], r["raw"], r["output_tokens"])
                                                                         for r in a]
    assert [r["raw"] for r in read_jsonl(base)] != [r["raw"] for r in a], "the adapter must change outputs"
