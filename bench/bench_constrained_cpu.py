"""CPU cost of constrained decoding per token (the part of `--constrained` that the GPU cannot hide).

No model: a seeded stand-in picks each row's next token from what the grammar allows (a fixed random
preference per row, rotated every step), like a random-weight model does. Rows run in lockstep for the
budget, as FastDecoder's packed rows do. Measured, same process: BatchConstraint with its grammar work in
this process (the GPU machine runs the same engine in worker processes)
(free-string and half-character rows skip the grammar, closing costs cached and computed at the string level)
against the same class with those shortcuts off (every row accepts and fills through xgrammar each step).
Every output is then checked against the schema. Step ms: the grammar engine's time per step (median and
the slowest: on the GPU a step's masks must be ready when its forward pass ends, so one slow step stalls it).

    .venv/bin/python bench/bench_constrained_cpu.py --rows 256
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

VOCAB = 151936  # the Qwen2.5 head: a small real tokenizer padded to it, as in bench/gpu/common.py
APPLY = {"s": 0.0}  # time in apply_token_bitmask_inplace: one kernel on the GPU, a slow loop on CPU; left out


def _time_apply(xgr) -> None:
    original = xgr.apply_token_bitmask_inplace

    def timed(*args, **kwargs):
        t = time.perf_counter()
        original(*args, **kwargs)
        APPLY["s"] += time.perf_counter() - t
    xgr.apply_token_bitmask_inplace = timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--task", default="jd_requirements")
    args = parser.parse_args()
    from extractor.constrain.grammar import Grammar
    from extractor.results.judge import Validator, judge
    from extractor.tasks.task import load_task
    from extractor.datasets.tiny_models import tokenizer_corpus, train_tokenizer
    from tests.helpers import stand_in_decode
    tokenizer = train_tokenizer(tokenizer_corpus(3000), vocab_size=4096)
    task = load_task(args.task)
    validator = Validator(task.schema)
    import xgrammar
    _time_apply(xgrammar)
    results = {}
    for name in ("fast path", "shortcuts off"):
        APPLY["s"] = 0.0
        grammar = Grammar(task.schema, tokenizer, VOCAB, [tokenizer.eos_token_id])
        if name == "shortcuts off":
            grammar.free_strings = grammar.mid_free = grammar.skeleton_exact = False
            grammar._closing_cost_text = lambda *a: None
        real = int(np.flatnonzero(np.array([bool(t) for t in grammar.token_texts]))[-1]) + 1
        run = stand_in_decode(grammar, args.rows, args.budget, seed=0, width=VOCAB, choose_from=real)
        cpu, tokens = run["seconds"] - APPLY["s"], run["decoded"]
        valid = sum(judge(text, why, validator).status == "ok" for text, why in zip(run["texts"], run["reasons"]))
        steps = np.array(run["step_cpu_s"]) * 1e3
        results[name] = {"cpu_s": cpu, "tokens": tokens, "us_per_token": cpu / tokens * 1e6, "valid": valid,
                         "step_ms_median": float(np.median(steps)), "step_ms_max": float(steps.max()),
                         "stats": run["stats"]}
    fast, slow = results["fast path"], results["shortcuts off"]
    lines = [f"date {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{args.rows} rows x {args.budget} tokens, task {args.task}",
             "| constraint work | CPU s | tokens | µs per token | step ms, median / max | outputs schema-valid |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cpu_s']:.2f} | {r['tokens']:,} | {r['us_per_token']:.1f} | "
                     f"{r['step_ms_median']:.1f} / {r['step_ms_max']:.1f} | {r['valid']} of {args.rows} |")
    lines.append(f"ratio: {slow['us_per_token'] / fast['us_per_token']:.1f}x less CPU per token")
    print("\n".join(lines))
    print(json.dumps({k: v["stats"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
