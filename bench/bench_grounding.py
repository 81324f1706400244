"""Ground N synthetic jd_requirements predictions in their postings; report records/s (target: 20,000 on 2 cores).

The predictions are the generator's gold, roughly as a model writes them: most values copied verbatim; some
in another case or width, or with a space or separator changed (normalized matches); some with a typo in a
long value (fuzzy); some written from nowhere or copied from the few-shot example (ungrounded: the slow path,
which tries exact, normalized and fuzzy in turn). Texts and predictions are built before the clock starts;
the timed loop is `Grounder.ground` per record (what `run`, `validate --corpus` and `eval` call), one
thread; records per CPU second is printed beside the wall-clock rate, which other work on the cores lowers.

    python bench/bench_grounding.py --n 100000 [--json bench/results/grounding.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter


def variant(value: str, rng: random.Random) -> str:
    """A value as a model may write it."""
    r = rng.random()
    if r < 0.80:
        return value
    if r < 0.87:
        return value.upper() if value.isascii() else value.replace("+", "＋").replace("1", "１")
    if r < 0.92 and len(value) >= 6:
        i = rng.randrange(1, len(value) - 1)
        return value[:i] + value[i + 1:]  # one character dropped: fuzzy
    if r < 0.96:
        return rng.choice(["自然语言处理获奖经历", "硕士", "3年以上"])  # the few-shot example's values
    return rng.choice(["区块链经验", "Fortran", "blockchain experience", "博士后"])  # from nowhere


def make(n: int) -> list[tuple[str, dict]]:
    from extractor.datasets.synth import generate
    rng = random.Random(0)
    return [(rec["text"], {k: [variant(v, rng) for v in vs] for k, vs in gold["gold"].items()})
            for rec, gold in generate(n, seed=3, lang="mix")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from extractor.scoring.grounding import Grounder
    from extractor.tasks.task import load_task
    grounder = Grounder(load_task("jd_requirements"))
    records = make(args.n)
    chars = sum(len(t) for t, _ in records)
    start, cpu = time.perf_counter(), time.process_time()
    kinds: Counter = Counter()
    for text, pred in records:
        for entries in grounder.ground(text, pred).values():
            for e in entries:
                kinds[e["match"] or ("copied_from_prompt" if e.get("copied_from_prompt") else "none")] += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {"records": args.n, "seconds": round(seconds, 3), "records_per_s": round(args.n / seconds),
           "cpu_seconds": round(cpu, 3), "records_per_cpu_s": round(args.n / cpu),
           "mean_text_chars": round(chars / args.n, 1), "values": sum(kinds.values()), "matches": dict(kinds),
           "cpus": os.cpu_count()}
    print(json.dumps(out, ensure_ascii=False))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
