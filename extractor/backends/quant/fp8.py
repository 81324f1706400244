"""FP8 (W8A8) linear layers: weights in float8 e4m3 with one scale per output channel (absmax / 448), set at
load; activations quantized per token at run time (absmax of each row / 448, e4m3). On a GPU with FP8 units
(compute capability 8.9 or newer) the product is `torch._scaled_mm` with row-wise scales; elsewhere FP8 is
refused, except in the emulation reachable from Python: quantize, then dequantize with exactly the same scales
and multiply in fp32, so CPU tests compare decoding paths token for token on the weights FP8 would run.

Only the decoder layers' nn.Linear modules are quantized (q/k/v/o, gate/up/down, fused qkv and gate_up where a
family has them); the embeddings, the LM head, norms and MoE experts and routers (parameters, not nn.Linear)
stay in the run dtype. A layer whose sides are not multiples of 16 (what the FP8 GEMM takes) stays too.
"""
from __future__ import annotations

import torch

from extractor.backends.quant import fp8_kernels
from extractor.errors import ModelError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
MIN_CAPABILITY = (8, 9)  # Ada, Hopper and newer have FP8 tensor cores
ALIGN = 16  # _scaled_mm needs both sides of the weight to be multiples of 16
KEPT_ALWAYS = ["embed_tokens", "lm_head"]


# The scale is absmax times 1/448 (as an fp32 constant), not absmax / 448: CUDA's torch divides a tensor by a
# Python number that way (a multiply by its reciprocal), one ulp off IEEE division for some absmaxes, and
# Triton and the CPU then do the same multiply, bit for bit (the kernel's proof failed on H100 and H200 until so).
RECIP_E4M3_MAX = 1.0 / E4M3_MAX
AMAX_FLOOR = 2.0 ** -117  # an absmax under it counts as it: its scale (~2^-125.8) stays a normal fp32 number
SMALLEST_NORMAL = 2.0 ** -126  # fp32's (and bf16's); a smaller magnitude counts as 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in e4m3 and its fp32 scale [rows, 1] (absmax × fp32(1/448); an all-zero row's
    scale fp32(1/448)): row ≈ q.float() * scale. The same function quantizes weights (rows: output channels) and
    activations (rows: tokens). An absmax below AMAX_FLOOR counts as AMAX_FLOOR: its scale would be an fp32
    subnormal or 0 (found by hypothesis: a row whose largest value was 3e-44 divided by a zero scale). Subnormal
    values count as 0, a rule any implementation can keep (GPU arithmetic may flush them); their codes would
    be 0 or tiny."""
    xf = x.float()
    xf = torch.where(xf.abs() < SMALLEST_NORMAL, torch.zeros_like(xf), xf)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax.clamp(min=AMAX_FLOOR), torch.ones_like(amax)) * RECIP_E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of e4m3 rows and their scales (the emulation's arithmetic, one rounding: the product)."""
    return q.float() * scale.float()


