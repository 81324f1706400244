"""How fast is `extractor run`'s code path, and what do --constrained and several adapters cost it, on one card?

`extractor run`'s path in this process (Predictor + Run as the command builds them: rendering, tokenizing,
generating, parsing, validating, writing) around a model already in memory, on the anchor as text
(common.py), one-time costs (grammar, decoder, compile, graphs) in a first small run reported on their own:
  run           unconstrained;
  constrained   --constrained (the jd_requirements schema); beside it the same grammar on FastDecoder directly
                (token prompts, no reader or writer threads) per grammar worker count (--grammar-workers),
                the unconstrained FastDecoder, and the unconstrained FastDecoder with each record stopped at
                its constrained output's length (the same tokens computed: the gap is what the masks cost);
                --switch-interval: the constrained run again with that GIL switch interval while decoding;
                with `profile` in --parts, a smaller constrained run under cProfile (constrained_profile.txt);
  run_legacy    the run path with the decoder of --legacy (a same-call baseline);
  adapters_run  four rank-16 LoRA adapters loaded from disk as `--adapter` repeated runs them: a quarter of
                the records each, then every adapter over all of them, beside the base weights.

Writes OUT/gpu_run_path.json (the row keys bench/gpu_fast.py wrote to gpu_fast.json) and OUT/gpu_run_path.md.

    python bench/gpu/run_path.py --out $OUT --parts run,constrained
    python bench/gpu/run_path.py --out /tmp/rp --smoke --n 8 --parts run     # CPU, seconds
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import time
from pathlib import Path

import common as c


def run_backend(model, work: Path):
    """The hf backend `extractor run` builds, around the model already in memory (fast path on)."""
    from extractor.backends.hf import HFBackend
    return HFBackend.from_loaded(model, c.tokenizer(work), work / "model", fast="on", compile=c.DEVICE == "cuda")


def run_path(backend, work: Path, n: int, constrained: bool, window: int = 256, profile_cpu: bool = False) -> dict:
    """Predictor + Run, as `extractor run` builds them, over the anchor's text corpus."""
    from extractor.backends.base import GenParams
    from extractor.benchmark import time_run
    from extractor.pipeline import Predictor
    from extractor.tasks.task import load_task
    corpus = c.corpus(work, backend.tokenizer, n)
    params = GenParams(max_new_tokens=c.NEW, constrained=constrained)
    predictor = Predictor(load_task("jd_requirements"), backend, params, max_input_tokens=4096)
    out = work / f"run_{'constrained' if constrained else 'plain'}_{n}.jsonl"
    prof = cProfile.Profile() if profile_cpu else None
    r = time_run(predictor, corpus, out, window=window, profiler=prof)
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(16)
        (work.parent / "constrained_profile.txt").write_text(buf.getvalue())
    dec = backend._fast_decoder
    constraint = getattr(backend, "last_constraint", None) if constrained else None
    return {**r, "constraint": dict(constraint.stats) if constraint is not None else None,
            "prefix_tokens": len(dec.prefix), "slots": dec.slots, "compiled": dec.compiled, "window": window}


CONSTRAINED_KEYS = {"auto": "fast_constrained", "0": "fast_constrained_no_workers"}


def constrained(res, model, backend, work: Path, args, profiled: bool) -> None:
    """The constrained run path and the same grammar on FastDecoder directly."""
    from extractor.tasks.task import load_task
    res["run_path_constrained"] = run_path(backend, work, args.n, constrained=True)
    if args.switch_interval is not None:  # the same run with another GIL switch interval (0: Python's)
        import extractor.backends.hf_fast as hf_module
        default = hf_module.CONSTRAINED_SWITCH_INTERVAL
        hf_module.CONSTRAINED_SWITCH_INTERVAL = args.switch_interval
        res["run_path_constrained_switch"] = run_path(backend, work, args.n, constrained=True)
        res["run_path_constrained_switch"]["switch_interval_s"] = args.switch_interval
        hf_module.CONSTRAINED_SWITCH_INTERVAL = default
    if profiled:  # where the host time goes, on a smaller run of its own (cProfile slows it)
        res["run_path_constrained_profiled"] = run_path(backend, work, 256, constrained=True, profile_cpu=True)
    prefix, suffixes, _ = c.workload(args.n)
    _, res["fast"] = c.fast_run(model, prefix, suffixes, c.NEW)  # the unconstrained decoder, same call
    grammar = backend.grammar(load_task("jd_requirements").schema)
    first = None
    for count in args.grammar_workers.split(","):  # every worker count must give the same tokens
        got, r = c.fast_run(model, prefix, suffixes, c.NEW, grammar=grammar,
                            workers=count if count == "auto" else int(count))
        r["stopped"] = sum(reason == "stop" for _, reason in got)
        first = first or got
        r["same_tokens_as_first"] = sum(a == b for a, b in zip(got, first))
        res[CONSTRAINED_KEYS.get(count, f"fast_constrained_w{count}")] = r
    _, res["fast_same_lengths"] = c.fast_run(model, prefix, suffixes, [len(t) for t, _ in first])


