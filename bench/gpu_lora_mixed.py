"""Issue 15 harness: several LoRA adapters mixed in one FastDecoder (lora_mixed.py), against the base fast path.

Anchor workload (bench/gpu_fast.py: Qwen2.5-1.5B config, bf16, 320-token shared prefix, 64-448 own tokens,
128 new tokens, EOS off), compiled as HFBackend builds the decoder on CUDA. Rows:
  base        the base FastDecoder on the N records;
  mixed_rr    4 rank-16 LoRA adapters on every linear layer (random A and B, std 0.01, bf16), the N records
              spread evenly (round robin), all in one mixed decoder;
  mixed_all   the same 4 adapters, every record once per adapter (4N requests) in one mixed decoder.
Each row: tok/s (output tokens) and its ratio to base; the mixed decoder's setup, warm-up and time split.
Then fp32_check: in float32 on this device (CUDA graphs, the grouped Triton kernel; the compiled forward with
--check-compiled), 2 records per group (base and each adapter) through one mixed decoder of 4 slots with refills,
token for token against peft's own `generate` with that adapter active.

    python bench/gpu_lora_mixed.py --out $OUT          # one H200
    python bench/gpu_lora_mixed.py --smoke --out /tmp/lm   # tiny config on CPU: checks the harness only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gpu_fast as gf  # noqa: E402 - the path first
from extractor.backends.fast import FastDecoder  # noqa: E402
from extractor.backends.lora_mixed import MixedLoRA  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3")


class Results(gf.Results):
    """gpu_fast's Results, written to gpu_lora_mixed.json."""

    def __setitem__(self, key, value):
        self.data[key] = value
        print(key, json.dumps(value, default=str), flush=True)
        (self.out / "gpu_lora_mixed.json").write_text(json.dumps(self.data, indent=1, default=str))


class GroupedDecoder(FastDecoder):
    """FastDecoder whose `generate` takes each suffix's adapter group from `group_of` (by the suffix list's
    identity), so gpu_fast.fast_run's warm-up and timed calls (slices of one list) both carry groups."""

    group_of: dict[int, int] = {}

    def generate(self, suffixes, max_new, refill=None, constraint=None, groups=None):
        return super().generate(suffixes, max_new, refill, constraint,
                                groups=[self.group_of[id(s)] for s in suffixes])


def load_adapters(model):
    """Four rank-16 LoRA adapters on every linear layer, A and B random (std 0.01) in the model's dtype."""
    from peft import get_peft_model
    peft_model = get_peft_model(model, gf._lora_config(1), adapter_name=ADAPTERS[0], autocast_adapter_dtype=False)
    for i, name in enumerate(ADAPTERS[1:], 2):
        peft_model.add_adapter(name, gf._lora_config(i), autocast_adapter_dtype=False)
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
    _, r = gf.fast_run(model, prefix, suffixes, gf.NEW, decoder_cls=GroupedDecoder, compile=compile,
                       adapters=mixed)
    return r


def fp32_check(peft_model, prefix, suffixes, compile: bool, new: int = 32) -> dict:
    """Mixed decoding against peft's forward, float32, on this device."""
    peft_model.float()
    with torch.no_grad():  # adapters strong enough to change the tokens (std 0.01 leaves them the base's)
        for module in peft_model.modules():
            for layer in getattr(module, "lora_B", {}).values() if hasattr(module, "lora_B") else ():
                layer.weight.mul_(100)
    mixed = MixedLoRA(peft_model, list(ADAPTERS))
    records = [(list(s), g) for i, s in enumerate(suffixes[: 2 * (len(ADAPTERS) + 1)]) for g in [i % (len(ADAPTERS) + 1)]]
    dec = FastDecoder(peft_model.get_base_model(), prefix, slots=4, unique_len=max(len(s) for s, _ in records) + new,
                      eos_ids=[], adapters=mixed, compile=compile)
    dec.capture()
    got = dec.generate([s for s, _ in records], max_new=new, refill=2, groups=[g for _, g in records])
    equal, per_group, differ = 0, {}, 0  # differ: adapter records whose tokens are not the base's
    with mixed.off():
        for (s, g), (tokens, _) in zip(records, got):
            ids = torch.tensor([prefix + s], device=gf.DEVICE)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
            if g == 0:
                with peft_model.disable_adapter():
                    ref = peft_model.generate(input_ids=ids, **kw)
            else:
                peft_model.set_adapter(ADAPTERS[g - 1])
                ref = peft_model.generate(input_ids=ids, **kw)
            ref = ref[0, ids.shape[1]:].tolist()
            with peft_model.disable_adapter():
                base_ref = peft_model.generate(input_ids=ids, **kw)[0, ids.shape[1]:].tolist()
            differ += ref != base_ref
            same = tokens == ref
            equal += same
            per_group[g] = per_group.get(g, 0) + same
    mixed.close()
    del dec
    return {"records": len(records), "new_tokens": new, "equal": equal, "equal_per_group": per_group,
            "adapter_records_unlike_base": differ,
            "compiled": compile, "attention": "triton" if gf.DEVICE == "cuda" else "torch"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the harness, not speed")
    parser.add_argument("--check-compiled", action="store_true",
                        help="the fp32 check through torch.compile too (an H200 took over 200 s compiling the "
                             "fp32 model: past one call with the rows; eager it checks the kernels in seconds)")
    args = parser.parse_args()
    if args.smoke:
        gf.DEVICE, gf.PREFIX, gf.NEW = "cpu", 24, 12
        gf.QWEN["1.5b"] = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=256, vocab_size=151936, tie_word_embeddings=True, head_dim=32)
        args.n = min(args.n, 24)
    cuda = gf.DEVICE == "cuda"
    import transformers
    res = Results(Path(args.out))
    res["card"] = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    res["torch"], res["transformers"], res["n"] = torch.__version__, transformers.__version__, args.n
    model, _ = gf.build("1.5b")
    prefix, suffixes, _ = gf.workload(args.n)
    with torch.inference_mode():
        _, res["base"] = gf.fast_run(model, prefix, suffixes, gf.NEW, compile=cuda)
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
    torch._dynamo.reset()  # the fp32 model is another set of shapes and dtypes: compile afresh
    with torch.inference_mode():
        res["fp32_check"] = fp32_check(peft_model, prefix, suffixes, cuda and args.check_compiled)


if __name__ == "__main__":
    main()
