"""CPU cost of constrained decoding per token (the part of `--constrained` that the GPU cannot hide).

No model: a seeded stand-in picks each row's next token from what the grammar allows (a fixed random
preference per row, rotated every step), like a random-weight model does. Rows run in lockstep for the
budget, as FastDecoder's packed rows do. Measured, same process: BatchConstraint as the fast path uses it
(free-string and half-character rows skip the grammar, closing costs cached and computed at the string level)
against the same class with those shortcuts off (every row accepts and fills through xgrammar each step).
Every output is then checked against the schema.

    .venv/bin/python bench/bench_constrained_cpu.py --rows 256
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

VOCAB = 151936  # the Qwen2.5 head: a small real tokenizer padded to it, as in bench/gpu_fast.py
APPLY = {"s": 0.0}  # time in apply_token_bitmask_inplace: one kernel on the GPU, a slow loop on CPU; left out


def _time_apply(xgr) -> None:
    original = xgr.apply_token_bitmask_inplace

    def timed(*args, **kwargs):
        t = time.perf_counter()
        original(*args, **kwargs)
        APPLY["s"] += time.perf_counter() - t
    xgr.apply_token_bitmask_inplace = timed


def simulate(grammar, rows: int, budget: int, seed: int) -> tuple[float, int, list[str], dict]:
    from extractor.constrain import BatchConstraint
    constraint = BatchConstraint(grammar)
    real = int(np.flatnonzero(np.array([bool(t) for t in grammar.token_texts]))[-1]) + 1
    rng = np.random.default_rng(seed)
    pref = rng.random((rows, real)).astype(np.float32)
    keys = list(range(rows))
    constraint.start(keys, [budget] * rows)
    texts = {k: [] for k in keys}
    finished = {}

    def choose(alive, logits):
        out = []
        for i, k in enumerate(alive):
            allowed = logits[i, :real] > -1  # masked logits: allowed tokens kept their 0
            choice = int(np.argmax(np.where(allowed, pref[k], -2)))
            pref[k] = np.roll(pref[k], 7)
            out.append(choice)
        return out

    cpu = 0.0
    logits = torch.zeros(rows, VOCAB)
    t = time.perf_counter()
    constraint.mask_first(keys, logits, keys)
    cpu += time.perf_counter() - t
    last = choose(keys, logits.numpy())
    alive = keys
    tokens = 0
    for _ in range(budget):
        keep = []
        for k, tok in zip(alive, last):
            tokens += 1
            if tok in grammar.stop_token_ids:
                finished[k] = "stop"
                constraint.release(k)
                continue
            texts[k].append(tok)
            if len(texts[k]) >= budget:
                finished[k] = "length"
                constraint.release(k)
                continue
            keep.append((k, tok))
        if not keep:
            break
        alive, last = [k for k, _ in keep], [tok for _, tok in keep]
        logits = torch.zeros(len(alive), VOCAB)
        t = time.perf_counter()
        constraint.hook(alive, last, alive)(logits)
        cpu += time.perf_counter() - t
        last = choose(alive, logits.numpy())
    outputs = [(b"".join(grammar.token_bytes[i] for i in texts[k]).decode("utf-8", "replace"),
                finished.get(k, "length")) for k in keys]
    return cpu - APPLY["s"], tokens, outputs, dict(constraint.stats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--task", default="jd_requirements")
    args = parser.parse_args()
    from extractor.constrain import Grammar
    from extractor.outputs import Validator, judge
    from extractor.tasks import load_task
    from extractor.testing import tokenizer_corpus, train_tokenizer
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
        cpu, tokens, outputs, stats = simulate(grammar, args.rows, args.budget, seed=0)
        valid = sum(judge(text, reason, validator).status == "ok" for text, reason in outputs)
        results[name] = {"cpu_s": cpu, "tokens": tokens, "us_per_token": cpu / tokens * 1e6, "valid": valid,
                         "stats": stats}
    fast, slow = results["fast path"], results["shortcuts off"]
    lines = [f"date {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{args.rows} rows x {args.budget} tokens, task {args.task}",
             "| constraint work | CPU s | tokens | µs per token | outputs schema-valid |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cpu_s']:.2f} | {r['tokens']:,} | {r['us_per_token']:.1f} | "
                     f"{r['valid']} of {args.rows} |")
    lines.append(f"ratio: {slow['us_per_token'] / fast['us_per_token']:.1f}x less CPU per token")
    print("\n".join(lines))
    print(json.dumps({k: v["stats"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
