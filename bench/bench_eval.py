"""Score N jd_requirements predictions against gold, streaming; report records/s and peak RSS.

Baseline in the same run: the naive way (load both files into dicts, then count with the same fact
extractor). Each measurement runs in its own subprocess so peak RSS is its own.

    python bench/bench_eval.py --n 1000000
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def make_files(tmp: Path, n: int) -> tuple[Path, Path]:
    from extractor import jsonutil
    from extractor.datasets.synth import generate
    rng = random.Random(0)
    gold_path, pred_path = tmp / "gold.jsonl", tmp / "pred.jsonl"
    with open(gold_path, "w", encoding="utf-8") as g, open(pred_path, "w", encoding="utf-8") as p:
        for _, gold in generate(n, seed=1, lang="mix"):
            g.write(jsonutil.dumps(gold) + "\n")
            pred = {k: (v[:-1] + ["noise"] if rng.random() < 0.1 else v) for k, v in gold["gold"].items()}
            p.write(jsonutil.dumps({"id": gold["id"], "prediction": pred, "status": "ok", "raw": "",
                                    "prompt_tokens": 100, "output_tokens": 60}) + "\n")
    return pred_path, gold_path


def streaming(pred: str, gold: str) -> dict:
    from extractor.scoring.evaluate import evaluate
    from extractor.tasks.task import load_task
    task = load_task("jd_requirements")
    start = time.perf_counter()
    result = evaluate(task, Path(pred), Path(gold)).result()
    return {"seconds": time.perf_counter() - start, "records": result["records"]["scored"],
            "micro_f1": result["micro"]["f1"]}


def naive(pred: str, gold: str) -> dict:
    from extractor.scoring.facts import FactExtractor
    from extractor.scoring.metrics import Counts, compare_sets
    from extractor.tasks.task import load_task
    fx = FactExtractor(load_task("jd_requirements"))
    start = time.perf_counter()
    golds = {r["id"]: r["gold"] for r in map(json.loads, open(gold, encoding="utf-8"))}
    preds = {r["id"]: r["prediction"] for r in map(json.loads, open(pred, encoding="utf-8"))}
    total = Counts()
    for rid, g in golds.items():
        for c in compare_sets(fx(preds.get(rid)), fx(g)).values():
            total.add(c)
    return {"seconds": time.perf_counter() - start, "records": len(golds), "micro_f1": total.f1}


def child(mode: str, pred: str, gold: str) -> None:
    result = {"streaming": streaming, "naive": naive}[mode](pred, gold)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(mode: str, pred: Path, gold: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(pred), str(gold)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pred, gold = make_files(Path(tmp), args.n)
        ours, base = measure("streaming", pred, gold), measure("naive", pred, gold)
    rate = lambda r: r["records"] / r["seconds"]  # noqa: E731
    assert abs(ours["micro_f1"] - base["micro_f1"]) < 1e-12, (ours, base)
    print(f"date {date.today()}, python {sys.version.split()[0]}, n = {args.n}")
    print("| path | records/s | peak RSS (MB) | micro F1 |\n| --- | --- | --- | --- |")
    print(f"| extractor eval (streaming join) | {rate(ours):,.0f} | {ours['peak_rss_mb']:.0f} | {ours['micro_f1']:.4f} |")
    print(f"| naive: load both into dicts | {rate(base):,.0f} | {base['peak_rss_mb']:.0f} | {base['micro_f1']:.4f} |")
    print(f"ratio: {rate(ours) / rate(base):.2f}x the naive throughput, "
          f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x its peak memory")


if __name__ == "__main__":
    main()