def run_legacy(res, model, work: Path, args) -> None:
    """The run path with another version's decoder swapped in (its constructor knows neither virtual
    prefixes nor compile)."""
    import sys

    import extractor.backends.hf  # noqa: F401 - the modules that may hold the class by name, loaded
    from extractor.backends.fast import FastDecoder
    legacy = c.legacy_decoder(args.legacy)
    swapped = [(m, FastDecoder) for name, m in list(sys.modules.items())
               if name.startswith("extractor.backends") and getattr(m, "FastDecoder", None) is FastDecoder]
    for module, _ in swapped:
        module.FastDecoder = lambda *a, virtual=None, compile=False, **kw: legacy(*a, **kw)
    try:
        backend = run_backend(model, work)
        _, res["run_path_legacy_warmup_s"] = c.timed(lambda: run_path(backend, work, 64, constrained=False))
        res["run_path_legacy"] = run_path(backend, work, args.n, constrained=False)
    finally:
        for module, current in swapped:
            module.FastDecoder = current


def _loras(model, work: Path) -> list[str]:
    """Four rank-16 LoRA adapters of `model`, saved as peft saves them."""
    from peft import get_peft_model
    dirs = []
    for i in range(4):
        wrapped = get_peft_model(model, c.lora_config(i + 1), autocast_adapter_dtype=False)
        wrapped.save_pretrained(work / f"lora{i}")
        wrapped.unload()
        dirs.append(str(work / f"lora{i}"))
    return dirs


def _each_adapter(backend, predictor, corpora: list[Path], work: Path, suffix: str):
    """Each adapter over its corpus in turn, as `--adapter` repeated switches: tokens, per-adapter rows."""
    from extractor.benchmark import time_run
    tokens, rows = 0, []
    for name, corpus in zip(backend.adapters(), corpora):
        backend.use_adapter(name)
        predictor.adapter_key = name
        r = time_run(predictor, corpus, work / f"{name}{suffix}.jsonl")
        tokens += r["tokens"]
        rows.append({k: r[k] for k in ("seconds", "tokens", "records")})
    return tokens, rows


def adapters_run(res, model, work: Path, n: int) -> None:
    """`extractor run`'s path with four rank-16 LoRA adapters loaded from disk: each adapter's quarter of the
    records, timed end to end with every switch; every adapter over all the records; beside the base weights
    over all the records, same backend."""
    from extractor.backends.base import GenParams
    from extractor.backends.hf import HFBackend
    from extractor.benchmark import time_run
    from extractor.pipeline import Predictor
    from extractor.tasks.task import load_task
    tok = c.tokenizer(work)
    full = work / "model_full"
    model.save_pretrained(full)
    tok.save_pretrained(full)
    backend = HFBackend(str(full), adapters=_loras(model, work), dtype="bf16", device=c.DEVICE, fast="on",
                        compile=c.DEVICE == "cuda")
    corpus = c.corpus(work, backend.tokenizer, n)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    quarters = []
    for i in range(4):
        quarters.append(work / f"quarter{i}.jsonl")
        quarters[-1].write_text("".join(lines[i::4]), encoding="utf-8")
    predictor = Predictor(load_task("jd_requirements"), backend, GenParams(max_new_tokens=c.NEW),
                          max_input_tokens=4096)
    _, res["adapters_run_warmup_s"] = c.timed(lambda: time_run(predictor, corpus, work / "warm.jsonl", limit=64))
    res["adapters_run_base"] = time_run(predictor, corpus, work / "base.jsonl")
    start = time.perf_counter()
    tokens, rows = _each_adapter(backend, predictor, quarters, work, "")
    res["adapters_run_x4"] = {**c.row(tokens, n, time.perf_counter() - start), "per_adapter": rows,
                              "merged_layers": len(backend.weights.merged or ())}
    start = time.perf_counter()
    tokens, rows = _each_adapter(backend, predictor, [corpus] * 4, work, ".all")
    res["adapters_run_x4_all"] = {**c.row(tokens, 4 * n, time.perf_counter() - start), "per_adapter": rows}
    base = res["adapters_run_base"]["tok_s"]
    res["adapters_run_ratios"] = {"x4_spread": res["adapters_run_x4"]["tok_s"] / base,
                                  "x4_all_records": res["adapters_run_x4_all"]["tok_s"] / base}
    backend.use_adapter(None)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--parts", default="run")
    parser.add_argument("--grammar-workers", default="auto,0",
                        help="constrained FastDecoder rows: grammar worker counts (auto: the default)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="also time the constrained run path with this GIL switch interval while decoding "
                             "(seconds; 0: Python's own 5 ms; the default is hf_fast.CONSTRAINED_SWITCH_INTERVAL)")
    parser.add_argument("--legacy", default=None, help="the decoder file of an earlier version: run_legacy's")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, not speed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        c.use_smoke()
    parts = set(args.parts.split(","))
    res = c.Results(Path(args.out), "gpu_run_path", n=args.n)
    model, _ = c.build("1.5b")
    work = Path(args.out) / "work"
    if "run" in parts or "constrained" in parts:
        backend = run_backend(model, work)
        _, res["run_path_warmup_s"] = c.timed(lambda: run_path(backend, work, 64,
                                                               constrained="constrained" in parts))
        if "run" in parts:
            res["run_path"] = run_path(backend, work, args.n, constrained=False)
        if "constrained" in parts:
            constrained(res, model, backend, work, args, profiled="profile" in parts)
        del backend
        gc.collect()  # the decoder (its KV cache) sits in reference cycles: free it before the next backend
        c.empty_cache()
    if "run_legacy" in parts and args.legacy:
        run_legacy(res, model, work, args)
    if "adapters_run" in parts:
        adapters_run(res, model, work, args.n)
    res.write_table(c.table(res.data))


if __name__ == "__main__":
    main()
