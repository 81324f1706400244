"""What do several LoRA adapters mixed in one FastDecoder (backends/lora_mixed.py) cost against base weights?

The anchor workload (common.py), compiled as HFBackend builds the decoder on CUDA. Rows:
  base        the base FastDecoder on the N records;
  mixed_rr    4 rank-16 LoRA adapters on every linear layer (random A and B, std 0.01, bf16), the N records
              spread evenly (round robin), all in one mixed decoder;
  mixed_all   the same 4 adapters, every record once per adapter (4N requests) in one mixed decoder.
Each row: tok/s (output tokens) and its ratio to base; the mixed decoder's setup, warm-up and time split.
Token equality of mixed decoding with peft's own `generate` on the GPU (fp32, CUDA graphs, the grouped Triton
kernel) is a test: `pytest tests/gpu/test_gpu_lora_mixed.py`.

Writes OUT/gpu_lora_mixed.json.

    python bench/gpu/lora_mixed.py --out $OUT                 # one H200
    python bench/gpu/lora_mixed.py --smoke --out /tmp/lm      # tiny config on CPU: checks the script only
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common as c
from extractor.backends.fast import FastDecoder
from extractor.backends.lora_mixed import MixedLoRA

ADAPTERS = ("a0", "a1", "a2", "a3")


class GroupedDecoder(FastDecoder):
    """FastDecoder whose `generate` takes each suffix's adapter group from `group_of` (by the suffix list's
    identity), so common.fast_run's warm-up and timed calls (slices of one list) both carry groups."""

    group_of: dict[int, int] = {}

    def generate(self, suffixes, max_new, refill=None, constraint=None, groups=None):
        return super().generate(suffixes, max_new, refill, constraint,
                                groups=[self.group_of[id(s)] for s in suffixes])


def load_adapters(model):
    """Four rank-16 LoRA adapters on every linear layer, A and B random (std 0.01) in the model's dtype."""
    from peft import get_peft_model
    peft_model = get_peft_model(model, c.lora_config(1), adapter_name=ADAPTERS[0], autocast_adapter_dtype=False)
    for i, name in enumerate(ADAPTERS[1:], 2):
        peft_model.add_adapter(name, c.lora_config(i), autocast_adapter_dtype=False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for module in peft_model.modules():
            for attr in ("lora_A", "lora_B"):
                for layer in getattr(module, attr, {}).values() if hasattr(module, attr) else ():
                    w = layer.weight
                    w.copy_((torch.randn(w.shape, generator=gen) * 0.01).to(w.device, w.dtype))
    return peft_model.eval()


def mixed_run(model, mixed, prefix, suffixes, groups, compile: bool):
    GroupedDecoder.group_of = {id(s): g for s, g in zip(suffixes, groups)}
    _, r = c.fast_run(model, prefix, suffixes, c.NEW, decoder_cls=GroupedDecoder, compile=compile, adapters=mixed)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, not speed")
    args = parser.parse_args()
    if args.smoke:
        c.use_smoke()
        args.n = min(args.n, 24)
    cuda = c.DEVICE == "cuda"
    res = c.Results(Path(args.out), "gpu_lora_mixed", n=args.n)
    model, _ = c.build("1.5b")
    prefix, suffixes, _ = c.workload(args.n)
    with torch.inference_mode():
        _, res["base"] = c.fast_run(model, prefix, suffixes, c.NEW, compile=cuda)
    peft_model = load_adapters(model)
    mixed = MixedLoRA(peft_model, list(ADAPTERS))
    base_model = peft_model.get_base_model()
    with torch.inference_mode():
        res["mixed_rr"] = mixed_run(base_model, mixed, prefix, suffixes,
                                    [1 + i % len(ADAPTERS) for i in range(len(suffixes))], cuda)
        every = [list(s) for _ in ADAPTERS for s in suffixes]  # own lists: groups are looked up by identity
        res["mixed_all"] = mixed_run(base_model, mixed, prefix, every,
                                     [1 + i // len(suffixes) for i in range(len(every))], cuda)
    mixed.close()
    base = res["base"]["tok_s"]
    res["ratios_to_base"] = {k: res[k]["tok_s"] / base for k in ("mixed_rr", "mixed_all")}
    lines = [f"card: {res['card']}; torch {res['torch']}; N = {args.n}; {res['date']}", "",
             "| row | output tok/s | x base |", "| --- | --- | --- |",
             f"| base FastDecoder | {base:,.0f} | 1.00x |"]
    lines += [f"| {k} (4 adapters, one mixed decoder) | {res[k]['tok_s']:,.0f} | {v:.2f}x |"
              for k, v in res["ratios_to_base"].items()]
    res.write_table("\n".join(lines))


if __name__ == "__main__":
    main()
