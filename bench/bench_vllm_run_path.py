"""`extractor run --backend vllm` against raw `LLM.generate` on the same work (the goal: within 10%).

One engine, one process. The same records, rendered and encoded exactly as the run path does it, go to
`LLM.generate` as token-id prompts in one call (vLLM's own best case: every request queued at once); then
`extractor run`'s path (Predictor + Run: reading, rendering, tokenizing per window, the backend's stream,
parsing, validating, writing with fsync) over the same corpus. vLLM's prefix cache is reset before each
timed pass, so neither is served from the other's cache; each pass follows an untimed warm-up on a few
records. Prints and writes output tok/s of both and their ratio.

    python bench/bench_vllm_run_path.py --model ./model --n 1024 --max-new-tokens 128 [--constrained] \
        [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--constrained", action="store_true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from extractor.backends.base import GenParams
    from extractor.backends.vllm_backend import VLLMBackend
    from extractor.benchmark import time_run
    from extractor.store.corpus import CorpusReader
    from extractor.pipeline import Predictor
    from extractor.datasets.synth import write_corpus
    from extractor.tasks.task import load_task

    task = load_task("jd_requirements")
    backend = VLLMBackend(args.model, dtype=args.dtype)
    params = GenParams(max_new_tokens=args.max_new_tokens, constrained=args.constrained)
    predictor = Predictor(task, backend, params)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "postings.jsonl"
        write_corpus(corpus, None, args.n, seed=0, lang="mix")
        records = [r for window in CorpusReader(corpus, task.spec.input_fields) for r in window]
        prompts = [predictor.builder.build(r["values"]) for r in records]
        token_prompts = [{"prompt_token_ids": ids} for ids in backend.encoder().encode_batch(prompts)]
        sampling = backend._sampling(params, task.schema)

        def raw(prompts_):
            outs = backend.llm.generate(prompts_, sampling, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

        raw(token_prompts[:8])
        backend.llm.reset_prefix_cache()
        start = time.perf_counter()
        raw_tokens = raw(token_prompts)
        raw_s = time.perf_counter() - start

        time_run(predictor, corpus, work / "warm.jsonl", limit=8, window=args.window)
        backend.llm.reset_prefix_cache()
        run = time_run(predictor, corpus, work / "run.jsonl", window=args.window)

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.node()})"
    import vllm
    result = {"date": time.strftime("%Y-%m-%d"), "device": device, "vllm": vllm.__version__, "model": args.model,
              "records": args.n, "max_new_tokens": args.max_new_tokens, "constrained": args.constrained,
              "window": args.window,
              "raw_llm_generate": {"tok_s": raw_tokens / raw_s, "seconds": raw_s, "tokens": raw_tokens},
              "run_path": {k: run[k] for k in ("tok_s", "records_s", "seconds", "tokens", "statuses")},
              "max_in_flight": backend.stats.get("max_in_flight")}
    result["run_over_raw"] = result["run_path"]["tok_s"] / result["raw_llm_generate"]["tok_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
