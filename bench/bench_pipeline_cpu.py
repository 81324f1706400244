"""The CPU side of `extractor run` with a backend that answers instantly (`echo`, returning gold).

Measures the whole pipeline — read, render prompts, backend call, parse, validate, write with fsync per
window — so the GPU is never starved. Baseline in the same run: a hand-rolled loop that reads lines, formats
a prompt, looks the answer up, `json.loads` it and writes a line (no checks, no validation, no fsync).

    python bench/bench_pipeline_cpu.py --n 200000
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path


def ours(corpus: Path, gold: Path, out: Path, window: int) -> float:
    from extractor.backends.base import GenParams
    from extractor.backends.echo import EchoBackend
    from extractor.pipeline import Lane, OnePass, RunOptions, run_key
    from extractor.tasks.task import load_task
    task = load_task("jd_requirements")
    backend = EchoBackend(str(gold))  # loading the answers is not timed: a model load is not either
    params = GenParams()
    opts = RunOptions(corpus=corpus, out=out, params=params, window=window, quiet=True)
    lane = Lane.build(task, backend, opts)
    run = OnePass(task, backend, [lane], opts, [out])
    start = time.perf_counter()
    dones = run.prepare([run_key(task, backend, lane, opts)])
    summary, = run.execute(dones)
    assert summary.statuses["ok"] == sum(1 for _ in open(corpus)), summary.statuses
    return time.perf_counter() - start


def baseline(corpus: Path, gold: Path, out: Path) -> float:
    answers = {}
    for line in open(gold, encoding="utf-8"):
        row = json.loads(line)
        answers[row["id"]] = json.dumps(row["gold"], ensure_ascii=False)
    template = "Instruction: 你现在是一个很厉害的阅读理解器。\nInput: 请从下面的JD中提取……\n\n{text}\nAnswer: "
    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            rec = json.loads(line)
            _prompt = template.format(text=rec["text"])
            raw = answers[rec["id"]]
            dst.write(json.dumps({"id": rec["id"], "prediction": json.loads(raw), "raw": raw}, ensure_ascii=False) + "\n")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    from extractor.datasets.synth import write_corpus
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, gold = tmp / "corpus.jsonl", tmp / "gold.jsonl"
        write_corpus(corpus, gold, args.n, seed=0)
        base = baseline(corpus, gold, tmp / "base.jsonl")
        mine = ours(corpus, gold, tmp / "preds.jsonl", args.window)
    print(f"date {date.today()}, n = {args.n}, window {args.window}")
    print("| path | records/s |\n| --- | --- |")
    print(f"| extractor run, echo backend (render, parse, validate, fsync per window) | {args.n / mine:,.0f} |")
    print(f"| hand-rolled loop (format, json.loads, write; no checks) | {args.n / base:,.0f} |")
    print(f"ratio: {base / mine:.2f}x the hand-rolled loop's throughput")


if __name__ == "__main__":
    main()
