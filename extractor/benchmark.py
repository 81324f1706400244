"""`extractor bench`: how fast the hf backend runs a task on this machine with this model, against plain
`generate` in the same process.

Both rows go through `extractor run`'s own code path (a lane filled by `OnePass`: rendering, tokenizing,
generating, parsing, validating, fsynced writing), on the same records: the fast path (`--fast on`: FastDecoder) and the
plain path (`--fast off`: `model.generate` in length-sorted static batches, what a hand-rolled loop does).
Each row runs once untimed on a few records first, so one-time costs (compiles, graph capture, the grammar)
are reported apart. Greedy outputs of the two rows are compared record by record.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from extractor.backends.base import GenParams
from extractor.pipeline import OnePass, Predictor, run_key

FORMAT = "extractor.bench/1"


def sync(backend) -> None:
    """Wait for the GPU, so that a timing covers the work and not only its launch."""
    if str(getattr(backend, "device", "cpu")).startswith("cuda"):
        backend.torch.cuda.synchronize()


def time_run(predictor: Predictor, corpus: Path, out: Path, limit: int | None = None, window: int = 256,
             profiler=None) -> dict:
    """One `extractor run` over `corpus` (its first `limit` records), timed from the first read to the last
    fsync; figures from the rows it wrote."""
    opts = replace(predictor.opts, corpus=corpus, out=out, window=window, quiet=True, overwrite=True, limit=limit)
    lane = predictor.lane()
    job = OnePass(predictor.task, predictor.backend, [lane], opts, [out])
    dones = job.prepare([run_key(predictor.task, predictor.backend, lane, opts)])
    sync(predictor.backend)
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    summary, = job.execute(dones)
    sync(predictor.backend)
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    n = max(len(rows), 1)
    return {"tok_s": summary.output_tokens / seconds, "records_s": summary.new / seconds, "seconds": seconds,
            "tokens": summary.output_tokens, "records": summary.new, "statuses": dict(sorted(statuses.items())),
            "mean_prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows) / n,
            "mean_output_tokens": sum(r["output_tokens"] or 0 for r in rows) / n}


def compare_paths(make_backend, task, corpus: Path, work: Path, n: int, baseline_n: int, max_new_tokens: int,
                  constrained: bool = False, warmup: int = 16) -> dict:
    """The fast path over `n` records and the plain path over the first `baseline_n`, each after an untimed
    warm-up run; their ratios, and how many of the first `baseline_n` raw outputs agree. make_backend(fast)
    builds the backend with `--fast` set to `fast` (a knob of its construction); each is dropped before the
    next is built."""
    import gc
    params = GenParams(max_new_tokens=max_new_tokens, constrained=constrained)
    result: dict = {}
    # Plain first: the fast path sizes its KV cache from the GPU memory free when it starts.
    for name, mode, count in (("plain", "off", baseline_n), ("fast", "on", n)):
        backend = make_backend(mode)
        predictor = Predictor(task, backend, params)
        start = time.perf_counter()
        time_run(predictor, corpus, work / f"{name}-warmup.jsonl", limit=min(warmup, count))
        warmup_s = time.perf_counter() - start
        result[name] = {**time_run(predictor, corpus, work / f"{name}.jsonl", limit=count), "warmup_s": warmup_s}
        result["device"] = getattr(backend, "device", None)
        result["dtype"] = str(getattr(backend, "dtype", "")).replace("torch.", "")
        del predictor, backend
        gc.collect()
    fast = _raw_by_id(work / "fast.jsonl")
    plain = _raw_by_id(work / "plain.jsonl")
    result["same_raw_output"] = sum(fast.get(k) == v for k, v in plain.items())
    result["compared"] = len(plain)
    result["ratio_tok_s"] = result["fast"]["tok_s"] / result["plain"]["tok_s"] if result["plain"]["tok_s"] else None
    result["ratio_records_s"] = result["fast"]["records_s"] / result["plain"]["records_s"]
    return result


def _raw_by_id(path: Path) -> dict:
    return {r["id"]: r["raw"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
