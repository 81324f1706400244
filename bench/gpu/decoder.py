"""How fast does FastDecoder decode the anchor workload, against transformers' own ways, on one card?

Rows, all in one process on one card (common.py describes the workload):
  baselines   sequential `generate` (batch 1) on a few records; static batched `generate` (batch 128,
              length-sorted), fixed and EOS variant (a logits processor forces EOS at L_i); transformers
              `generate_batch` (continuous batching) on a subset;
  fast, eos   FastDecoder, fixed and EOS variant (a budget of L_i: the same tokens computed as `generate`);
              beside `fast`, the bf16 agreement with static `generate` and the logit gaps where they part;
  compiled    the same with torch.compile around the model's forward;
  legacy      the decoder of another version of the file given by --legacy (a same-call baseline; the one
              before FastDecoder ran the model's own forward had its own Llama layer);
  adapters    one rank-16 LoRA (in the model's dtype, in float32, merged), four LoRA adapters through a decoder
              each, P-tuning and prefix tuning with 128 virtual tokens; lora_compiled: the LoRA row compiled;
  profile     kernel time of one decode step and one full prefill chunk (profile.txt);
  families    random-weight configs shaped like Gemma-2-2B, GLM-4-9B and Phi-3-mini: tok/s and fraction of
              each one's linear-layer floor (--families picks some; `eager` in --parts: not compiled);
  7b          the 7B config through FastDecoder, compiled, fixed and EOS variant;
  fp8         the 7B config in bf16 and with --quantize fp8's layers, compiled, fixed and EOS, alternating,
              --repeats times each; fp8_eager: the same, not compiled (what --compile auto runs at N = 1,024);
              fp8_profile: then the kernel tables of both (profile_7b_bf16.txt, profile_7b_fp8.txt).
Also the compute floor: 2 * params * all tokens at the bf16 matmul rate measured in the same call.
Greedy token equality with `generate` on the GPU is a test: `pytest tests/gpu`.

Writes OUT/gpu_decoder.json (the row keys bench/gpu_fast.py wrote to gpu_fast.json) and OUT/gpu_decoder.md.

    python bench/gpu/decoder.py --out $OUT                          # ~5 min on one H100
    python bench/gpu/decoder.py --out $OUT --parts baselines,fast,eos,compiled
    python bench/gpu/decoder.py --out /tmp/dec --smoke --n 8 --parts fast,eos   # CPU, seconds
vLLM's rows on the same token ids: bench/gpu/vllm_rows.py (run both in one device call).
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import common as c


# -- transformers' ways ---------------------------------------------------------------------------------
class ForceEOS:
    """A LogitsProcessor: row j emits EOS exactly as its stops[j]-th new token, never before."""

    def __init__(self, stops: list[int], prompt_width: int):
        self.stops = torch.tensor(stops, device=c.DEVICE)
        self.width = prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width  # tokens generated so far
        scores[:, c.EOS_ID] = torch.finfo(scores.dtype).min
        at = (self.stops - 1 == step).nonzero().flatten()
        if len(at):
            scores[at] = torch.finfo(scores.dtype).min
            scores[at, c.EOS_ID] = 0
        return scores


def static_generate(model, prompts, batch, stops=None):
    """Length-sorted static batches, left-padded; returns each record's new tokens (EOS included)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [None] * len(prompts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=c.DEVICE)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i], device=c.DEVICE)
            mask[j, width - len(prompts[i]):] = 1
        if stops is None:
            kw = dict(min_new_tokens=c.NEW, eos_token_id=None)
        else:
            kw = dict(eos_token_id=c.EOS_ID, logits_processor=[ForceEOS([stops[i] for i in idx], width)])
        o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=c.NEW, do_sample=False, pad_token_id=0,
                           **kw)
        for j, i in enumerate(idx):
            toks = o[j, width:].tolist()
            outs[i] = toks[: toks.index(c.EOS_ID) + 1] if stops is not None and c.EOS_ID in toks else toks
    return outs


def generate_batch(model, prompts):
    from transformers import GenerationConfig
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gc_ = GenerationConfig(max_new_tokens=c.NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:16], generation_config=gc_, continuous_batching_config=ContinuousBatchingConfig())
    outs, dt = c.timed(lambda: model.generate_batch(prompts, generation_config=gc_,
                                                    continuous_batching_config=ContinuousBatchingConfig()))
    return sum(len(o.generated_tokens) for o in outs.values()), dt


def baselines(res, model, prompts, stops, args) -> list:
    """The transformers rows; returns static `generate`'s outputs (the bf16 reference of `fast`)."""
    with torch.inference_mode():
        k = args.seq_records
        static_generate(model, prompts[:1], 1)
        seq_outs, dt = c.timed(lambda: static_generate(model, prompts[:k], 1))
        res["sequential"] = c.row(sum(map(len, seq_outs)), k, dt, records_measured=k)
        ref, dt = c.timed(lambda: static_generate(model, prompts, 128))
        res["static_bs128"] = c.row(sum(map(len, ref)), args.n, dt,
                                    hf_batch1_vs_batch128_bf16=agreement([(o, None) for o in seq_outs], ref[:k]))
        m = min(args.eos_static_records, args.n)
        outs, dt = c.timed(lambda: static_generate(model, prompts[:m], 128, stops[:m]))
        res["static_bs128_eos"] = c.row(sum(map(len, outs)), m, dt, records_measured=m,
                                        stops_honoured=sum(len(o) == s for o, s in zip(outs, stops)))
    m = min(args.gb_records, args.n)  # continuous batching runs its own thread: outside inference mode
    try:
        tokens, dt = generate_batch(model, prompts[:m])
        res["generate_batch"] = c.row(tokens, m, dt, records_measured=m)
    except Exception as exc:  # noqa: BLE001 - a transformers API change must not lose the rest
        res["generate_batch"] = None
        res["generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:400]
    return ref


# -- agreement in bf16 ----------------------------------------------------------------------------------
def _agreeing(t, r) -> int:
    k = 0
    while k < min(len(t), len(r)) and t[k] == r[k]:
        k += 1
    return k


def agreement(got, ref) -> dict:
    """bf16 greedy paths diverge at near-ties (different kernels round differently): count full equality
    and the length of the agreeing prefix."""
    prefix_len = sorted(_agreeing(t, r) for (t, _), r in zip(got, ref))
    return {"equal": sum(t == r for (t, _), r in zip(got, ref)), "of": len(ref),
            "median_agreeing_prefix": prefix_len[len(prefix_len) // 2]}


def tie_margins(model, prefix, suffixes, got, ref, limit: int = 64) -> dict:
    """Where FastDecoder and static `generate` part ways in bf16: the reference model's logit gap, at that
    position, between its own choice and FastDecoder's (batch 1, eager HF forward). Gaps of the order of
    bf16 rounding mean ties, not a wrong computation."""
    gaps = []
    with torch.inference_mode():
        for s, (t, _), r in list(zip(suffixes, got, ref))[:limit]:
            k = _agreeing(t, r)
            if k == min(len(t), len(r)):
                continue
            ids = torch.tensor([prefix + s + r[:k]], device=c.DEVICE)
            logits = model(ids).logits[0, -1].float()
            gaps.append(float(logits[r[k]] - logits[t[k]]))
    top = sorted(abs(g) for g in gaps)
    return {"diverging_records": len(gaps), "median_abs_gap": top[len(top) // 2] if top else None,
            "max_abs_gap": max(top) if top else None,
            "logit_scale_note": "bf16 has 8 bits of mantissa: logits of ~2-5 round in steps of ~0.016-0.03"}


# -- where the time goes ----------------------------------------------------------------------------------
def profile(model, prefix, suffixes, out: Path, compile: bool = False, name: str = "profile.txt") -> dict:
    """Kernel time of one decode step (1024 rows, eager) and one full prefill chunk (compiled with
    `compile`, as on CUDA by default), top kernels first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from extractor.backends.fast import FastDecoder
    unique = max(len(s) for s in suffixes) + c.NEW
    dec = FastDecoder(model, prefix, slots=min(1024, len(suffixes)), unique_len=unique, eos_ids=[],
                      compile=compile)
    middle = sorted(suffixes, key=len)[len(suffixes) // 2:]
    take = 1
    while take < len(middle) and len(middle[take]) * (take + 1) <= dec.prefill_tokens:
        take += 1
    chunk = middle[:take]  # a full chunk: as many rows of about the median length as prefill_tokens holds
    tables = {}
    rows = min(1024, len(suffixes))
    own = torch.tensor([len(s) + c.NEW // 2 for s in suffixes[:rows]], device=c.DEVICE)  # mid-generation lengths
    dec._slot[:rows] = torch.arange(rows, device=c.DEVICE)
    dec._pos[:rows] = len(prefix) + own
    activity = ProfilerActivity.CUDA if c.DEVICE == "cuda" else ProfilerActivity.CPU
    with torch.inference_mode():
        dec._prefill(list(range(len(chunk))), chunk)
        dec._step(rows)
        c.sync()
        for name, fn in ((f"prefill_chunk_{len(chunk)}x{len(chunk[-1])}",
                          lambda: dec._prefill(list(range(len(chunk))), chunk)),
                         ("decode_step_1024_mid_generation", lambda: dec._step(rows))):
            with torch_profile(activities=[activity]) as prof:
                fn()
                c.sync()
            tables[name] = prof.key_averages().table(sort_by=f"{c.DEVICE}_time_total", row_limit=14,
                                                     max_name_column_width=60)
    text = "\n\n".join(f"== {k}\n{v}" for k, v in tables.items())
    (out / name).write_text(text)
    print(text, flush=True)
    del dec
    c.empty_cache()
    return {"written": name}


# -- other families --------------------------------------------------------------------------------------
FAMILY_SHAPES = {  # random weights, shapes of the public checkpoints' configs
    "gemma2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                                 sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "glm4-9b": ("glm4", dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                             num_attention_heads=32, num_key_value_heads=2, head_dim=128, attention_bias=True,
                             rms_norm_eps=1.5625e-07, tie_word_embeddings=False)),
    "phi3-mini": ("phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, original_max_position_embeddings=4096,
                               sliding_window=2047, tie_word_embeddings=False)),
}


def build_family(name: str):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    model_type, shape = FAMILY_SHAPES[name]
    cfg = CONFIG_MAPPING[model_type](**shape, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(c.DEVICE):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def linear_floor(model, n: int, all_tokens: int, tflops: float) -> float:
    """Output tok/s if every token's linear layers (and each output token's head) ran at the matmul rate."""
    layers = sum(p.numel() for name, p in model.named_parameters() if "layers." in name and p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    return n * c.NEW / ((2 * layers * all_tokens + 2 * head * n * c.NEW) / (tflops * 1e12))


def families(res, n: int, names: list[str] | None = None, compile: bool = True) -> None:
    for name in names or FAMILY_SHAPES:
        model = None
        try:
            model = build_family(name)
            prefix, suffixes, _ = c.workload(n, vocab=model.config.vocab_size)
            all_tokens = sum(len(prefix) + len(s) for s in suffixes) + n * c.NEW
            _, r = c.fast_run(model, prefix, suffixes, c.NEW, compile=compile)  # compiled: as hf runs on CUDA
            r["floor_tok_s"] = linear_floor(model, n, all_tokens, res["bf16_tflops"])
            r["of_floor"] = r["tok_s"] / r["floor_tok_s"]
            r["params"] = sum(p.numel() for p in model.parameters())
            res[f"family_{name}"] = r
        except Exception as exc:  # noqa: BLE001 - one family's failure must not lose the others
            res[f"family_{name}"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        model = None
        gc.collect()
        c.empty_cache()


# -- adapters ---------------------------------------------------------------------------------------------
def _adapter_dtype(model, name: str, dtype) -> None:
    """One LoRA adapter's A and B weights in `dtype`, in place."""
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            if name in getattr(module, attr, {}):
                getattr(module, attr)[name].to(dtype)


def lora_compiled(res, model, prefix, suffixes) -> None:
    from peft import get_peft_model
    peft_model = get_peft_model(model, c.lora_config(1), adapter_name="a0", autocast_adapter_dtype=False).eval()
    _, res["lora_r16_compiled"] = c.fast_run(model, prefix, suffixes, c.NEW, compile=True)
    peft_model.unload()


def adapters(res, model, prefix, suffixes) -> None:
    """The adapter rows beside the base row of the same call: one rank-16 LoRA on every linear layer (adapter
    weights in the model's dtype, as --dtype loads them; in float32, peft's default; merged into the weights),
    four LoRA adapters with the records spread evenly (one decoder per adapter, as `--adapter` repeated ran
    them before adapters mixed in one decoder: its build and graph capture inside the timed span), P-tuning
    with 128 virtual tokens (MLP encoder) and prefix tuning with 128 virtual tokens."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    from extractor.backends.prompt_learning import virtual_prefix
    n = len(suffixes)
    peft_model = get_peft_model(model, c.lora_config(1), adapter_name="a0", autocast_adapter_dtype=False)
    peft_model.eval()
    _, res["lora_r16"] = c.fast_run(model, prefix, suffixes, c.NEW)
    for name in ("a1", "a2", "a3"):
        peft_model.add_adapter(name, c.lora_config(int(name[1]) + 1), autocast_adapter_dtype=False)
    tokens, start = 0, time.perf_counter()
    for i, name in enumerate(("a0", "a1", "a2", "a3")):  # each adapter's quarter through its own decoder
        peft_model.set_adapter(name)
        _, r = c.fast_run(model, prefix, suffixes[i::4], c.NEW, warm=False)
        tokens += r["tokens"]
    c.sync()
    res["lora_x4"] = c.row(tokens, n, time.perf_counter() - start, adapters=4)
    peft_model.set_adapter("a0")
    for name in ("a1", "a2", "a3"):
        peft_model.delete_adapter(name)
    _adapter_dtype(model, "a0", torch.float32)  # peft's default (autocast_adapter_dtype=True) on a bf16 model
    _, res["lora_r16_fp32_weights"] = c.fast_run(model, prefix, suffixes, c.NEW)
    _adapter_dtype(model, "a0", torch.bfloat16)
    peft_model.merge_adapter()
    _, res["lora_r16_merged"] = c.fast_run(model, prefix, suffixes, c.NEW)
    peft_model.unmerge_adapter()
    peft_model.unload()
    hidden = model.config.hidden_size
    for key, config in (("ptuning_128", PromptEncoderConfig(num_virtual_tokens=128, encoder_hidden_size=hidden,
                                                              task_type="CAUSAL_LM")),
                        ("prefix_128", PrefixTuningConfig(num_virtual_tokens=128, task_type="CAUSAL_LM")),
                        ("prefix_128_projection", PrefixTuningConfig(num_virtual_tokens=128, prefix_projection=True,
                                                                     encoder_hidden_size=hidden,
                                                                     task_type="CAUSAL_LM"))):
        torch.manual_seed(2)
        wrapped = get_peft_model(model, config).to(c.DEVICE).eval()
        (virtual, virtual_s) = c.timed(lambda: virtual_prefix(wrapped, torch.bfloat16))
        _, r = c.fast_run(model, prefix, suffixes, c.NEW, virtual=virtual)
        r["virtual_tokens"], r["virtual_s"] = virtual.length, virtual_s
        res[key] = r
        model = wrapped.get_base_model()
    base = (res.get("fast") or {}).get("tok_s")
    if base:
        res["adapter_ratios"] = {k: res[k]["tok_s"] / base for k in
                                 ("lora_r16", "lora_r16_compiled", "lora_x4", "lora_r16_fp32_weights",
                                  "lora_r16_merged", "ptuning_128", "prefix_128", "prefix_128_projection")
                                 if res.get(k)}


# -- FP8 (issue 28) ---------------------------------------------------------------------------------------
def fp8_rows(res, prefix, suffixes, stops, repeats: int, modes: list[bool], profiled: bool = False) -> None:
    """The 7B config in bf16 against the same weights with --quantize fp8's layers (FP8Linear: e4m3 weights
    per channel, activations per token, `torch._scaled_mm`), fixed and EOS variant, alternating, `repeats`
    times each, compiled and/or eager (`modes`); medians and the fp8 / bf16 ratios in res["fp8_summary"].
    profiled: also the kernel tables of both (profile_7b_bf16.txt, profile_7b_fp8.txt; compiled as the first mode)."""
    import statistics

    from extractor.backends.quant.fp8 import quantize_model
    bf16, params = c.build("7b")
    fp8, _ = c.build("7b")
    res["fp8_layers"] = quantize_model(fp8, emulate=False)
    c.empty_cache()
    speeds: dict = {}
    for compile in modes:
        torch._dynamo.reset()
        mode = "compiled" if compile else "eager"
        for rep in range(repeats):
            for name, model in (("bf16", bf16), ("fp8", fp8)):
                for workload, budgets in (("fixed", c.NEW), ("eos", stops)):
                    _, r = c.fast_run(model, prefix, suffixes, budgets, compile=compile)
                    res[f"fast_7b_{name}_{workload}_{mode}_r{rep}"] = dict(r, params=params)
                    speeds.setdefault(f"{name}_{workload}_{mode}", []).append(r["tok_s"])
                    print(name, workload, mode, round(r["tok_s"]), flush=True)
    summary = {key: statistics.median(v) for key, v in speeds.items()}
    for key in list(summary):
        if key.startswith("fp8_"):
            summary[key.replace("fp8_", "fp8_over_bf16_")] = summary[key] / summary[key.replace("fp8_", "bf16_")]
    res["fp8_summary"] = dict(summary, repeats=repeats)
    print("fp8_summary", res["fp8_summary"], flush=True)
    if profiled:
        for name, model in (("bf16", bf16), ("fp8", fp8)):
            res[f"profile_7b_{name}"] = profile(model, prefix, suffixes, res.out, compile=modes[0],
                                                name=f"profile_7b_{name}.txt")


# -- the call -------------------------------------------------------------------------------------------
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--parts", default="baselines,fast,eos,7b")
    parser.add_argument("--seq-records", type=int, default=3)
    parser.add_argument("--gb-records", type=int, default=256, help="generate_batch runs on this many")
    parser.add_argument("--eos-static-records", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, not speed")
    parser.add_argument("--families", default=None, help="the `families` part: these shapes only (comma-separated)")
    parser.add_argument("--legacy", default=None, help="the decoder file of an earlier version: the `legacy` part")
    parser.add_argument("--repeats", type=int, default=2, help="the `fp8` part: runs of each variant (medians)")
    return parser.parse_args()


def decoder_rows(res, model, prefix, suffixes, stops, ref, parts: set, args) -> None:
    if "fast" in parts:
        got, r = c.fast_run(model, prefix, suffixes, c.NEW)
        if ref is not None:
            r["agreement_with_static_bf16"] = agreement(got, ref)
            r["divergence_logit_gaps"] = tie_margins(model, prefix, suffixes, got, ref)
        res["fast"] = r
    if "eos" in parts:
        got, r = c.fast_run(model, prefix, suffixes, stops)
        r["stops_honoured"] = sum(len(t) == s for (t, _), s in zip(got, stops))
        res["fast_eos"] = r
    if "adapters" in parts:
        adapters(res, model, prefix, suffixes)
    if "legacy" in parts and args.legacy:
        legacy = c.legacy_decoder(args.legacy)
        _, res["fast_legacy"] = c.fast_run(model, prefix, suffixes, c.NEW, decoder_cls=legacy)
        _, res["fast_eos_legacy"] = c.fast_run(model, prefix, suffixes, stops, decoder_cls=legacy)
    if "compiled" in parts:
        _, res["fast_compiled"] = c.fast_run(model, prefix, suffixes, c.NEW, compile=True)
        _, res["fast_eos_compiled"] = c.fast_run(model, prefix, suffixes, stops, compile=True)
    if "lora_compiled" in parts:
        lora_compiled(res, model, prefix, suffixes)
    if "profile" in parts:
        res["profile"] = profile(model, prefix, suffixes, res.out, compile="compiled" in parts)


def main() -> None:
    args = parse_args()
    if args.smoke:
        c.use_smoke()
    parts = set(args.parts.split(","))
    res = c.Results(Path(args.out), "gpu_decoder", n=args.n)
    res["bf16_tflops"] = c.matmul_tflops()
    model, params = c.build("1.5b")
    prefix, suffixes, stops = c.workload(args.n)
    prompts = [prefix + s for s in suffixes]
    all_tokens = sum(map(len, prompts)) + args.n * c.NEW
    res["floor_tok_s"] = args.n * c.NEW / (2 * params * all_tokens / (res["bf16_tflops"] * 1e12))
    ref = baselines(res, model, prompts, stops, args) if "baselines" in parts else None
    decoder_rows(res, model, prefix, suffixes, stops, ref, parts, args)
    del model
    gc.collect()
    c.empty_cache()
    if "families" in parts:
        torch._dynamo.reset()
        families(res, args.n, args.families.split(",") if args.families else None, compile="eager" not in parts)
    if "7b" in parts:
        torch._dynamo.reset()  # the 1.5B decoders' compiled code is of no use to the 7B model
        model, params7 = c.build("7b")
        for key, budgets in (("fast_7b_compiled", c.NEW), ("fast_7b_eos_compiled", stops)):  # as hf builds it
            _, r = c.fast_run(model, prefix, suffixes, budgets, compile=True)
            r["params"] = params7
            res[key] = r
        model = None
        gc.collect()
        c.empty_cache()
    if "fp8" in parts or "fp8_eager" in parts:
        fp8_rows(res, prefix, suffixes, stops, args.repeats,
                 [mode for mode, part in ((True, "fp8"), (False, "fp8_eager")) if part in parts],
                 profiled="fp8_profile" in parts)
    res.write_table(c.table(res.data))


if __name__ == "__main__":
    main()
