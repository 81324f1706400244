import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extractor.cli.demo_cmd import run_demo
from extractor.demo import DemoConfig
from tests.conftest import read_jsonl, synth_corpus

EXTRACTOR = [sys.executable, "-m", "extractor"]


def train_args(model, data, out, *extra):
    corpus, gold = data["train"]
    dev, dev_gold = data["dev"]
    return ["train", "--model", model, "--train", corpus, "--gold", gold, "--dev", dev, "--dev-gold", dev_gold,
            "--task", "jd_requirements", "--out", out, "--eval-limit", "4", "--eval-max-new-tokens", "16",
            "--logging-steps", "5", "--batch-size", "4", "--max-source-len", "300", "--max-target-len", "64", *extra]


@pytest.fixture
def data(tmp_path):
    return {"train": synth_corpus(tmp_path, n=48, seed=1), "dev": synth_corpus(tmp_path, n=8, seed=2)}


def test_lora_training_loss_decreases_and_adapter_runs(tmp_path, tiny_model, data, run_cli):
    out = tmp_path / "lora"
    result = run_cli(*train_args(tiny_model, data, out, "--method", "lora", "--max-steps", "30", "--save-steps", "15",
                                 "--lr", "3e-3", "--quiet"))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and all("micro_f1" in r and "dev_loss" in r for r in evals)
    assert (out / "loss.png").exists() and (out / "f1.png").exists()
    assert (out / "checkpoint-15" / "adapter_model.safetensors").exists()
    preds = tmp_path / "p.jsonl"
    run = run_cli("run", data["dev"][0], "--task", "jd_requirements", "--model", tiny_model, "--adapter", out / "best",
                  "--out", preds, "--max-new-tokens", "8", "--quiet")
    assert run.exit_code == 0, run.output
    assert {r["adapter"] for r in read_jsonl(preds)} == {"best"}


def test_merged_lora_best_runs_as_a_model(tmp_path, tiny_model, data, run_cli):
    out = tmp_path / "merged"
    result = run_cli(*train_args(tiny_model, data, out, "--method", "lora", "--max-steps", "4", "--save-steps", "4",
                                 "--merge-lora", "--gradient-checkpointing", "--quiet"))
    assert result.exit_code == 0, result.output
    assert (out / "best" / "model.safetensors").exists() and not (out / "best" / "adapter_config.json").exists()
    run = run_cli("run", data["dev"][0], "--task", "jd_requirements", "--model", out / "best", "--out",
                  tmp_path / "p.jsonl", "--max-new-tokens", "4", "--quiet")
    assert run.exit_code == 0, run.output


@pytest.mark.parametrize("method", ["ptuning", "prefix"])
def test_prompt_learning_methods_train(tmp_path, tiny_model, data, run_cli, method):
    out = tmp_path / method
    result = run_cli(*train_args(tiny_model, data, out, "--method", method, "--max-steps", "6", "--save-steps", "6",
                                 "--virtual-tokens", "4", "--prefix-len", "4", "--quiet"))
    assert result.exit_code == 0, result.output
    assert (out / "best" / "adapter_config.json").exists()


