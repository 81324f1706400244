"""Stream a generated corpus through read -> render prompts; report records/s and peak RSS.

Baseline in the same run: the naive way (read the whole file into memory with json, then render each
record with str.format). Each measurement runs in its own subprocess so peak RSS is its own.

    python bench/bench_read_render.py --n 1000000
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


def streaming(path: str) -> dict:
    from extractor.store.corpus import CorpusReader
    from extractor.tasks.prompting import PromptBuilder
    from extractor.tasks.task import load_task
    builder = PromptBuilder(load_task("jd_requirements"))
    start = time.perf_counter()
    n = chars = 0
    for batch in CorpusReader(path):
        for rec in batch:
            chars += len(builder.build(rec["values"]))
            n += 1
    return {"records": n, "seconds": time.perf_counter() - start, "chars": chars}


def naive(path: str) -> dict:
    template = "Instruction: 你现在是一个很厉害的阅读理解器。\nInput: 请从下面的JD中提取……\n\n{text}\nAnswer: "
    start = time.perf_counter()
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    prompts = [template.format(text=r["text"]) for r in rows]
    return {"records": len(prompts), "seconds": time.perf_counter() - start, "chars": sum(map(len, prompts))}


def child(mode: str, path: str) -> None:
    result = {"streaming": streaming, "naive": naive}[mode](path)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from extractor.datasets.synth import write_corpus
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        start = time.perf_counter()
        write_corpus(path, None, args.n, seed=0, lang="mix")
        gen_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        ours, base = measure("streaming", path), measure("naive", path)
    rate = lambda r: r["records"] / r["seconds"]  # noqa: E731
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"corpus: {args.n} records, {size_mb:.0f} MB JSONL, generated in {gen_s:.1f}s "
          f"({args.n / gen_s:,.0f} records/s)")
    print("| path | records/s | peak RSS (MB) |\n| --- | --- | --- |")
    print(f"| extractor read -> render (streaming) | {rate(ours):,.0f} | {ours['peak_rss_mb']:.0f} |")
    print(f"| naive json.loads all + str.format | {rate(base):,.0f} | {base['peak_rss_mb']:.0f} |")
    print(f"ratio: {rate(ours) / rate(base):.2f}x the naive throughput, "
          f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x its peak memory")


if __name__ == "__main__":
    main()
