"""Tiny random configs of every model family on the fast path's list, with non-default values for the fields
each family's forward reads (multipliers, softcaps, windows shorter than the prompts, partial rotary, tied and
untied embeddings, MoE routing), so that a fast path dropping any of them decodes differently."""
from __future__ import annotations

import shutil
from pathlib import Path

WINDOW = 24  # shorter than every test prompt (the shared prefix alone is longer)
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, initializer_range=0.2)

OVERRIDES: dict[str, dict] = {
    "llama": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=WINDOW, tie_word_embeddings=False),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False, attention_bias=True),
    "qwen3_moe": dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                      mlp_only_layers=[1], norm_topk_prob=True, tie_word_embeddings=False),
    "gemma": dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
                   query_pre_attn_scalar=24, tie_word_embeddings=False),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=10.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                            "factor": 4.0}}),
    "glm": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                attention_bias=True, tie_word_embeddings=False),
    "glm4": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 attention_bias=True, tie_word_embeddings=False),
    "phi3": dict(sliding_window=WINDOW, tie_word_embeddings=False, original_max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "granite": dict(embedding_multiplier=6.0, residual_multiplier=0.4, attention_multiplier=0.05,
                    logits_scaling=0.5, tie_word_embeddings=False),
    "olmo2": dict(tie_word_embeddings=False),
    "cohere": dict(logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True),
    "stablelm": dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "smollm3": dict(no_rope_layer_interval=2, tie_word_embeddings=True),
}


def family_config(model_type: str, vocab_size: int, eos: int, pad: int):
    from transformers import CONFIG_MAPPING
    fields = {**COMMON, **OVERRIDES[model_type]}
    if model_type in ("cohere", "phi3"):  # their head dim is hidden / heads
        fields.pop("head_dim")
    if model_type == "smollm3":
        fields["no_rope_layers"] = [int((i + 1) % 2 != 0) for i in range(COMMON["num_hidden_layers"])]
    return CONFIG_MAPPING[model_type](vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                                      **fields)


def build_family_model(tokenizer_dir: Path, model_type: str, out: Path, seed: int = 0) -> Path:
    """A random-weight model of `model_type` saved beside a copy of the tiny model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(model_type, len(tok), tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def _perturb_norms(model, seed: int) -> None:
    """Norm weights start at 1 (or 0 for Gemma's 1 + w): random ones make a norm a family gets wrong show."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
