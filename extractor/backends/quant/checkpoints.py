"""A quantized checkpoint (schemes.py) loaded as users download it: its safetensors read, every quantized
weight dequantized once to the run dtype (unpack.py), the model built from its config with quantization_config
left out (so transformers asks for no AWQ, GPTQ or compressed-tensors package) and the dequantized weights
loaded into it. FP8 weights saved with one scale per output channel or per tensor are also handed back as they
are, for FP8 layers (fp8.py) to run on their own values."""
from __future__ import annotations

from pathlib import Path

import torch

from extractor.backends.model_files import weight_files
from extractor.backends.quant import unpack
from extractor.backends.quant.schemes import Scheme
from extractor.errors import ModelError

FP8_SCALES = ("weight_scale", "weight_scale_inv")
IGNORED = ("input_scale", "input_scale_ub")  # static activation scales: activations are quantized per token


def load_quantized(path: Path, scheme: Scheme, dtype, device: str, trust_remote_code: bool, attention: dict):
    """(model in `dtype` on `device`, {module name: (e4m3 weight, fp32 scale [N])} of the FP8 layers saved per
    channel or per tensor). ModelError (one line) for a tensor that does not fit."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state, fp8 = read_state(path, scheme, dtype, device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **attention)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelError(f"{path}: tensor '{unexpected[0]}' has no place in the {config.model_type} model its "
                         f"config builds ({len(unexpected)} such); the hf backend reads dense layers of the "
                         f"{scheme.method} format only; dequantize it to bf16 first or run it with --backend vllm")
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise ModelError(f"{path}: no tensor for '{sorted(set(missing) - tied)[0]}' ({len(set(missing) - tied)} "
                         "missing); the download is incomplete, fetch the model again")
    model.tie_weights()
    _generation_config(model, path)
    return model, fp8


def _generation_config(model, path: Path) -> None:
    """from_config does not read generation_config.json (the EOS tokens are there)."""
    from transformers import GenerationConfig
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def read_state(path: Path, scheme: Scheme, dtype, device: str) -> tuple[dict, dict]:
    """The folder's tensors with every quantized weight dequantized: (state dict in `dtype` on `device`, the
    FP8 layers kept as saved)."""
    from safetensors import safe_open
    files = weight_files(path)
    if any(f.suffix != ".safetensors" for f in files):
        raise ModelError(f"{path}: a quantized checkpoint in {files[0].name}; the hf backend reads quantized "
                         "weights from safetensors only; convert it where it was made")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt", device="cpu") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    state, fp8 = {}, {}
    for prefix in _quantized_prefixes(raw, scheme):
        try:
            weight, kept = _dequantize(raw, prefix, scheme, device)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"{path}: {prefix}: {str(exc).splitlines()[0][:200]}; the checkpoint does not match "
                             f"its quantization_config ({scheme.method}); fetch the model again") from None
        state[f"{prefix}.weight"] = weight.to(dtype)
        if kept is not None:
            fp8[prefix] = kept
    for key, value in raw.items():
        if key.rsplit(".", 1)[-1] in IGNORED:
            continue
        state[key] = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return state, fp8


def _quantized_prefixes(raw: dict, scheme: Scheme) -> list[str]:
    if scheme.fp8:
        return [k[: -len(".weight")] for k, v in raw.items() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn]
    return [k[: -len(".qweight")] for k in raw if k.endswith(".qweight")]


def _dequantize(raw: dict, prefix: str, scheme: Scheme, device: str):
    """(fp32 weight [N, K], (e4m3 weight, fp32 scale [N]) or None), the tensors it used taken out of `raw`."""
    def take(name, required=True):
        value = raw.pop(f"{prefix}.{name}", None)
        if value is None and required:
            raise KeyError(f"no '{prefix}.{name}' beside the quantized weight")
        return None if value is None else value.to(device)
    if scheme.fp8:
        weight = take("weight")
        names = [n for n in FP8_SCALES if f"{prefix}.{n}" in raw]
        if len(names) != 1:
            raise KeyError(f"{'no' if not names else 'two'} weight scales ({' or '.join(FP8_SCALES)}) for an e4m3 weight")
        scale = take(names[0])
        if scheme.method == "fp8":
            unpack.block_shape(weight, scale, scheme.block)
        dense = unpack.fp8_weight(weight, scale)
        per_channel = scale.numel() == 1 or (scale.numel() == weight.shape[0] and (scale.ndim == 1 or scale.shape[-1] == 1))
        kept = (weight, scale.float().reshape(-1).expand(weight.shape[0]).contiguous()) if per_channel else None
        return dense, kept
    qweight, qzeros, scales = take("qweight"), take("qzeros"), take("scales")
    if scheme.method == "awq":
        return unpack.awq_weight(qweight, qzeros, scales, scheme.group), None
    return unpack.gptq_weight(qweight, qzeros, scales, take("g_idx", required=False), scheme.bits, scheme.group,
                              scheme.zero_offset), None
