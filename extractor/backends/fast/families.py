"""Which models the fast path takes: an explicit list of transformers model types, each proven by
tests/test_fast_families.py (fp32 greedy output of `extractor run --fast on` token for token equal to
`--fast off`, constrained and not, with refills and per-record budgets). Anything else decodes with plain
`generate`, and the run says why in one line.

The fast path runs the model's own forward with our attention function (runner.py), so a family is on the list
when its attention module hands everything that shapes attention to that function (scale, softcap, sliding
window) and keeps the rest (norms, rotary, multipliers) in its own code. `check_attention_kwargs` refuses a
layer that passes anything else with a value, instead of decoding it approximately.
"""
from __future__ import annotations

# model_type -> what is particular about the family (and why its test configs set what they set)
FAMILIES: dict[str, str] = {
    "llama": "rope scaling (llama3), attention/MLP biases",
    "mistral": "sliding window over the whole model",
    "qwen2": "q/k/v biases; per-layer sliding windows (use_sliding_window, max_window_layers)",
    "qwen3": "per-head q/k norms",
    "qwen3_moe": "sparse MoE blocks, router top-k",
    "gemma": "scaled embeddings, (1 + w) RMSNorm, GeLU MLP",
    "gemma2": "sandwich norms, attention and final logit softcapping, alternating sliding windows",
    "gemma3_text": "per-layer rotary (local base), q/k norms, sliding window pattern",
    "glm": "partial rotary (interleaved), fused gate_up",
    "glm4": "partial rotary, post-attention and post-MLP norms",
    "phi3": "fused qkv and gate_up projections, partial rotary",
    "granite": "embedding, residual and attention multipliers, logits scaling",
    "olmo2": "norms after attention and MLP, q/k norms over all heads",
    "cohere": "parallel attention and MLP, LayerNorm, logit scale",
    "stablelm": "partial rotary, LayerNorm, optional parallel residual and q/k LayerNorms",
    "smollm3": "rotary left out on some layers (no_rope_layers)",
}

# Attention-function keyword arguments that carry no math for us: positions (ours are in the cache layout),
# flags about outputs. Any other keyword with a value is refused.
_INERT = {"position_ids", "cache_position", "output_attentions", "use_cache", "position_embeddings",
          "past_key_values", "cache", "return_dict", "output_hidden_states", "dropout", "is_causal",
          "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


class FastPathError(RuntimeError):
    """The fast path cannot decode this model exactly; the message says why (one line)."""


# peft adapter types whose injected layers the fast path runs as part of the model's own forward, each proven
# by tests/test_fast_adapters.py (outputs equal to peft's own forward).
ADAPTER_TYPES = {"LORA"}


def refusal(model) -> str | None:
    """Why the fast path does not take this model (None: it does)."""
    adapters = getattr(model, "peft_config", None) or {}
    kinds = sorted({getattr(c.peft_type, "value", str(c.peft_type)) for c in adapters.values()})
    unproven = [k for k in kinds if k not in ADAPTER_TYPES]
    if unproven:
        return f"peft adapters of type {', '.join(unproven)} decode with plain generate"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type '{model_type}' is not on the fast path's list ({', '.join(sorted(FAMILIES))})"
    if getattr(model.config, "use_bidirectional_attention", False):
        return f"model type '{model_type}' with bidirectional attention"
    return None


def check_attention_kwargs(module, kwargs: dict) -> None:
    """Refuse what the fast path's attention does not implement: a non-causal layer, or a keyword that
    shapes attention (attention sinks, chunked attention, ...)."""
    if getattr(module, "is_causal", True) is False or kwargs.get("is_causal", True) is False:
        raise FastPathError(f"{type(module).__name__} attends bidirectionally")
    extra = sorted(k for k, v in kwargs.items() if k not in _INERT and v is not None and v is not False)
    if extra:
        raise FastPathError(f"{type(module).__name__} passes {', '.join(extra)} to its attention function, "
                            "which the fast path does not implement")
