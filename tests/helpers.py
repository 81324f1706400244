"""Test helpers (tests/gpu and bench/bench_constrained_cpu.py use them too): constrained decoding without a
model, the greedy reference a decoder is held to, and a kill once a run's output grows."""
from __future__ import annotations

import random
import time

import numpy as np
import torch

from extractor.constrain.batch import BatchConstraint


def stand_in_decode(grammar, rows: int, budget: int, seed: int, width: int, choose_from: int | None = None,
                    workers: int = 0, prefer: list[int] = ()) -> dict:
    """Constrained decoding without a model, as FastDecoder's packed rows do it: each row takes its
    preferred allowed token (a seeded random preference over the first `choose_from` ids, rotated every
    step), like a random-weight model. `width` is the logits' width (the model's head); `workers`: grammar
    worker processes (BatchConstraint's). Returns each row's tokens and finish reason, the tokens decoded,
    the seconds spent in the constraint, its stats and the engine's seconds per step. `prefer`: token ids
    every row takes first wherever they are allowed (a model that loves digits, say)."""
    constraint = BatchConstraint(grammar, workers=workers)
    choose_from = choose_from or width
    pref = np.random.default_rng(seed).random((rows, choose_from)).astype(np.float32)
    boost = np.zeros(choose_from, np.float32)
    boost[[i for i in prefer if i < choose_from]] = 10.0
    keys = list(range(rows))
    constraint.start(keys, [budget] * rows)
    out: dict[int, list[int]] = {k: [] for k in keys}
    reasons: dict[int, str] = {}

    def choose(alive, logits) -> list[int]:
        picks = []
        for i, k in enumerate(alive):  # masked logits: allowed tokens kept their 0
            picks.append(int(np.argmax(np.where(logits[i, :choose_from] > -1, pref[k] + boost, -2))))
            pref[k] = np.roll(pref[k], 7)
        return picks

    logits = torch.zeros(rows, width)
    start = time.perf_counter()
    constraint.mask_first(keys, logits, keys)
    seconds = time.perf_counter() - start
    alive, last = keys, choose(keys, logits.numpy())
    decoded = 0
    step_cpu: list[float] = []  # the grammar engine's seconds in each step (a slow step stalls the GPU)
    while alive:
        keep = []
        for k, tok in zip(alive, last):
            decoded += 1
            if tok in grammar.stop_token_ids:
                reasons[k] = "stop"
            else:
                out[k].append(tok)
                if len(out[k]) < budget:
                    keep.append((k, tok))
                    continue
                reasons[k] = "length"
            constraint.release(k)
        if not keep:
            break
        alive, last = [k for k, _ in keep], [t for _, t in keep]
        logits = torch.zeros(len(alive), width)
        start, engine_before = time.perf_counter(), constraint.stats["cpu_s"]
        constraint.hook(alive, last, alive)(logits)
        seconds += time.perf_counter() - start
        step_cpu.append(constraint.stats["cpu_s"] - engine_before)
        last = choose(alive, logits.numpy())
    return {"tokens": [out[k] for k in keys], "reasons": [reasons[k] for k in keys], "decoded": decoded,
            "seconds": seconds, "stats": dict(constraint.stats), "step_cpu_s": step_cpu,
            "texts": [b"".join(grammar.token_bytes[t] for t in out[k]).decode("utf-8", "replace") for k in keys]}


def generate_reference(model, ids: list[int], max_new: int, eos_ids: list[int]) -> list[int]:
    """The reference a decoder is held to: `generate`'s greedy tokens for one prompt (batch 1), cut after
    the first EOS (kept), as FastDecoder returns them."""
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=list(eos_ids), pad_token_id=0)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in eos_ids), None)
    return out if stop is None else out[: stop + 1]


def assert_decoder_equals_generate(model, *, seed: int, prefix_len: int, records: int, suffix_len: tuple[int, int],
                                   budget: tuple[int, int], slots: int, unique_len: int, refill: int,
                                   eos_ids: list[int], capture: bool = False, label: str = "") -> None:
    """Random token ids — a shared prefix, `records` suffixes of `suffix_len` (lo, hi) tokens, a `budget` (lo,
    hi) of new tokens each — through FastDecoder (slots refilled `refill` at a time; CUDA graphs captured first
    where asked): every record's tokens equal `generate`'s for its whole prompt."""
    from extractor.backends.fast import FastDecoder
    rng = random.Random(seed)
    prefix = [rng.randrange(5, 1000) for _ in range(prefix_len)]
    suffixes = [[rng.randrange(5, 1000) for _ in range(rng.randint(*suffix_len))] for _ in range(records)]
    budgets = [rng.randint(*budget) for _ in suffixes]
    decoder = FastDecoder(model, prefix, slots=slots, unique_len=unique_len, eos_ids=eos_ids)
    if capture:
        decoder.capture()
    got = decoder.generate(suffixes, budgets, refill=refill)
    for i, (suffix, n, (tokens, _)) in enumerate(zip(suffixes, budgets, got)):
        assert tokens == generate_reference(model, prefix + suffix, n, eos_ids), f"{label} record {i} differs"


class HtmlTags:
    """An HTML page's start tags, their attributes and its text, as a browser's parser sees them."""

    def __init__(self, text: str):
        from html.parser import HTMLParser
        found = self
        self.tags, self.attrs, self.text = [], [], []

        class _Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                found.tags.append(tag)
                found.attrs += attrs

            def handle_data(self, data):
                found.text.append(data)
        _Parser().feed(text)


def kill_when_output_grows(cmd, out, rng, env, settle: float, warm=None) -> int:
    """Start `cmd`, SIGKILL it at a random moment (up to `settle` s) once `out` has grown; its return code.
    warm: a warm-start server (conftest's `warm`) to fork the `extractor` command from, in the server's
    environment (env unused)."""
    import os
    import signal
    import subprocess
    if warm is not None:
        proc = warm.popen(cmd)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    start_size = out.stat().st_size if out.exists() else 0
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > start_size:
            time.sleep(rng.uniform(0.0, settle))
            break
        time.sleep(0.02)
    if warm is not None:
        return proc.kill()
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode

