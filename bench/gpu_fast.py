"""Issue 6 harness: the anchor workload through every path, one process, one card.

Workload (../shared/docs/GPU.md): random-weight model from the Qwen2.5-1.5B config (bf16), N prompts of a
320-token shared prefix plus 64-448 unique tokens (random ids, seed 0), 128 new tokens with EOS disabled;
and the EOS variant, where record i stops after L_i ~ U[16, 128] tokens (seeded): `generate` gets a logits
processor that forces EOS at L_i, FastDecoder a budget of L_i (the same tokens are computed either way).

Rows, all measured here, same card, same process:
  sequential `generate` (batch 1, the seed's way) on a few records; static batched `generate` (batch 128,
  length-sorted); transformers `generate_batch` (continuous batching) on a subset; FastDecoder (direct);
  `extractor run`'s code path (Predictor + Run: rendering, tokenizing, parsing, validating, writing) on a
  text version of the workload, unconstrained and --constrained; the 7B config through FastDecoder.
Also: the compute floor (2 * params * all tokens at a bf16 matmul rate measured here), greedy agreement
with `generate` (fp32 token for token; bf16 prefix agreement), and where FastDecoder's time goes.

Issue 14 parts: `legacy` (the FastDecoder before it ran the model's own forward, from a copy of that file at
--legacy, same call: the baseline), `compiled` (torch.compile around the model's forward), `families` (the
anchor workload on random-weight configs shaped like Gemma-2-2B, GLM-4-9B and Phi-3-mini: tok/s and fraction
of each one's compute floor), `check_families` (every family on the list, tiny fp32 configs on the GPU with
graphs and the Triton kernel: token equality with `generate`).

    python bench/gpu_fast.py --out $OUT            # everything (~6 min on one H100)
    python bench/gpu_fast.py --out $OUT --parts anchor,fast
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

QWEN = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
PREFIX, NEW = 320, 128
DEVICE = "cuda"  # --smoke: cpu, with a tiny config, to check the harness itself
EOS_ID = 151643  # Qwen2.5's <|endoftext|>


class Results:
    def __init__(self, out: Path):
        self.out, self.data = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, key, value):
        self.data[key] = value
        print(key, json.dumps(value, default=str), flush=True)
        (self.out / "gpu_fast.json").write_text(json.dumps(self.data, indent=1, default=str))

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - t


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def matmul_tflops() -> float:
    size = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    _, dt = timed(lambda: [a @ b for _ in range(10)])
    return 10 * 2 * size ** 3 / dt / 1e12


def workload(n: int, seed: int = 0, vocab: int | None = None):
    """The anchor's token ids (ids folded into `vocab` for a model with a smaller vocabulary)."""
    rng = random.Random(seed)
    fold = (lambda i: i % vocab) if vocab else (lambda i: i)
    prefix = [fold(rng.randrange(1000, 100000)) for _ in range(PREFIX)]
    lo, hi = (64, 448) if NEW == 128 else (4, 40)
    suffixes = [[fold(rng.randrange(1000, 100000)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    stops = [random.Random(1000 + i).randint(min(16, NEW), NEW) for i in range(n)]  # the EOS variant's lengths
    return prefix, suffixes, stops


def build(name: str):
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**QWEN[name], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return model, sum(p.numel() for p in model.parameters())


def row(tokens: int, records: int, seconds: float, **extra) -> dict:
    return {"tok_s": tokens / seconds, "records_s": records / seconds, "seconds": seconds, "tokens": tokens, **extra}


# -- baselines -----------------------------------------------------------------------------------------
class ForceEOS:
    """A LogitsProcessor: row j emits EOS exactly as its stops[j]-th new token, never before."""

    def __init__(self, stops: list[int], prompt_width: int):
        self.stops = torch.tensor(stops, device=DEVICE)
        self.width = prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width  # tokens generated so far
        scores[:, EOS_ID] = torch.finfo(scores.dtype).min
        at = (self.stops - 1 == step).nonzero().flatten()
        if len(at):
            scores[at] = torch.finfo(scores.dtype).min
            scores[at, EOS_ID] = 0
        return scores


def static_generate(model, prompts, batch, stops=None):
    """Length-sorted static batches, left-padded; returns each record's new tokens (EOS included)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [None] * len(prompts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=DEVICE)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i], device=DEVICE)
            mask[j, width - len(prompts[i]):] = 1
        if stops is None:
            kw = dict(min_new_tokens=NEW, eos_token_id=None)
        else:
            kw = dict(eos_token_id=EOS_ID, logits_processor=[ForceEOS([stops[i] for i in idx], width)])
        o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                           **kw)
        for j, i in enumerate(idx):
            toks = o[j, width:].tolist()
            outs[i] = toks[: toks.index(EOS_ID) + 1] if stops is not None and EOS_ID in toks else toks
    return outs


def generate_batch(model, prompts):
    from transformers import GenerationConfig
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gc = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:16], generation_config=gc, continuous_batching_config=ContinuousBatchingConfig())
    outs, dt = timed(lambda: model.generate_batch(prompts, generation_config=gc,
                                                  continuous_batching_config=ContinuousBatchingConfig()))
    return sum(len(o.generated_tokens) for o in outs.values()), dt


CONSTRAINED_KEYS = {"auto": "fast_constrained", "0": "fast_constrained_no_workers"}


# -- FastDecoder ---------------------------------------------------------------------------------------
def fast_run(model, prefix, suffixes, budgets, slots=None, grammar=None, workers="auto", decoder_cls=None,
             warm=True, **decoder_kw):
    """FastDecoder on token ids; with `grammar`, every output is constrained to it (a fresh BatchConstraint
    per call, `workers` grammar processes) and the grammar's stop token ends a row. decoder_cls: another
    decoder class with the same interface (the legacy one). warm=False: no warm-up run, and the decoder's
    build and graph capture count in the timed span (an adapter switch's whole cost)."""
    from extractor.backends.fast import FastDecoder, slots_for_memory
    from extractor.constrain.batch import BatchConstraint
    decoder_cls = decoder_cls or FastDecoder
    unique = max(len(s) for s in suffixes) + NEW
    sync()
    start = time.perf_counter()
    slots = slots or (slots_for_memory(model, unique, DEVICE) if DEVICE == "cuda" else 16)
    eos = grammar.stop_token_ids if grammar is not None else []
    (dec, build_s) = timed(lambda: decoder_cls(model, prefix, slots=slots, unique_len=unique, eos_ids=eos,
                                               **decoder_kw))
    dec.capture()
    constraint = (lambda: BatchConstraint(grammar, workers)) if grammar is not None else (lambda: None)
    warmup_s = 0.0
    if warm:  # compiles (torch.compile, Triton) and captures the graphs a run of this shape needs
        _, warmup_s = timed(lambda: dec.generate(suffixes[:2 * slots] if slots < len(suffixes) else suffixes,
                                                 max_new=budgets if isinstance(budgets, int) else budgets[:2 * slots],
                                                 constraint=constraint()))
        dec.stats = {k: 0 for k in dec.stats}
    dec.trace = []
    last = constraint()
    got, dt = timed(lambda: dec.generate(suffixes, max_new=budgets, constraint=last))
    if not warm:
        dt = time.perf_counter() - start
    tokens = sum(len(t) for t, _ in got)
    info = {"slots": slots, "buckets_captured": len(dec._graphs), "attention": dec.attention,
            "compiled": dec.compiled, "flash_gqa": dec._flash_gqa, "setup_s": build_s, "warmup_s": warmup_s,
            "time_split": dict(dec.stats), "prefill_chunks": prefill_summary(dec.trace, model, len(prefix)),
            "constraint": dict(last.stats) if last is not None else None}
    del dec
    empty_cache()
    return got, row(tokens, len(suffixes), dt, **info)


def prefill_summary(trace, model, prefix_len: int) -> dict:
    """Each prefill chunk's rows, padded width, real tokens, milliseconds and achieved TFLOP/s (linear layers
    only, real tokens): where prefill falls short of the matmul rate."""
    cfg = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    chunks = [{"rows": r, "width": w, "tokens": t, "ms": round(s * 1e3, 2),
               "tflops": round(2 * linear * t / s / 1e12, 1)} for r, w, t, s in trace]
    tokens, seconds = sum(c[2] for c in trace), sum(c[3] for c in trace)
    return {"chunks": chunks, "tokens": tokens, "padded": sum(r * w for r, w, _, _ in trace), "seconds": seconds,
            "linear_tflops": 2 * linear * tokens / seconds / 1e12 if seconds else None,
            "hidden": cfg.hidden_size, "prefix": prefix_len}


def fp32_check(model, prefix, suffixes) -> dict:
    """Token-for-token equality with `generate` (batch 1) in fp32, CUDA graphs and Triton kernel on."""
    from extractor.backends.fast import FastDecoder
    model.float()
    dec = FastDecoder(model, prefix, slots=4, unique_len=max(map(len, suffixes)) + 40, eos_ids=[])
    dec.capture()
    got = dec.generate(suffixes, max_new=32, refill=2)
    equal = 0
    with torch.inference_mode():
        for s, (toks, _) in zip(suffixes, got):
            ids = torch.tensor([prefix + s], device=DEVICE)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
            equal += toks == ref
    del dec
    model.to(torch.bfloat16)
    empty_cache()
    return {"records": len(suffixes), "new_tokens": 32, "equal": equal}


def tie_margins(model, prefix, suffixes, got, ref, limit: int = 64) -> dict:
    """Where FastDecoder and static `generate` part ways in bf16: the reference model's logit gap, at that
    position, between its own choice and FastDecoder's (batch 1, eager HF forward). Gaps of the order of
    bf16 rounding mean ties, not a wrong computation."""
    gaps = []
    with torch.inference_mode():
        for s, (t, _), r in list(zip(suffixes, got, ref))[:limit]:
            k = 0
            while k < min(len(t), len(r)) and t[k] == r[k]:
                k += 1
            if k == min(len(t), len(r)):
                continue
            ids = torch.tensor([prefix + s + r[:k]], device=DEVICE)
            logits = model(ids).logits[0, -1].float()
            gaps.append(float(logits[r[k]] - logits[t[k]]))
    gaps.sort()
    top = [abs(g) for g in gaps]
    return {"diverging_records": len(gaps), "median_abs_gap": top[len(top) // 2] if top else None,
            "max_abs_gap": max(top) if top else None,
            "logit_scale_note": "bf16 has 8 bits of mantissa: logits of ~2-5 round in steps of ~0.016-0.03"}


def agreement(got, ref) -> dict:
    """bf16 greedy paths diverge at near-ties (different kernels round differently): count full equality
    and the length of the agreeing prefix."""
    same = sum(t == r for (t, _), r in zip(got, ref))
    prefix_len = []
    for (t, _), r in zip(got, ref):
        k = 0
        while k < min(len(t), len(r)) and t[k] == r[k]:
            k += 1
        prefix_len.append(k)
    prefix_len.sort()
    return {"equal": same, "of": len(ref), "median_agreeing_prefix": prefix_len[len(prefix_len) // 2]}


def profile(model, prefix, suffixes, out: Path, compile: bool = False) -> dict:
    """Kernel time of one decode step (1024 rows, eager) and one full prefill chunk (compiled with
    `compile`, as on CUDA by default), top kernels first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from extractor.backends.fast import FastDecoder
    unique = max(len(s) for s in suffixes) + NEW
    dec = FastDecoder(model, prefix, slots=min(1024, len(suffixes)), unique_len=unique, eos_ids=[],
                      compile=compile)
    middle = sorted(suffixes, key=len)[len(suffixes) // 2:]
    take = 1
    while take < len(middle) and len(middle[take]) * (take + 1) <= dec.prefill_tokens:
        take += 1
    chunk = middle[:take]  # a full chunk: as many rows of about the median length as prefill_tokens holds
    tables = {}
    rows = min(1024, len(suffixes))
    own = torch.tensor([len(s) + NEW // 2 for s in suffixes[:rows]], device=DEVICE)  # mid-generation lengths
    dec._slot[:rows] = torch.arange(rows, device=DEVICE)
    dec._pos[:rows] = len(prefix) + own
    with torch.inference_mode():
        dec._prefill(list(range(len(chunk))), chunk)
        dec._step(rows)
        sync()
        for name, fn in ((f"prefill_chunk_{len(chunk)}x{len(chunk[-1])}", lambda: dec._prefill(list(range(len(chunk))), chunk)),
                         ("decode_step_1024_mid_generation", lambda: dec._step(rows))):
            with torch_profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as prof:
                fn()
                sync()
            tables[name] = prof.key_averages().table(sort_by=f"{DEVICE}_time_total", row_limit=14, max_name_column_width=60)
    text = "\n\n".join(f"== {k}\n{v}" for k, v in tables.items())
    (out / "profile.txt").write_text(text)
    print(text, flush=True)
    del dec
    empty_cache()
    return {"written": "profile.txt"}


# -- families (issue 14) ----------------------------------------------------------------------------------
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
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model


def linear_floor(model, n: int, all_tokens: int, tflops: float) -> float:
    """Output tok/s if every token's linear layers (and each output token's head) ran at the matmul rate."""
    layers = sum(p.numel() for name, p in model.named_parameters() if "layers." in name and p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    return n * NEW / ((2 * layers * all_tokens + 2 * head * n * NEW) / (tflops * 1e12))


def families(res: Results, n: int, names: list[str] | None = None, compile: bool = True) -> None:
    for name in names or FAMILY_SHAPES:
        try:
            model = build_family(name)
            prefix, suffixes, _ = workload(n, vocab=model.config.vocab_size)
            all_tokens = sum(len(prefix) + len(s) for s in suffixes) + n * NEW
            _, r = fast_run(model, prefix, suffixes, NEW, compile=compile)  # compiled: as the hf backend runs on CUDA
            r["floor_tok_s"] = linear_floor(model, n, all_tokens, res["bf16_tflops"])
            r["of_floor"] = r["tok_s"] / r["floor_tok_s"]
            r["params"] = sum(p.numel() for p in model.parameters())
            res[f"family_{name}"] = r
        except Exception as exc:  # noqa: BLE001 - one family's failure must not lose the others
            res[f"family_{name}"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        model = None
        import gc
        gc.collect()
        empty_cache()


def check_families(compile: bool = False) -> dict:
    """Every family on the list, tiny fp32 configs on this device with graphs and the Triton kernel: FastDecoder
    token for token equal to `generate` (shared prefix, refills, budgets)."""
    from transformers import AutoModelForCausalLM

    from extractor.backends.fast import FastDecoder
    from tests.helpers import generate_reference
    from tests.families import OVERRIDES, family_config
    out = {}
    rng = random.Random(0)
    for model_type in OVERRIDES:
        cfg = family_config(model_type, 1024, eos=2, pad=0)
        torch.manual_seed(0)
        # Softcapped attention loads eager, as the hf backend loads it (sdpa would drop the softcap).
        eager = {"attn_implementation": "eager"} if getattr(cfg, "attn_logit_softcapping", None) else {}
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **eager).eval()
        prefix = [rng.randrange(5, 1000) for _ in range(40)]
        suffixes = [[rng.randrange(5, 1000) for _ in range(rng.randint(2, 40))] for _ in range(6)]
        budgets = [rng.randint(4, 24) for _ in suffixes]
        try:
            dec = FastDecoder(model, prefix, slots=3, unique_len=72, eos_ids=[2], compile=compile)
            dec.capture()
            got = dec.generate(suffixes, budgets, refill=2)
            equal = sum(toks == generate_reference(model, prefix + s, b, [2])
                        for s, b, (toks, _) in zip(suffixes, budgets, got))
            out[model_type] = {"equal": equal, "of": len(suffixes), "graphs": len(dec._graphs),
                               "attention": dec.attention, "compiled": dec.compiled}
        except Exception as exc:  # noqa: BLE001
            out[model_type] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def legacy_decoder(path: str):
    """The FastDecoder class of another version of fast.py (the same-call baseline)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("legacy_fast", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FastDecoder


# -- adapters (issue 15) ---------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config(seed: int):
    from peft import LoraConfig
    torch.manual_seed(seed)  # init_lora_weights=False: B is random too, so the adapter changes the outputs
    return LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")


def _adapter_dtype(model, name: str, dtype) -> None:
    """One LoRA adapter's A and B weights in `dtype`, in place."""
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            if name in getattr(module, attr, {}):
                getattr(module, attr)[name].to(dtype)


def lora_compiled(res: Results, model, prefix, suffixes) -> None:
    from peft import get_peft_model
    peft_model = get_peft_model(model, _lora_config(1), adapter_name="a0", autocast_adapter_dtype=False).eval()
    _, res["lora_r16_compiled"] = fast_run(model, prefix, suffixes, NEW, compile=True)
    peft_model.unload()


def adapters(res: Results, model, prefix, suffixes) -> None:
    """The adapter rows beside the base row of the same call: one rank-16 LoRA on every linear layer (adapter
    weights in the model's dtype, as --dtype loads them; in float32, peft's default; merged into the weights;
    compiled), four LoRA adapters with the records spread evenly (one decoder per adapter, as `--adapter`
    repeated runs them: its build and graph capture inside the timed span), P-tuning with 128 virtual tokens
    (MLP encoder) and prefix tuning with 128 virtual tokens."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    from extractor.backends.prompt_learning import virtual_prefix
    n = len(suffixes)
    peft_model = get_peft_model(model, _lora_config(1), adapter_name="a0", autocast_adapter_dtype=False)
    peft_model.eval()
    _, res["lora_r16"] = fast_run(model, prefix, suffixes, NEW)
    for name in ("a1", "a2", "a3"):
        peft_model.add_adapter(name, _lora_config(int(name[1]) + 1), autocast_adapter_dtype=False)
    # Four adapters, records spread evenly: each adapter's quarter through its own decoder, timed end to end.
    tokens, start = 0, time.perf_counter()
    for i, name in enumerate(("a0", "a1", "a2", "a3")):
        peft_model.set_adapter(name)
        mine = suffixes[i::4]
        got, r = fast_run(model, prefix, mine, NEW, warm=False)
        tokens += r["tokens"]
    sync()
    res["lora_x4"] = row(tokens, n, time.perf_counter() - start, adapters=4)
    peft_model.set_adapter("a0")
    peft_model.delete_adapter("a1"), peft_model.delete_adapter("a2"), peft_model.delete_adapter("a3")
    # peft's default (autocast_adapter_dtype=True): float32 adapter weights on a bf16 model.
    _adapter_dtype(model, "a0", torch.float32)
    _, res["lora_r16_fp32_weights"] = fast_run(model, prefix, suffixes, NEW)
    _adapter_dtype(model, "a0", torch.bfloat16)
    peft_model.merge_adapter()
    _, res["lora_r16_merged"] = fast_run(model, prefix, suffixes, NEW)
    peft_model.unmerge_adapter()
    peft_model.unload()
    for key, config in (("ptuning_128", PromptEncoderConfig(num_virtual_tokens=128, encoder_hidden_size=1536,
                                                              task_type="CAUSAL_LM")),
                        ("prefix_128", PrefixTuningConfig(num_virtual_tokens=128, task_type="CAUSAL_LM")),
                        ("prefix_128_projection", PrefixTuningConfig(num_virtual_tokens=128, prefix_projection=True,
                                                                     encoder_hidden_size=1536, task_type="CAUSAL_LM"))):
        torch.manual_seed(2)
        wrapped = get_peft_model(model, config).to(DEVICE).eval()
        (virtual, virtual_s) = timed(lambda: virtual_prefix(wrapped, torch.bfloat16))
        _, r = fast_run(model, prefix, suffixes, NEW, virtual=virtual)
        r["virtual_tokens"], r["virtual_s"] = virtual.length, virtual_s
        res[key] = r
        model = wrapped.get_base_model()
    base = res.get("fast", {}).get("tok_s")
    if base:
        res["adapter_ratios"] = {k: res[k]["tok_s"] / base for k in
                                 ("lora_r16", "lora_r16_compiled", "lora_x4", "lora_r16_fp32_weights", "lora_r16_merged",
                                  "ptuning_128", "prefix_128", "prefix_128_projection") if res.get(k)}


# -- the run path ----------------------------------------------------------------------------------------
def run_backend(model, work: Path):
    """The hf backend `extractor run` builds, around the model already in memory (fast path on)."""
    from extractor.backends.hf import HFBackend
    backend = HFBackend.from_loaded(model, _tokenizer(work), work / "model", fast="on", compile=DEVICE == "cuda")
    return backend


def run_path(backend, work: Path, n: int, constrained: bool, window: int = 256, profile_cpu: bool = False) -> dict:
    """Predictor + Run, as `extractor run` builds them, over a text corpus shaped like the anchor."""
    import cProfile
    import io
    import pstats

    from extractor.backends.base import GenParams
    from extractor.benchmark import time_run
    from extractor.pipeline import Predictor
    from extractor.tasks import load_task
    corpus = _corpus(work, backend.tokenizer, n)
    params = GenParams(max_new_tokens=NEW, constrained=constrained)
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


def adapters_run(res: Results, model, work: Path, n: int) -> None:
    """`extractor run`'s path with four rank-16 LoRA adapters loaded from disk, as `--adapter` repeated runs
    them: each adapter's quarter of the records (merged into the base weights, one decoder for all four),
    timed end to end with every switch; beside the base weights over all the records, same backend."""
    from peft import get_peft_model

    from extractor.backends.base import GenParams
    from extractor.backends.hf import HFBackend
    from extractor.benchmark import time_run
    from extractor.pipeline import Predictor
    from extractor.tasks import load_task
    tok = _tokenizer(work)
    full = work / "model_full"
    model.save_pretrained(full)
    tok.save_pretrained(full)
    dirs = []
    for i in range(4):
        wrapped = get_peft_model(model, _lora_config(i + 1), autocast_adapter_dtype=False)
        wrapped.save_pretrained(work / f"lora{i}")
        wrapped.unload()
        dirs.append(str(work / f"lora{i}"))
    backend = HFBackend(str(full), adapters=dirs, dtype="bf16", device=DEVICE, fast="on",
                        compile=DEVICE == "cuda")
    corpus = _corpus(work, backend.tokenizer, n)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    quarters = []
    for i in range(4):
        quarters.append(work / f"quarter{i}.jsonl")
        quarters[-1].write_text("".join(lines[i::4]), encoding="utf-8")
    predictor = Predictor(load_task("jd_requirements"), backend, GenParams(max_new_tokens=NEW), max_input_tokens=4096)
    _, res["adapters_run_warmup_s"] = timed(lambda: time_run(predictor, corpus, work / "warm.jsonl", limit=64))
    res["adapters_run_base"] = time_run(predictor, corpus, work / "base.jsonl")
    start, tokens, rows = time.perf_counter(), 0, []
    for name, quarter in zip(backend.adapters(), quarters):
        backend.use_adapter(name)
        predictor.adapter_key = name
        r = time_run(predictor, quarter, work / f"{name}.jsonl")
        tokens += r["tokens"]
        rows.append({k: r[k] for k in ("seconds", "tokens", "records")})
    seconds = time.perf_counter() - start
    res["adapters_run_x4"] = {**row(tokens, n, seconds), "per_adapter": rows,
                              "merged_layers": len(backend.weights.merged or ())}
    # As `--adapter` x4 runs a corpus: every adapter over all the records, one output each.
    start, tokens, rows = time.perf_counter(), 0, []
    for name in backend.adapters():
        backend.use_adapter(name)
        predictor.adapter_key = name
        r = time_run(predictor, corpus, work / f"{name}.all.jsonl")
        tokens += r["tokens"]
        rows.append({k: r[k] for k in ("seconds", "tokens", "records")})
    res["adapters_run_x4_all"] = {**row(tokens, 4 * n, time.perf_counter() - start), "per_adapter": rows}
    base = res["adapters_run_base"]["tok_s"]
    res["adapters_run_ratios"] = {"x4_spread": res["adapters_run_x4"]["tok_s"] / base,
                                  "x4_all_records": res["adapters_run_x4_all"]["tok_s"] / base}
    backend.use_adapter(None)
    del backend


def _tokenizer(work: Path):
    from extractor.tiny_models import tokenizer_corpus, train_tokenizer
    path = work / "model"
    if not (path / "tokenizer.json").exists():
        tok = train_tokenizer(tokenizer_corpus(3000), vocab_size=4096)
        tok.save_pretrained(path)
        (path / "config.json").write_text(json.dumps({"model_type": "qwen2", **QWEN["1.5b"]}))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _corpus(work: Path, tokenizer, n: int) -> Path:
    """Postings glued together and cut to 64-448 tokens each (seeded), as JSONL."""
    from extractor.synth import generate
    path = work / f"corpus{n}.jsonl"
    if path.exists():
        return path
    rng = random.Random(0)
    texts = [rec["text"] for rec, _ in generate(4 * n, seed=3, lang="mix", split="all")]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            want, ids = (rng.randint(64, 448) if NEW == 128 else rng.randint(4, 40)), []
            while len(ids) < want:
                ids += tokenizer(texts[rng.randrange(len(texts))] + " ", add_special_tokens=False)["input_ids"]
            fh.write(json.dumps({"id": f"r{i}", "text": tokenizer.decode(ids[:want])}, ensure_ascii=False) + "\n")
    return path


# -- the table ----------------------------------------------------------------------------------------
def table(res: Results) -> str:
    d = res.data
    floor = d.get("floor_tok_s")
    base = d.get("static_bs128", {}).get("tok_s")
    base_eos = d.get("static_bs128_eos", {}).get("tok_s")
    by_workers = [(k, k.rsplit("_w", 1)[1]) for k in sorted(d) if k.startswith("fast_constrained_w")]
    lines = [f"card: {d.get('card')}; torch {d.get('torch')}, transformers {d.get('transformers')}; "
             f"bf16 matmul {d.get('bf16_tflops', 0):.0f} TFLOP/s; compute floor {floor or 0:,.0f} tok/s; "
             f"N = {d.get('n')}", "",
             "| path | workload | output tok/s | records/s | x static bs128 (same workload) | of floor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label, wl in [("sequential", "sequential `generate`, batch 1", "fixed"),
                           ("static_bs128", "static `generate`, batch 128", "fixed"),
                           ("generate_batch", "`generate_batch` (continuous batching)", "fixed"),
                           ("fast_legacy", "FastDecoder before issue 14 (own Llama layer)", "fixed"),
                           ("fast", "FastDecoder", "fixed"),
                           ("fast_compiled", "FastDecoder, torch.compile", "fixed"),
                           ("run_path_legacy", "`extractor run` path, FastDecoder before issue 14", "fixed, text"),
                           ("run_path", "`extractor run` path (hf, fast)", "fixed, text"),
                           ("adapters_run_base", "`extractor run` path, base weights (adapter backend)", "fixed, text"),
                           ("adapters_run_x4", "`extractor run` path, 4 LoRA adapters, a quarter each", "fixed, text"),
                           ("adapters_run_x4_all", "`extractor run` path, 4 LoRA adapters, all records each",
                            "fixed, text"),
                           ("run_path_constrained", "`extractor run` path, --constrained", "text, JSON"),
                           ("run_path_constrained_switch", "`extractor run` path, --constrained, other GIL switch interval",
                            "text, JSON"),
                           ("fast_same_lengths", "FastDecoder, unconstrained, each record as long as its JSON",
                            "JSON lengths"),
                           ("fast_constrained", "FastDecoder, constrained", "JSON"),
                           ("fast_constrained_no_workers", "FastDecoder, constrained, grammar in-process", "JSON"),
                           *[(k, f"FastDecoder, constrained, {n} grammar workers", "JSON") for k, n in by_workers],
                           ("static_bs128_eos", "static `generate`, batch 128", "EOS at 16-128"),
                           ("fast_eos_legacy", "FastDecoder before issue 14", "EOS at 16-128"),
                           ("fast_eos", "FastDecoder", "EOS at 16-128"),
                           ("fast_eos_compiled", "FastDecoder, torch.compile", "EOS at 16-128"),
                           ("lora_r16", "FastDecoder, one rank-16 LoRA (all linear layers, unmerged)", "fixed"),
                           ("lora_r16_compiled", "FastDecoder, rank-16 LoRA, torch.compile", "fixed"),
                           ("lora_r16_fp32_weights", "FastDecoder, rank-16 LoRA, float32 adapter weights", "fixed"),
                           ("lora_r16_merged", "FastDecoder, rank-16 LoRA merged into the weights", "fixed"),
                           ("lora_x4", "FastDecoder, 4 LoRA adapters, records spread evenly", "fixed"),
                           ("ptuning_128", "FastDecoder, P-tuning, 128 virtual tokens", "fixed"),
                           ("prefix_128", "FastDecoder, prefix tuning, 128 virtual tokens", "fixed"),
                           ("prefix_128_projection", "FastDecoder, prefix tuning with projection, 128", "fixed"),
                           ("fast_7b", "FastDecoder, 7B config", "fixed"),
                           ("fast_7b_compiled", "FastDecoder, 7B config, torch.compile", "fixed"),
                           ("fast_7b_eos_compiled", "FastDecoder, 7B config, torch.compile", "EOS at 16-128")]:
        r = d.get(key)
        if not r:
            continue
        ref = base_eos if "eos" in key else base
        ratio = f"{r['tok_s'] / ref:.1f}x" if ref and "7b" not in key else "-"
        of_floor = f"{r['tok_s'] / floor:.0%}" if floor and key in ("sequential", "static_bs128", "generate_batch", "fast",
                                                                      "fast_legacy", "fast_compiled") else "-"
        lines.append(f"| {label} | {wl} | {r['tok_s']:,.0f} | {r['records_s']:,.1f} | {ratio} | {of_floor} |")
    for name in FAMILY_SHAPES:
        r = d.get(f"family_{name}")
        if r and "tok_s" in r:
            lines.append(f"| FastDecoder, {name} config ({r['params'] / 1e9:.2f} B) | fixed | {r['tok_s']:,.0f} | "
                         f"{r['records_s']:,.1f} | - | {r['of_floor']:.0%} of its linear-layer floor "
                         f"({r['floor_tok_s']:,.0f}) |")
        elif r:
            lines.append(f"| FastDecoder, {name} config | fixed | {r.get('error')} | | | |")
    if d.get("adapter_ratios"):
        lines.append("adapter rows / base FastDecoder, same call: " +
                     ", ".join(f"{k} {v:.2f}x" for k, v in d["adapter_ratios"].items()))
    pairs = [("run_path", "run_path_constrained", "run path"), ("fast", "fast_constrained", "FastDecoder"),
             ("fast_same_lengths", "fast_constrained", "FastDecoder, same output lengths"),
             ("run_path", "run_path_constrained_switch", "run path, other GIL switch interval"),
             ("fast", "fast_constrained_no_workers", "FastDecoder, grammar in-process")]
    pairs += [("fast", k, f"FastDecoder, {n} workers") for k, n in by_workers]
    for free, cons, label in pairs:
        if d.get(free) and d.get(cons):
            lines.append(f"--constrained costs {1 - d[cons]['tok_s'] / d[free]['tok_s']:.0%} of output tok/s, "
                         f"{1 - d[cons]['records_s'] / d[free]['records_s']:.0%} of records/s ({label})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--parts", default="baselines,fast,eos,check,run,7b")
    parser.add_argument("--seq-records", type=int, default=3)
    parser.add_argument("--gb-records", type=int, default=256, help="generate_batch runs on this many")
    parser.add_argument("--eos-static-records", type=int, default=1024)
    parser.add_argument("--grammar-workers", default="auto,0",
                        help="constrained FastDecoder rows: grammar worker counts (auto: the default)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="also time the constrained run path with this GIL switch interval while decoding "
                             "(seconds; 0: Python's own 5 ms; the default is hf.CONSTRAINED_SWITCH_INTERVAL)")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the harness, not speed")
    parser.add_argument("--families", default=None, help="the `families` part: these shapes only (comma-separated)")
    parser.add_argument("--legacy", default=None, help="fast.py of an earlier version: the `legacy` part's decoder")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, PREFIX, NEW
        DEVICE, PREFIX, NEW = "cpu", 24, 12
        tiny = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=151936, tie_word_embeddings=True, head_dim=32)
        QWEN.update({"1.5b": tiny, "7b": dict(tiny, num_attention_heads=4, num_key_value_heads=1)})
    parts = set(args.parts.split(","))
    import transformers
    res = Results(Path(args.out))
    res["card"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    res["torch"], res["transformers"], res["n"] = torch.__version__, transformers.__version__, args.n
    res["bf16_tflops"] = matmul_tflops()
    model, params = build("1.5b")
    prefix, suffixes, stops = workload(args.n)
    prompts = [prefix + s for s in suffixes]
    all_tokens = sum(map(len, prompts)) + args.n * NEW
    res["floor_tok_s"] = args.n * NEW / (2 * params * all_tokens / (res["bf16_tflops"] * 1e12))
    ref = None
    with torch.inference_mode():
        if "baselines" in parts:
            k = args.seq_records
            static_generate(model, prompts[:1], 1)
            outs, dt = timed(lambda: static_generate(model, prompts[:k], 1))
            res["sequential"] = row(sum(map(len, outs)), k, dt, records_measured=k)
            seq_outs = outs
            ref, dt = timed(lambda: static_generate(model, prompts, 128))
            res["static_bs128"] = row(sum(map(len, ref)), args.n, dt,
                                      hf_batch1_vs_batch128_bf16=agreement([(o, None) for o in seq_outs], ref[:k]))
            m = min(args.eos_static_records, args.n)
            outs, dt = timed(lambda: static_generate(model, prompts[:m], 128, stops[:m]))
            res["static_bs128_eos"] = row(sum(map(len, outs)), m, dt, records_measured=m,
                                          stops_honoured=sum(len(o) == s for o, s in zip(outs, stops)))
    if "baselines" in parts:  # continuous batching runs its own thread: outside inference mode
        m = min(args.gb_records, args.n)
        try:
            tokens, dt = generate_batch(model, prompts[:m])
            res["generate_batch"] = row(tokens, m, dt, records_measured=m)
        except Exception as exc:  # noqa: BLE001 - a transformers API change must not lose the rest
            res["generate_batch"] = None
            res["generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:400]
    if "fast" in parts:
        got, r = fast_run(model, prefix, suffixes, NEW)
        if ref is not None:
            r["agreement_with_static_bf16"] = agreement(got, ref)
            r["divergence_logit_gaps"] = tie_margins(model, prefix, suffixes, got, ref)
        res["fast"] = r
    if "eos" in parts:
        got, r = fast_run(model, prefix, suffixes, stops)
        r["stops_honoured"] = sum(len(t) == s for (t, _), s in zip(got, stops))
        res["fast_eos"] = r
    if "adapters" in parts:
        adapters(res, model, prefix, suffixes)
    if "legacy" in parts and args.legacy:
        legacy = legacy_decoder(args.legacy)
        _, res["fast_legacy"] = fast_run(model, prefix, suffixes, NEW, decoder_cls=legacy)
        _, res["fast_eos_legacy"] = fast_run(model, prefix, suffixes, stops, decoder_cls=legacy)
    if "compiled" in parts:
        _, res["fast_compiled"] = fast_run(model, prefix, suffixes, NEW, compile=True)
        _, res["fast_eos_compiled"] = fast_run(model, prefix, suffixes, stops, compile=True)
    if "lora_compiled" in parts:
        lora_compiled(res, model, prefix, suffixes)
    if "profile" in parts:
        res["profile"] = profile(model, prefix, suffixes, Path(args.out), compile="compiled" in parts)
    if "check" in parts:
        res["fp32_check"] = fp32_check(model, prefix, suffixes[:8])
    if "run" in parts or "constrained" in parts:
        work = Path(args.out) / "work"
        backend = run_backend(model, work)
        # One-time costs (grammar, decoder, compile, graphs) in a first small run, reported on their own.
        _, res["run_path_warmup_s"] = timed(lambda: run_path(backend, work, 64, constrained="constrained" in parts))
        if "run" in parts:
            res["run_path"] = run_path(backend, work, args.n, constrained=False)
        if "constrained" in parts:
            res["run_path_constrained"] = run_path(backend, work, args.n, constrained=True)
            if args.switch_interval is not None:  # the same run with another GIL switch interval (0: Python's)
                import extractor.backends.hf as hf_module
                default = hf_module.CONSTRAINED_SWITCH_INTERVAL
                hf_module.CONSTRAINED_SWITCH_INTERVAL = args.switch_interval
                res["run_path_constrained_switch"] = run_path(backend, work, args.n, constrained=True)
                res["run_path_constrained_switch"]["switch_interval_s"] = args.switch_interval
                hf_module.CONSTRAINED_SWITCH_INTERVAL = default
            if "profile" in parts:  # where the host time goes, on a smaller run of its own (cProfile slows it)
                res["run_path_constrained_profiled"] = run_path(backend, work, 256, constrained=True, profile_cpu=True)
            # The same grammar on FastDecoder directly (token prompts, no reader/writer threads): what the
            # constraint costs the decoder itself.
            from extractor.tasks import load_task
            grammar = backend.grammar(load_task("jd_requirements").schema)
            # Grammar worker processes: the default ("auto") and each count asked for (0: in this process);
            # every count must give the same tokens.
            first = None
            for count in args.grammar_workers.split(","):
                got, r = fast_run(model, prefix, suffixes, NEW, grammar=grammar,
                                  workers=count if count == "auto" else int(count))
                r["stopped"] = sum(reason == "stop" for _, reason in got)
                first = first or got
                r["same_tokens_as_first"] = sum(a == b for a, b in zip(got, first))
                res[CONSTRAINED_KEYS.get(count, f"fast_constrained_w{count}")] = r
            # The same work without the grammar: each record stops at its constrained output's length, so
            # the difference is what the masks cost, not that JSON ends early.
            _, r = fast_run(model, prefix, suffixes, [len(t) for t, _ in first])
            res["fast_same_lengths"] = r
        del backend
    if "run_legacy" in parts and args.legacy:  # the same run path with the pre-issue-14 decoder: the baseline
        import extractor.backends.fast as fast_module
        legacy, current = legacy_decoder(args.legacy), fast_module.FastDecoder
        fast_module.FastDecoder = lambda *a, virtual=None, compile=False, **kw: legacy(*a, **kw)
        work = Path(args.out) / "work"
        backend = run_backend(model, work)
        _, res["run_path_legacy_warmup_s"] = timed(lambda: run_path(backend, work, 64, constrained=False))
        res["run_path_legacy"] = run_path(backend, work, args.n, constrained=False)
        fast_module.FastDecoder = current
        del backend
    if "adapters_run" in parts:
        adapters_run(res, model, Path(args.out) / "work", args.n)
    del model
    import gc
    gc.collect()  # the run path's decoder (its KV cache) sits in reference cycles: free it before the 7B model
    empty_cache()
    if "check_families" in parts:
        res["check_families"] = check_families()
    if "check_families_compiled" in parts:
        res["check_families_compiled"] = check_families(compile=True)
    if "families" in parts:
        torch._dynamo.reset()
        families(res, args.n, args.families.split(",") if args.families else None, compile="eager" not in parts)
    if "7b" in parts:
        torch._dynamo.reset()  # the 1.5B decoders' compiled code is of no use to the 7B model
        model, params7 = build("7b")
        # Compiled, as HFBackend builds the decoder on CUDA; fixed and EOS variant on the same weights.
        for key, budgets in (("fast_7b_compiled", NEW), ("fast_7b_eos_compiled", stops)):
            _, r = fast_run(model, prefix, suffixes, budgets, compile=True)
            r["params"] = params7
            res[key] = r
    text = table(res)
    print(text, flush=True)
    (Path(args.out) / "gpu_fast.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
