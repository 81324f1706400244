"""Several LoRA adapters mixed in one FastDecoder on the GPU (CUDA graphs, the grouped Triton kernel), token for
token against peft's own `generate` with each record's adapter active, in fp32. The CPU suite checks mixing
on CPU (tests/test_lora_mixed.py); this runs where CUDA is: `pytest tests/gpu` on the device machine."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ADAPTERS = ("a0", "a1", "a2", "a3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)


def four_adapters(model):
    """Four rank-16 LoRA adapters on every linear layer, A random, B random and large enough (std 1) that
    each adapter changes the greedy tokens."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name=ADAPTERS[0], autocast_adapter_dtype=False)
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, config, autocast_adapter_dtype=False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for module in peft_model.modules():
            for attr, std in (("lora_A", 0.01), ("lora_B", 1.0)):
                for layer in getattr(module, attr, {}).values() if hasattr(module, attr) else ():
                    w = layer.weight
                    w.copy_((torch.randn(w.shape, generator=gen) * std).to(w.device, w.dtype))
    return peft_model.eval()


def reference(peft_model, ids: list[int], group: int, new: int) -> list[int]:
    """peft's greedy tokens with group's adapter active (group 0: base weights)."""
    prompt = torch.tensor([ids], device="cuda")
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    if group == 0:
        with peft_model.disable_adapter():
            return peft_model.generate(input_ids=prompt, **kw)[0, len(ids):].tolist()
    peft_model.set_adapter(ADAPTERS[group - 1])
    return peft_model.generate(input_ids=prompt, **kw)[0, len(ids):].tolist()


def test_mixed_adapters_equal_peft_generate_fp32_on_the_gpu():
    """2 records per group (base and each adapter) through one mixed decoder of 4 slots with refills."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from extractor.backends.fast import FastDecoder
    from extractor.backends.lora_mixed import MixedLoRA
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_1_5B, max_position_embeddings=4096),
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
    peft_model = four_adapters(model)
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 100000) for _ in range(320)]
    groups = [i % (len(ADAPTERS) + 1) for i in range(2 * (len(ADAPTERS) + 1))]
    suffixes = [[rng.randrange(1000, 100000) for _ in range(rng.randint(64, 448))] for _ in groups]
    new = 32
    mixed = MixedLoRA(peft_model, list(ADAPTERS))
    try:
        dec = FastDecoder(peft_model.get_base_model(), prefix, slots=4, unique_len=max(map(len, suffixes)) + new,
                          eos_ids=[], adapters=mixed)
        dec.capture()
        got = dec.generate(suffixes, max_new=new, refill=2, groups=groups)
        with mixed.off():
            refs = [reference(peft_model, prefix + s, g, new) for s, g in zip(suffixes, groups)]
            base = [reference(peft_model, prefix + s, 0, new) for s in suffixes]
    finally:
        mixed.close()
    assert any(r != b for r, b, g in zip(refs, base, groups) if g), "the adapters leave the tokens the base's"
    for i, ((tokens, _), ref, g) in enumerate(zip(got, refs, groups)):
        assert tokens == ref, f"record {i} (group {g}) differs from peft's generate (attention {dec.attention})"
