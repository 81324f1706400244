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


def test_hf_backend_fast_path_equals_plain_path(tmp_path, tiny_model, run_cli):
    """`extractor run --fast on` (shared prompt prefix found, FastDecoder) gives the plain path's outputs."""
    from tests.conftest import read_jsonl, synth_corpus
    corpus, _ = synth_corpus(tmp_path, n=10)
    outs = {}
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.jsonl"
        result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                         "--max-new-tokens", "20", "--quiet", "--fast", mode, "--batch-size", "4", "--window", "6")
        assert result.exit_code == 0, result.output
        outs[mode] = read_jsonl(out)
    for a, b in zip(outs["off"], outs["on"]):
        assert (a["id"], a["raw"], a["status"], a["prompt_tokens"], a["output_tokens"], a["finish_reason"]) == \
               (b["id"], b["raw"], b["status"], b["prompt_tokens"], b["output_tokens"], b["finish_reason"])


def test_common_prefix_leaves_each_sequence_a_token():
    from extractor.backends.fast import common_prefix
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[5, 6], [7]]) == []
