"""Loading a model folder's weights for inference: the device and dtype a run asked for, the attention
implementation the model needs, and one error line for what the folder's checks could not see."""
from __future__ import annotations

import pickle
from pathlib import Path

from extractor.backends.model_files import weights_size
from extractor.errors import ModelError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown --dtype '{dtype}'; use auto, bf16, fp16 or fp32")
    return getattr(torch, DTYPES[dtype])


def attention_for(path: Path, trust_remote_code: bool) -> dict:
    """Attention scores softcapped (Gemma-2): eager attention, since transformers' sdpa drops the softcap
    where it is the default (seen with 5.17), and the plain path must compute what the model defines."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return {}  # from_pretrained reports it
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"attn_implementation": "eager"} if getattr(text, "attn_logit_softcapping", None) else {}


def load_base_model(path: Path, dtype, device: str, trust_remote_code: bool, startup, quantize: str = "none"):
    """The model, its weights read straight to the device in the run's dtype (no CPU copy on CUDA), frozen.
    A quantized checkpoint (quantization_config) is dequantized to the run dtype at load; quantize "fp8" (or
    "fp8-emulated", from Python only) turns the decoder layers' linears into FP8 ones (quant/fp8.py). What was
    done is recorded for the run key (quant.description)."""
    from extractor.backends import quant
    if quantize not in (*quant.QUANTIZE, quant.EMULATED):
        raise ModelError(f"unknown --quantize '{quantize}'; use {' or '.join(quant.QUANTIZE)}")
    if quantize == "fp8":  # refused before any weight is read
        from extractor.backends.quant.fp8 import check_fp8_device
        check_fp8_device(device)
    scheme = checkpoint_scheme(path)
    base, fp8_saved = _load(path, dtype, device, trust_remote_code, startup, scheme)
    # Inference only; and peft freezes the base when an adapter loads: frozen from the start, the model
    # an adapter leaves behind is the one compiled code was traced on (requires_grad is in its guards).
    base.requires_grad_(False)
    what = scheme.describe(loaded_as=str(dtype).replace("torch.", "")) if scheme is not None else None
    if quantize != "none":
        from extractor.backends.quant.fp8 import quantize_model
        with startup.phase("quantizing to FP8", "e4m3 weights per output channel"):
            fp8 = quantize_model(base, emulate=quantize == quant.EMULATED, given=fp8_saved)
        if what is not None:
            what["loaded_as"] = "fp8" + (" (its own e4m3 weights and scales)" if fp8_saved else "")
        fp8 = {**fp8, "checkpoint": what} if what is not None else fp8
        what = fp8
    if what is not None:
        quant.record(base, what)
    return base


def checkpoint_scheme(path: Path):
    """The folder's quantization as its config.json states it (None: not quantized)."""
    from extractor.backends.model_files import read_json
    from extractor.backends.quant.schemes import read_scheme
    return read_scheme(read_json(path / "config.json"), str(path / "config.json"))


def _load(path: Path, dtype, device: str, trust_remote_code: bool, startup, scheme) -> tuple:
    """(model, the FP8 layers a checkpoint saved per channel: {module name: (e4m3 weight, scale)})."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from extractor.backends.startup import size_text
    cuda = device.startswith("cuda")
    size = weights_size(path)
    try:
        with startup.phase("loading weights", f"{size_text(size)} to {device}"):
            if scheme is not None:
                from extractor.backends.quant.checkpoints import load_quantized
                return load_quantized(path, scheme, dtype, device, trust_remote_code,
                                      attention_for(path, trust_remote_code))
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=any(path.glob("*.safetensors")) or None,
                **({"device_map": device} if cuda else {}),
                **attention_for(path, trust_remote_code))
            return (base if cuda else base.to(device)), {}
    except (OSError, ValueError, AttributeError, ImportError, KeyError, RuntimeError, TypeError,
            pickle.UnpicklingError, SafetensorError) as exc:  # what the folder's checks could not see
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: cannot load ({first})") from None
