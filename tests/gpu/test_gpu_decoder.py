"""FastDecoder on the GPU, token for token against transformers' `generate` (fp32, so that no tie decides):
the anchor's model shape with CUDA graphs and the Triton decode kernel, and every family on the fast path's
list. The CPU suite checks the same in fp32 without graphs and with Triton's interpreter (tests/test_fast.py,
tests/test_fast_families.py); these run where CUDA is: `pytest tests/gpu` on the device machine."""
from __future__ import annotations

import random

import pytest
import torch

from tests.families import OVERRIDES, family_config
from tests.helpers import assert_decoder_equals_generate, generate_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)


def anchor_ids(n: int, prefix_len: int = 320):
    """The anchor workload's first records (bench/gpu/common.py: the same seed and ranges)."""
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 100000) for _ in range(prefix_len)]
    return prefix, [[rng.randrange(1000, 100000) for _ in range(rng.randint(64, 448))] for _ in range(n)]


def test_anchor_shape_fp32_equals_generate_with_graphs_and_triton():
    """8 records of the anchor through the Qwen2.5-1.5B shape in fp32: 4 slots (refills), 32 new tokens."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from extractor.backends.fast import FastDecoder
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_1_5B, max_position_embeddings=4096),
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
    prefix, suffixes = anchor_ids(8)
    dec = FastDecoder(model, prefix, slots=4, unique_len=max(map(len, suffixes)) + 40, eos_ids=[])
    dec.capture()
    got = dec.generate(suffixes, max_new=32, refill=2)
    assert dec._graphs, "no CUDA graph was captured: the GPU path this test is for did not run"
    for i, (s, (tokens, _)) in enumerate(zip(suffixes, got)):
        assert tokens == generate_reference(model, prefix + s, 32, []), \
            f"record {i} differs from generate (attention {dec.attention})"


@pytest.mark.parametrize("model_type", sorted(OVERRIDES))
def test_family_fp32_equals_generate_on_the_gpu(model_type):
    """Every family, a tiny fp32 config on the GPU with graphs and the Triton kernel: shared prefix, refills
    and per-record budgets, token for token equal to `generate`."""
    from transformers import AutoModelForCausalLM

    cfg = family_config(model_type, 1024, eos=2, pad=0)
    torch.manual_seed(0)
    # Softcapped attention loads eager, as the hf backend loads it (sdpa would drop the softcap).
    eager = {"attn_implementation": "eager"} if getattr(cfg, "attn_logit_softcapping", None) else {}
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **eager).eval()
    assert_decoder_equals_generate(model, seed=0, prefix_len=40, records=6, suffix_len=(2, 40), budget=(4, 24),
                                   slots=3, unique_len=72, refill=2, eos_ids=[2], capture=True, label=f"{model_type}:")
