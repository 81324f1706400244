"""Issue 6, first measurement: the anchor workload through FastDecoder vs static batched `generate`.

Random-weight model from the Qwen2.5-1.5B config (bf16), N prompts of a 320-token shared prefix plus 64–448
unique tokens (random ids, seed 0), 128 new tokens each with EOS disabled. Same process, same card:
static batched `generate` (batch 128, length-sorted) as the baseline; FastDecoder eager and with the decode
step captured as a CUDA graph. Also: the compute floor (2 · params · tokens at a bf16 matmul rate measured
here) and greedy agreement with `generate` on a sample.

    python bench/gpu_fast.py --n 1024 --slots 256 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)
PREFIX, NEW = 320, 128


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def workload(n: int):
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 100000) for _ in range(PREFIX)]
    suffixes = [[rng.randrange(1000, 100000) for _ in range(rng.randint(64, 448))] for _ in range(n)]
    return prefix, suffixes


def static_generate(model, prompts, batch):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [None] * len(prompts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i], device="cuda")
            mask[j, width - len(prompts[i]):] = 1
        o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        for j, i in enumerate(idx):
            outs[i] = o[j, width:].tolist()
    torch.cuda.synchronize()
    return outs


def fp32_check(model, prefix, suffixes) -> dict:
    """Greedy token-for-token agreement with `generate` (batch 1) in fp32, graph mode, 32 new tokens."""
    from extractor.backends.fast import FastDecoder
    model = model.float()
    fd = FastDecoder(model, slots=4, max_len=PREFIX + 448 + 40, eos_ids=[])
    fd.set_prefix(prefix)
    fd.capture()
    got = fd.generate(suffixes, max_new=32, refill=4)
    equal = 0
    with torch.inference_mode():
        for s, (toks, _) in zip(suffixes, got):
            ids = torch.tensor([prefix + s], device="cuda")
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
            equal += toks == ref
    model.to(torch.bfloat16)
    return {"records": len(suffixes), "equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--refill", type=int, default=64)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config
    import transformers
    from extractor.backends.fast import FastDecoder
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "n": args.n, "slots": args.slots, "bf16_tflops": matmul_tflops()}
    cfg = Qwen2Config(**QWEN_1_5B, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in model.parameters())
    prefix, suffixes = workload(args.n)
    prompts = [prefix + s for s in suffixes]
    tokens_out = args.n * NEW
    res["compute_floor_tok_s"] = tokens_out / (2 * params * (sum(map(len, prompts)) + tokens_out)
                                               / (res["bf16_tflops"] * 1e12))
    with torch.inference_mode():
        t = time.perf_counter()
        base = static_generate(model, prompts, 128)
        res["static_bs128_tok_s"] = tokens_out / (time.perf_counter() - t)
    print(res, flush=True)
    max_len = PREFIX + 448 + NEW + 2
    for mode in ("eager", "graph"):
        fd = FastDecoder(model, slots=args.slots, max_len=max_len, eos_ids=[])
        fd.set_prefix(prefix)
        fd.set_spans(range(PREFIX + 128, max_len, 128))
        if mode == "graph":
            fd.capture()
        fd.generate(suffixes[:8], max_new=4, refill=args.refill)  # warm-up
        torch.cuda.synchronize()
        fd.stats = {k: 0 for k in fd.stats}
        t = time.perf_counter()
        got = fd.generate(suffixes, max_new=NEW, refill=args.refill)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        stats = dict(fd.stats)
        produced = sum(len(toks) for toks, _ in got)
        same = sum(toks == ref for (toks, _), ref in zip(got, base))
        first16 = sum(toks[:16] == ref[:16] for (toks, _), ref in zip(got, base))
        res[f"fast_{mode}"] = {"tok_s": produced / dt, "records_s": args.n / dt, "seconds": dt,
                               "ratio_to_static_bs128": produced / dt / res["static_bs128_tok_s"],
                               "fraction_of_floor": produced / dt / res["compute_floor_tok_s"],
                               "equal_to_generate": same, "first16_equal": first16, "time_split": stats}
        print(mode, res[f"fast_{mode}"], flush=True)
        del fd
        torch.cuda.empty_cache()
    res["fp32_check"] = fp32_check(model, prefix, suffixes[:8])
    print("fp32", res["fp32_check"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_fast.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
