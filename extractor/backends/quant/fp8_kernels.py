"""The per-token activation quantization of FP8 layers as one Triton kernel: each program reads its row twice
(absmax, then scaled codes) and writes one byte per value and one fp32 scale. In torch the same takes about six
kernels and fp32 temporaries the size of the activation, which cost more than the FP8 GEMM saves (issue 28's
matmul measurements: 1,368-1,506 TFLOP/s for the GEMM alone, 556-1,017 with torch's quantization in front).
Compiled forwards keep the torch ops (Inductor fuses them into one kernel itself); eager forwards use this one.

Exactly `fp8.quantize_rows`: subnormal values counted as 0, the same absmax, the same scale (absmax times
fp32(1/448), fp32(1/448) for an all-zero row), the values' IEEE division by it and round-to-nearest-even cast,
so codes and scales are bit-equal (on an H100, 2026-12-05). `works_on` proves that on the device before the
kernel is used; where it cannot, the torch ops run.
"""
from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of torch; absent (or unusable) elsewhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

_PROVEN: dict = {}  # (device, dtype) -> whether the kernel equals the torch ops there

if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
            v = tl.where(tl.abs(v) < 1.1754943508222875e-38, 0.0, v)  # fp8.SMALLEST_NORMAL: subnormals count as 0
            peak = tl.maximum(peak, tl.abs(v))
        amax = tl.max(peak, axis=0)
        # literals (fp8.AMAX_FLOOR = 2**-117, fp8.RECIP_E4M3_MAX = 1/448): Triton reads no plain globals
        scale = tl.where(amax > 0, tl.maximum(amax, 6.018531076210112e-36), 1.0) * 0.002232142857142857
        tl.store(s_ptr + row, scale)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
            v = tl.where(tl.abs(v) < 1.1754943508222875e-38, 0.0, v)
            code = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            tl.store(q_ptr + row * cols + offs, code.to(tl.float8e4nv), mask=offs < cols)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_rows` of a 2-D tensor whose rows are contiguous, in one kernel: (e4m3 [rows, cols],
    fp32 scales [rows, 1])."""
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, triton.next_power_of_2(cols))
        _quantize_rows_kernel[(rows,)](x, q, scale, cols, x.stride(0), BLOCK=block, num_warps=8 if block >= 2048
                                       else 4)
    return q, scale


def works_on(device: torch.device, dtype: torch.dtype, reference) -> bool:
    """Triton runs here and its codes and scales equal `reference`'s (the torch ops, fp8.quantize_rows) bit for
    bit on awkward rows (zeros, one huge value, values at e4m3 rounding boundaries, an absmax under the scale's
    floor, subnormals, a width that is not a power of two); remembered per (device, dtype). On the CPU
    interpreter it fails: the interpreter's e4m3 cast drops the carry when a value rounds up into the next
    binade (124.8 -> 64, not 128), so CPUs keep the torch ops."""
    key = (str(device), dtype)
    if key not in _PROVEN:
        _PROVEN[key] = triton is not None and _agrees(device, dtype, reference)
    return _PROVEN[key]


def proven(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `works_on` has proven the kernel for (device, dtype) — no check of its own, so a forward
    being captured into a CUDA graph never runs one (quantize_model proves the kernel at load)."""
    return _PROVEN.get((str(device), dtype), False)


def _agrees(device, dtype, quantize_rows) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((6, 5000), generator=gen) * 3
    x[1] = 0.0
    x[2, 17] = 6e4
    x[3] = torch.linspace(-448, 448, 5000)  # steps between codes, at and around rounding boundaries
    x[4] *= 1e-37  # an absmax under fp8.AMAX_FLOOR: the scale is the floor's (the kernel holds it as a literal)
    x[5] *= 1e-38  # subnormals among normal values (in bf16 too): they count as 0 in both
    x = x.to(device, dtype)
    try:
        q, s = quantize_rows_triton(x)
    except Exception as exc:  # noqa: BLE001 - an unsupported GPU or Triton build: the torch ops run
        import warnings
        warnings.warn(f"the Triton FP8 quantization kernel does not run here ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); activations are quantized with torch ops (slower)", stacklevel=2)
        return False
    want_q, want_s = quantize_rows(x)
    return bool(torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s))
