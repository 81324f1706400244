"""Does `extractor run` through the fast path stream? Peak RSS of the same run at N and at 10x N.

The hf backend's fast path (FastDecoder: records from later windows enter freed slots, a bounded look-ahead
of tokenized records, a bounded buffer that puts finished rows back in input order) on CPU, with a tiny
random-weight model built here: the same scheduler and pipeline code as on the GPU, where the KV cache is
preallocated for a fixed number of slots. Each N runs as its own `extractor run` process, timed with
its own wrapper, so its peak RSS is its own. Flat memory means the larger run's peak is the
smaller one's plus at most a few bytes per record (the resume set and the duplicate-id check keep a small
digest per id).

    python bench/bench_fast_memory.py --n 2000,20000
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def run(corpus: Path, model: Path, out: Path, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model",
           str(model), "--out", str(out), "--fast", "on", "--device", "cpu", "--max-new-tokens", str(new_tokens),
           "--quiet", "--overwrite"]
    # A fresh wrapper process per run: its children's peak RSS is this run's alone.
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cmd)], check=True, capture_output=True,
                          text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    rows = sum(1 for _ in out.open(encoding="utf-8"))
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text(encoding="utf-8"))
    return {"records": rows, **measured, "statuses": manifest["summary"]["statuses"]}


def child(cmd: list[str]) -> None:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="2000,20000", help="corpus sizes")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    sizes = sorted(int(x) for x in args.n.split(","))
    from extractor.datasets.synth import write_corpus
    from extractor.datasets.tiny_models import build_tiny_model
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        full = root / "full.jsonl"
        write_corpus(full, None, sizes[-1], seed=3)
        lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
        for n in sizes:
            corpus = root / f"c{n}.jsonl"
            corpus.write_text("".join(lines[:n]), encoding="utf-8")
            r = run(corpus, model, root / f"out{n}.jsonl", args.new_tokens)
            assert r["records"] == n, r
            results.append({"n": n, **r})
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"hf --fast on --device cpu, tiny model, {args.new_tokens} new tokens")
    print("| records | seconds | records/s | peak RSS (MB) |\n| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['n']:,} | {r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} |")
    small, large = results[0], results[-1]
    extra = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 * 1024 / (large["n"] - small["n"])
    print(f"{large['n'] / small['n']:.0f}x the records: peak RSS x{large['peak_rss_mb'] / small['peak_rss_mb']:.3f} "
          f"({extra:,.0f} bytes per extra record)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
