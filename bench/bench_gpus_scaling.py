"""`extractor run --gpus 2` against one GPU, same corpus, same model, same settings.

Model: random weights in the Qwen2.5-0.5B shape with a locally trained tokenizer (as bench_train_gpu.py);
corpus: synthetic job postings rendered with the jd_requirements prompt; greedy, --max-new-tokens 64 (a random
model rarely stops early, so nearly every record generates 64 tokens). This measures the `hf` backend as it is
today (plain `generate`, length-sorted batches), not the CUDA fast path (FastDecoder).

    python bench/bench_gpus_scaling.py --out $OUT --n 4096
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(corpus: Path, model: Path, out: Path, gpus: int | None, batch: int) -> dict:
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model", str(model),
           "--out", str(out), "--max-new-tokens", "64", "--batch-size", str(batch), "--batch-tokens", "1000000",
           "--window", str(batch * 4), "--quiet", "--overwrite"]
    if gpus:
        cmd += ["--gpus", str(gpus)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(r["output_tokens"] for r in rows)
    return {"gpus": gpus or 1, "records": len(rows), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "records_per_s": len(rows) / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    import torch
    from extractor.datasets.synth import write_corpus
    from extractor.datasets.tiny_models import build_tiny_model, tokenizer_corpus
    root = Path(args.out)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(work / "model", vocab_size=2048, hidden=896, layers=24, heads=14, kv_heads=2,
                             intermediate=4864, init_std=0.02, texts=tokenizer_corpus(3000))
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, None, args.n, seed=5)
    warm = work / "warm.jsonl"
    write_corpus(warm, None, 64, seed=6)
    run(warm, model, work / "warm.out.jsonl", None, args.batch)  # first CUDA use, caches
    one = run(corpus, model, work / "one.jsonl", None, args.batch)
    two = run(corpus, model, work / "two.jsonl", 2, args.batch)
    same = [json.loads(x)["raw"] for x in (work / "one.jsonl").read_text().splitlines()] == \
           [json.loads(x)["raw"] for x in (work / "two.jsonl").read_text().splitlines()]
    lines = [f"card: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}",
             "| run | records | output tokens | wall s | output tokens/s |", "| --- | --- | --- | --- | --- |"]
    for r in (one, two):
        lines.append(f"| {r['gpus']} GPU(s) | {r['records']} | {r['output_tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    lines.append(f"scaling (wall time, including each process's start and model load): "
                 f"{one['wall_s'] / two['wall_s']:.2f}x; outputs identical to the 1-GPU run: {same}")
    text = "\n".join(lines)
    print(text)
    (root / "gpus_scaling.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
