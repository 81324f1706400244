"""`extractor run` on one GPU with and without `--fast on`: the whole run path (rendering, generation,
parsing, validation, writing), same corpus, same model, same process pool settings.

Model: random weights in the Qwen2.5-0.5B shape with a locally trained 2k-token vocabulary; corpus:
synthetic postings with the jd_requirements prompt (chat template + one-shot example: a shared prefix of
about 150 tokens); greedy, --max-new-tokens 64, bf16.

    python bench/gpu_run_path.py --out $OUT --n 4096
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(corpus: Path, model: Path, out: Path, fast: str, batch: int, window: int) -> dict:
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model", str(model),
           "--out", str(out), "--max-new-tokens", "64", "--batch-size", str(batch), "--batch-tokens", "10000000",
           "--window", str(window), "--quiet", "--overwrite", "--fast", fast]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())["summary"]
    return {"fast": fast, "wall_s": wall, "run_s": manifest["elapsed_s"],
            "output_tokens_per_s": manifest["output_tokens_per_s"], "records_per_s": manifest["records_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    import torch
    from extractor.synth import write_corpus
    from extractor.tiny_models import build_tiny_model, tokenizer_corpus
    work = Path(args.out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(work / "model", vocab_size=2048, hidden=896, layers=24, heads=14, kv_heads=2,
                             intermediate=4864, init_std=0.02, texts=tokenizer_corpus(3000))
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, None, args.n, seed=5)
    plain = run(corpus, model, work / "plain.jsonl", "off", 128, 1024)
    fast = run(corpus, model, work / "fast.jsonl", "on", 128, args.n)
    a = [json.loads(x) for x in (work / "plain.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (work / "fast.jsonl").read_text().splitlines()]
    lines = [f"card: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, n = {args.n}",
             "| path | run s (manifest) | output tokens/s | records/s |", "| --- | --- | --- | --- |"]
    for r in (plain, fast):
        lines.append(f"| extractor run --fast {r['fast']} | {r['run_s']:.1f} | {r['output_tokens_per_s']:,.0f} | "
                     f"{r['records_per_s']:,.1f} |")
    lines.append(f"ratio: {fast['output_tokens_per_s'] / plain['output_tokens_per_s']:.2f}x; same ids in order: "
                 f"{[r['id'] for r in a] == [r['id'] for r in b]}; equal raw outputs: "
                 f"{sum(x['raw'] == y['raw'] for x, y in zip(a, b))} of {len(a)}; first 32 chars equal: "
                 f"{sum(x['raw'][:32] == y['raw'][:32] for x, y in zip(a, b))}")
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "gpu_run_path.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
