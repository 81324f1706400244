"""FastDecoder (issue 6 work in progress): greedy outputs equal `generate`, with the shared prefix prefilled
once, fewer slots than requests (slots refilled as sequences finish) and EOS handling."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from extractor.backends.fast import FastDecoder


@pytest.mark.parametrize("slots,refill,spans", [(3, 2, ()), (8, 8, (40, 56, 72)), (1, 1, (48,))])
def test_fast_decoder_equals_generate(tiny_model, slots, refill, spans):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rng = random.Random(slots)
    prefix = [rng.randrange(5, 1000) for _ in range(25)]
    suffixes = [[rng.randrange(5, 1000) for _ in range(rng.randint(2, 30))] for _ in range(9)]
    eos = [model.config.eos_token_id]
    decoder = FastDecoder(model, slots=slots, max_len=128, eos_ids=eos)
    decoder.set_prefix(prefix)
    decoder.set_spans(spans)  # attention over the smallest span that holds the live positions
    got = decoder.generate(suffixes, max_new=14, refill=refill)
    for suffix, (tokens, finish) in zip(suffixes, got):
        ids = torch.tensor([prefix + suffix])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if eos[0] in ref:
            ref = ref[: ref.index(eos[0]) + 1]
        assert tokens == ref
        assert finish == ("stop" if tokens[-1] == eos[0] else "length")
