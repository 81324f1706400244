"""Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) as peft's own forward defines them: the
virtual tokens' embeddings at positions 0..V-1 before the prompt (prompt tuning, P-tuning), or per-layer
K/V before it (prefix tuning), the prompt's tokens at positions V..

`generate` on a peft model does not compute that with peft 0.21 and transformers 5.x: it inserts the virtual
tokens again at every decode step (prompt tuning, P-tuning) or drops the prefix K/V (prefix tuning), so
outputs differ from peft's forward from the first or second token. The plain path therefore decodes these
adapters here, greedily (or sampling), over the base model with transformers' own cache; the fast path
takes the same virtual part as its shared prefix (fast.VirtualPrefix). tests/test_fast_adapters.py checks
both against peft's forward over the whole sequence, token by token.
"""
from __future__ import annotations

import torch

KINDS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def kind(peft_model) -> str:
    config = peft_model.peft_config["default"]
    return getattr(config.peft_type, "value", str(config.peft_type))


def _cache_layers(cache) -> list[tuple]:
    """(keys, values) per layer of what peft's get_prompt returns for prefix tuning (a transformers Cache
    or the legacy tuple), each [batch, KV heads, V, head dim]."""
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache]
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@torch.inference_mode()
def virtual_prefix(peft_model, dtype):
    """The adapter's virtual part, computed once (its prompt encoder, MLP or LSTM, runs here)."""
    from extractor.backends.fast import VirtualPrefix
    prompt = peft_model.get_prompt(batch_size=1)
    if kind(peft_model) == "PREFIX_TUNING":
        layers = _cache_layers(prompt)
        return VirtualPrefix(keys=[k[0].to(dtype) for k, _ in layers], values=[v[0].to(dtype) for _, v in layers])
    return VirtualPrefix(embeds=prompt[0].to(dtype))


@torch.inference_mode()
def decode(peft_model, virtual, ids: list[int], max_new: int, eos_ids: list[int], temperature: float = 0.0,
           top_p: float = 1.0, processor=None) -> list[int]:
    """One record's new tokens (its EOS included), through the base model with transformers' cache.
    `virtual`: the adapter's virtual part (virtual_prefix), computed once for all records."""
    from transformers import DynamicCache
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    v_len, prompt = virtual.length, torch.tensor([ids], device=device)
    if virtual.embeds is not None:
        cache = DynamicCache(config=base.config)
        embeds = torch.cat((virtual.embeds.unsqueeze(0), base.get_input_embeddings()(prompt)), 1)
        out = base(inputs_embeds=embeds, position_ids=torch.arange(v_len + len(ids), device=device).unsqueeze(0),
                   past_key_values=cache, use_cache=True)
    else:  # a fresh cache holding the prefix K/V (the forward appends to it)
        cache = peft_model.get_prompt(batch_size=1)
        out = base(input_ids=prompt, position_ids=(v_len + torch.arange(len(ids), device=device)).unsqueeze(0),
                   attention_mask=torch.ones(1, v_len + len(ids), dtype=torch.long, device=device),
                   past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    while True:
        logits = out.logits[:, -1].float()
        if processor is not None:
            logits = processor(torch.tensor([ids + tokens], device=device), logits)
        token = _pick(logits[0], temperature, top_p)
        tokens.append(token)
        if token in eos_ids or len(tokens) >= max_new:
            return tokens
        position = v_len + len(ids) + len(tokens) - 1
        extra = {} if virtual.embeds is not None else {
            "attention_mask": torch.ones(1, position + 1, dtype=torch.long, device=device)}
        out = base(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[position]], device=device),
                   past_key_values=cache, use_cache=True, **extra)


def _pick(logits, temperature: float, top_p: float) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, index = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the smallest set whose mass reaches top_p
    ordered = ordered * keep
    return int(index[torch.multinomial(ordered / ordered.sum(), 1)])