def test_seed_format_training(tmp_path, tiny_model, run_cli):
    from tests.conftest import shared_path
    dev = shared_path("data", "seed_mixed", "mixed_dev_dataset.jsonl")
    out = tmp_path / "seed"
    result = run_cli("train", "--model", tiny_model, "--method", "lora", "--train", dev, "--dev", dev, "--task", "spo",
                     "--out", out, "--max-steps", "4", "--save-steps", "4", "--eval-limit", "3",
                     "--eval-max-new-tokens", "8", "--batch-size", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert "micro_f1" in read_jsonl(out / "metrics.jsonl")[-1]


def test_sigkill_then_resume_continues_at_saved_step(tmp_path, tiny_model, data, warm):
    """A real training process (a warm start: forked after the imports) SIGKILLed after checkpoint 20."""
    out = tmp_path / "full"
    args = train_args(tiny_model, data, out, "--method", "full", "--max-steps", "60", "--save-steps", "10")
    proc = warm.popen(args)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-20" / "trainer_state.pt").exists():
        time.sleep(0.05)
    proc.kill()
    saved = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.pt").exists())
    assert 20 <= saved < 60
    code, err = warm.run(args + ["--resume"], timeout=300)
    assert code == 0, err[-2000:]
    assert f"resumed from checkpoint-{saved} (step {saved})" in err
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert steps[-1] == 60 and f"step {saved + 5}/60" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 60


def test_two_process_training(tmp_path, tiny_model, data):
    out = tmp_path / "ddp"
    args = EXTRACTOR + train_args(tiny_model, data, out, "--method", "lora", "--max-steps", "10", "--save-steps", "10",
                                  "--processes", "2", "--warmup", "0")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    assert json.loads((out / "train_args.json").read_text())["processes"] == 2
    assert (out / "best" / "adapter_model.safetensors").exists()
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(lrs) == 2 and lrs[1] < lrs[0] and lrs[1] == pytest.approx(0.0, abs=1e-9)  # one schedule step per step


def test_short_demo_end_to_end(tmp_path):
    """The demo, shortened: every stage runs; `best` is the checkpoint with the highest dev F1."""
    out = tmp_path / "demo"
    outcome = run_demo(DemoConfig(out=out, train_n=200, dev_n=10, test_n=10, max_steps=40, save_steps=20,
                                  max_seconds=120, hidden=64, vocab=600, max_new_tokens=24))
    assert (out / "report-test" / "report.html").exists() and (out / "report-test" / "metrics.json").exists()
    assert 0.0 <= outcome["test_micro_f1"] <= 1.0 and outcome["regression_gate"].startswith("skipped")
    heldout = json.loads((out / "report-test_heldout" / "metrics.json").read_text())
    # printed beside the F1; absent where no held-out output came out ok (a 40-step model)
    want = heldout["grounding"]["micro"]["rate"] if "grounding" in heldout else None
    assert outcome["heldout_grounded_rate"] == want and "heldout_grounded_rate" in outcome
    evals = [r for r in read_jsonl(out / "train" / "metrics.jsonl") if r["kind"] == "eval"]
    best = json.loads((out / "train" / "best.json").read_text())
    top = max(evals, key=lambda r: (r["micro_f1"], -r["dev_loss"]))  # ties: the lower dev loss
    assert best["step"] == top["step"] and best["score"] == top["micro_f1"]
    assert (out / "train" / "best" / "model.safetensors").exists()


def test_time_aware_schedule_follows_the_faster_budget():
    """anneal_by_time: warmup and cosine follow max(steps spent, seconds spent), so a run the clock cuts
    short still ends annealed."""
    import math
    from extractor.training.config import TrainConfig
    from extractor.training.loop import Trainer
    t = Trainer(TrainConfig(model="m", out="o", max_steps=1000, max_seconds=100.0, warmup=0.1, anneal_by_time=True))
    t.total_steps = 1000

    def cosine(p):
        return 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9))
    assert t._time_aware_lr(0) == 0.0 and t._time_aware_lr(50) == pytest.approx(0.5)  # warmup by steps
    t._clock = time.perf_counter() - 50  # half the seconds spent, a tenth of the steps: the clock leads
    assert t._time_aware_lr(100) == pytest.approx(cosine(0.5), abs=1e-3)
    t._clock = time.perf_counter()  # no time spent: the steps lead
    assert t._time_aware_lr(900) == pytest.approx(cosine(0.9), abs=1e-3)
    t._clock = time.perf_counter() - 100
    assert t._time_aware_lr(10) == pytest.approx(0.0, abs=1e-9)


def test_nightly_gate_against_committed_baseline(tmp_path, run_cli):
    """The regression workflow for real: the committed demo checkpoint, rerun, against its baseline."""
    base = Path(__file__).resolve().parent.parent / "eval" / "demo"
    fresh = tmp_path / "fresh.jsonl"
    run = run_cli("run", base / "test.jsonl", "--task", "jd_requirements", "--model", base / "model", "--constrained",
                  "--few-shot", "0", "--out", fresh, "--quiet")
    assert run.exit_code == 0, run.output
    gate = ["--gold", base / "test.gold.jsonl", "--task", "jd_requirements", "--fail-if-drop", "0.01"]
    ok = run_cli("compare", base / "baseline.preds.jsonl", fresh, *gate)
    assert ok.exit_code == 0 and "no significant drop" in ok.output
    doc = json.loads((base / "metrics.json").read_text(encoding="utf-8"))
    assert doc["micro"]["f1"] >= 0.9
    # A planted regression: a fifth of the fresh predictions lose their programming languages.
    rows = read_jsonl(fresh)
    for r in rows[::5]:
        r["prediction"]["编程语言"] = ["该JD未要求"]
    worse = tmp_path / "worse.jsonl"
    worse.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    bad = run_cli("compare", base / "baseline.preds.jsonl", worse, *gate)
    assert bad.exit_code == 1 and "编程语言" in bad.output
