"""What does `--fast on` give `extractor run` over plain batched `generate`, the whole command timed?

`extractor run` as subprocesses with `--fast off` and `--fast on`: the whole run path (rendering, generation,
parsing, validation, writing), same corpus, same model. Model: random weights in the Qwen2.5-0.5B shape with
a locally trained 2k-token vocabulary; corpus: synthetic postings with the jd_requirements prompt (chat
template + one-shot example: a shared prefix of about 150 tokens); greedy, --max-new-tokens 64, bf16.
Also: whether both give the same ids in order, and how many raw outputs are equal.

Writes OUT/gpu_fast_on_off.md (bench/gpu_run_path.py wrote the same table to gpu_run_path.md).

    python bench/gpu/fast_on_off.py --out $OUT --n 4096
    python bench/gpu/fast_on_off.py --out /tmp/fo --smoke      # CPU: a tiny model, checks the script only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common as c


def run(corpus: Path, model: Path, out: Path, fast: str, batch: int, window: int, smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model", str(model),
           "--out", str(out), "--max-new-tokens", "64", "--batch-size", str(batch), "--batch-tokens", "10000000",
           "--window", str(window), "--quiet", "--overwrite", "--fast", fast]
    cmd += ["--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "8"] if smoke else []
    r = c.wall_clock(cmd, None, out.with_suffix(".log"))
    if r["rc"]:
        raise SystemExit(f"extractor run --fast {fast} failed: {r['stderr_tail']}")
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())["summary"]
    return {"fast": fast, "wall_s": r["wall_s"], "run_s": manifest["elapsed_s"],
            "output_tokens_per_s": manifest["output_tokens_per_s"], "records_per_s": manifest["records_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script, not speed")
    args = parser.parse_args()
    if args.smoke:
        c.use_smoke()
        args.n = min(args.n, 16)
    from extractor.datasets.synth import write_corpus
    from extractor.datasets.tiny_models import build_tiny_model, tokenizer_corpus
    work = Path(args.out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    shape = (dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128) if args.smoke else
             dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864))
    model = build_tiny_model(work / "model", vocab_size=2048, init_std=0.02, texts=tokenizer_corpus(3000), **shape)
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, None, args.n, seed=5)
    plain = run(corpus, model, work / "plain.jsonl", "off", 128, 1024, args.smoke)
    fast = run(corpus, model, work / "fast.jsonl", "on", 128, args.n, args.smoke)
    a = [json.loads(x) for x in (work / "plain.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (work / "fast.jsonl").read_text().splitlines()]
    prov = c.provenance()
    lines = [f"card: {prov['card']}, torch {prov['torch']}, n = {args.n}, {prov['date']}, commit {prov['git_commit']}",
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
    (Path(args.out) / "gpu_fast_on_off.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