def quantize_activations(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows for the real FP8 GEMM: eager on a GPU, the one-kernel Triton version where it is proven
    bit-equal there (fp8_kernels); compiled, the torch ops, which Inductor fuses itself."""
    if (rows.is_cuda and not torch.compiler.is_compiling() and rows.stride(-1) == 1
            and fp8_kernels.proven(rows.device, rows.dtype)):
        return fp8_kernels.quantize_rows_triton(rows)
    return quantize_rows(rows)


def fp8_refusal(device: str) -> str | None:
    """Why --quantize fp8 cannot run on this device (None: it can)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        capability = torch.cuda.get_device_capability(index)
        if capability >= MIN_CAPABILITY:
            return None
        what = f"{torch.cuda.get_device_name(index)} (compute capability {capability[0]}.{capability[1]})"
    else:
        what = device
    return (f"--quantize fp8 needs a GPU with FP8 units (compute capability 8.9 or newer: Ada, Hopper); this device "
            f"is {what}; drop --quantize")


def check_fp8_device(device: str) -> None:
    why = fp8_refusal(device)
    if why is not None:
        raise ModelError(why)


class FP8Linear(torch.nn.Linear):
    """y = x W^T + b with W in e4m3 and one fp32 scale per output channel, x quantized per token. A subclass of
    nn.Linear so that peft wraps it with LoRA layers (their own weights in `compute_dtype`, which peft reads
    here instead of the weight's dtype); its weight cannot take a merged adapter (`MERGE_REFUSAL`).
    emulate: dequantize both sides with their scales and multiply in fp32 (any device)."""

    MERGE_REFUSAL = ("the base weights are FP8 (e4m3 with per-channel scales): a LoRA merged into them would be "
                     "rounded to e4m3")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype,
                 emulate: bool):
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight in the default dtype
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight.to(E4M3), requires_grad=False)
        self.register_buffer("weight_scale", scale.float().reshape(1, -1).contiguous())  # [1, N] for _scaled_mm
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.emulate = emulate
        # the emulation's weight, dequantized once (fp32; not saved with the model)
        self.register_buffer("weight_emulated", dequantize_rows(self.weight, self.weight_scale.t()) if emulate
                             else None, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, emulate: bool) -> "FP8Linear":
        q, scale = quantize_rows(linear.weight.detach())
        return cls(q, scale, linear.bias, linear.weight.dtype, emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_rows(rows) if self.emulate else quantize_activations(rows)
        if self.emulate:  # the product in fp32, or in the input's dtype where wider (fp64 tests)
            wide = torch.promote_types(x.dtype, torch.float32)
            y = dequantize_rows(xq, x_scale).to(wide) @ self.weight_emulated.to(wide).t()
        else:  # row-wise scales: a [M, 1], b [1, N], fp32; b column-major (the transpose of a row-major [N, K])
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, emulate={self.emulate}"


def decoder_layers(model) -> list:
    """The model's stack of decoder layers: the one ModuleList as long as the config's layer count."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise ModelError(f"--quantize fp8: no stack of {n} decoder layers found in {type(model).__name__}")


def quantize_model(model, emulate: bool, given: dict | None = None) -> dict:
    """Every nn.Linear in the decoder layers replaced by an FP8Linear, in place; returns the description the
    run key records. given: module name -> (e4m3 weight [N, K], fp32 scale [N]) a checkpoint saved in FP8
    per channel: those layers keep the checkpoint's own values instead of being quantized again."""
    given = given or {}
    names = {id(m): n for n, m in model.named_modules()}
    converted, kept = 0, set(KEPT_ALWAYS)
    for layer in decoder_layers(model):
        for child_name, child in list(layer.named_modules()):
            if type(child) is not torch.nn.Linear:
                if any(isinstance(p, torch.nn.Parameter) and p.ndim == 3 for p in child.parameters(recurse=False)):
                    kept.add("moe experts")
                continue
            if child.in_features % ALIGN or child.out_features % ALIGN:
                kept.add(child_name.rsplit(".", 1)[-1])
                continue
            name = names[id(child)]
            if name in given:
                weight, scale = given[name]
                fp8 = FP8Linear(weight, scale, child.bias, child.weight.dtype, emulate)
            else:
                fp8 = FP8Linear.from_linear(child, emulate)
            parent_name, _, attr = child_name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, fp8.to(child.weight.device))
            converted += 1
    if not converted:
        raise ModelError("--quantize fp8: the decoder layers hold no nn.Linear with sides that are multiples of 16")
    return {"method": "fp8", "weights": "e4m3 per output channel", "activations": "e4m3 per token, dynamic",
            "layers": converted, "kept": sorted(kept), "emulated": emulate,
            "activation_kernel": _activation_kernel(model, emulate)}


def _activation_kernel(model, emulate: bool) -> str:
    """Which code quantizes activations in eager forwards, proven here at load (never inside a graph capture)."""
    weight = model.get_input_embeddings().weight
    if emulate or weight.device.type != "cuda":
        return "torch"
    return "triton" if fp8_kernels.works_on(weight.device, weight.dtype, quantize_rows) else "torch"
