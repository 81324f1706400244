"""Data-parallel training speed-up: `extractor train` on 1 GPU vs `--processes 2` on 2 GPUs.

Model: random weights in the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV heads, FFN 4864)
with a tokenizer trained locally (vocabulary ~2k instead of 152k: a smaller LM head, stated in the results).
Data: synthetic `jd_requirements` postings rendered with the task's prompt. Full fine-tuning, bf16 autocast.
Throughput is taken from metrics.jsonl, skipping the first logging window (warm-up).

    python bench/bench_train_gpu.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(root: Path) -> tuple[Path, dict]:
    from extractor.datasets.synth import write_corpus
    from extractor.datasets.tiny_models import build_tiny_model, tokenizer_corpus
    data = {}
    for name, n, seed in (("train", 6000, 1), ("dev", 64, 2)):
        corpus, gold = root / f"{name}.jsonl", root / f"{name}.gold.jsonl"
        write_corpus(corpus, gold, n, seed=seed)
        data[name] = (corpus, gold)
    model = build_tiny_model(root / "model", vocab_size=2048, hidden=896, layers=24, heads=14, kv_heads=2,
                             intermediate=4864, init_std=0.02, texts=tokenizer_corpus(3000))
    return model, data


def train(model: Path, data: dict, out: Path, processes: int, steps: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "extractor", "train", "--model", str(model), "--method", "full",
           "--train", str(data["train"][0]), "--gold", str(data["train"][1]), "--dev", str(data["dev"][0]),
           "--dev-gold", str(data["dev"][1]), "--task", "jd_requirements", "--out", str(out),
           "--max-steps", str(steps), "--save-steps", str(steps), "--logging-steps", "10", "--batch-size", str(batch),
           "--precision", "bf16", "--lr", "1e-4", "--eval-limit", "8", "--eval-max-new-tokens", "16",
           "--processes", str(processes)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out.parent / f"train-{processes}.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"training with {processes} process(es) failed; see train-{processes}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["kind"] == "train"][1:]
    return {"processes": processes, "tokens_per_s": sum(r["tokens_per_s"] for r in logs) / len(logs),
            "steps_per_s": sum(r["steps_per_s"] for r in logs) / len(logs), "wall_s": wall,
            "global_batch": batch * processes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32, help="Per process.")
    args = parser.parse_args()
    import torch
    import transformers
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model, data = build(root / "work")
    results = [train(model, data, root / f"run-{p}", p, args.steps, args.batch) for p in (1, 2)]
    card = torch.cuda.get_device_name(0)
    lines = [f"card: {card} x{torch.cuda.device_count()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}", "| processes | global batch | steps/s | tokens/s |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['processes']} | {r['global_batch']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:,.0f} |"
              for r in results]
    lines.append(f"speed-up (tokens/s, 2 vs 1): {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    text = "\n".join(lines)
    print(text)
    (root / "train_gpu.md").write_text(text + "\n")
    (root / "train_gpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
