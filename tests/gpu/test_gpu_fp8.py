"""FP8 on the GPU: `torch._scaled_mm` with row-wise scales against the emulation the CPU suite proves the fast
path on (quantize, dequantize with the same scales, multiply in fp32). Both sides use the same e4m3 codes and
scales, so they differ only in the GEMM's accumulation order and the bf16 rounding of its output: the bound
below is two bf16 steps (2 * 2^-8) of each output row's largest value. A wrong scale, a transposed operand or
a lost per-token scale is off by far more. Runs where CUDA with compute capability >= 8.9 is."""
from __future__ import annotations

import copy

import pytest
import torch

from extractor.backends.quant.fp8 import MIN_CAPABILITY, FP8Linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or
                                torch.cuda.get_device_capability() < MIN_CAPABILITY,
                                reason="needs a CUDA device with FP8 units")

SHAPES = [(16, 3584, 4608), (512, 3584, 18944), (2048, 18944, 3584), (7, 1536, 8960)]  # 7B/1.5B prefill shapes


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_scaled_mm_equals_emulation_within_two_bf16_steps(m, k, n):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    x[0] *= 100  # one loud token: per-token scales must keep it from crushing the others
    real = FP8Linear.from_linear(linear, emulate=False)
    emulated = FP8Linear.from_linear(linear, emulate=True)
    assert torch.equal(real.weight.view(torch.uint8), emulated.weight.view(torch.uint8))
    got, want = real(x).float(), emulated(x.float()).float()
    bound = 2 * 2.0 ** -8 * want.abs().amax(dim=-1, keepdim=True)
    worst = ((got - want).abs() / bound).max().item()
    assert worst <= 1.0, f"[{m}x{k}] @ [{k}x{n}]: _scaled_mm off the emulation by {worst:.2f}x the bound"
    exact = linear(x).float()  # and FP8 stays near bf16 itself (both sides quantized: a few percent)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 0.08, f"FP8 product {rel:.3f} (relative) from the bf16 product"


def test_fast_path_with_fp8_picks_the_emulations_top_tokens():
    """The 1.5B shape (fewer layers) with --quantize fp8's layers, FastDecoder with graphs: bf16 FP8 GEMMs, each
    token they pick scored by the fp32 emulation of the same codes (its plain forward over the same tokens).
    Not token-equal — bf16 against fp32, and a near-tie in an activation's absmax moves its e4m3 codes — so each
    pick must be among the emulation's top 16 and at least half its top 1. Measured on CPU with a bf16 model
    standing in for the FP8 GEMM (8 records, 8 tokens): 47 of 64 top 1, worst rank 4; every other output
    channel of down_proj at half scale: 4 of 64, ranks up to 3,838. Random weights at initializer_range 0.2
    are chaotic (bf16 and fp32 of the unquantized model agreed on 2 of 8 first tokens on an H100), so 0.02."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from extractor.backends.fast import FastDecoder
    from extractor.backends.quant.fp8 import quantize_model
    from tests.gpu.test_gpu_decoder import QWEN_1_5B, anchor_ids

    cfg = Qwen2Config(**dict(QWEN_1_5B, num_hidden_layers=4), max_position_embeddings=4096, initializer_range=0.02)
    prefix, suffixes = anchor_ids(8)
    torch.manual_seed(0)
    with torch.device("cuda"):  # one set of weights: random draws in bf16 and fp32 differ on CUDA
        emulated = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    real = copy.deepcopy(emulated).to(torch.bfloat16)
    quantize_model(emulated, emulate=True)
    codes = {name: (m.weight, m.weight_scale.flatten()) for name, m in emulated.named_modules()
             if isinstance(m, FP8Linear)}  # and one set of e4m3 codes and scales
    quantize_model(real, emulate=False, given=codes)
    dec = FastDecoder(real, prefix, slots=4, unique_len=max(map(len, suffixes)) + 24, eos_ids=[])
    dec.capture()
    picked = [tokens for tokens, _ in dec.generate(suffixes, max_new=16, refill=2)]
    assert dec._graphs, "no CUDA graph was captured: the GPU path this test is for did not run"
    ranks = []
    with torch.inference_mode():
        for suffix, tokens in zip(suffixes, picked):
            ids = torch.tensor([prefix + suffix + tokens[:-1]], device="cuda")
            logits = emulated(ids).logits[0, len(prefix) + len(suffix) - 1:].float()
            ranks += [int((row > row[t]).sum()) for row, t in zip(logits, tokens)]
    assert max(ranks) < 16, f"a token the FP8 path picked is rank {max(ranks)} in the emulation: {ranks}"
    assert sum(r == 0 for r in ranks) >= len(ranks) // 2, f"the emulation's top 1 only {ranks.count(0)} times: {ranks}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_activation_quantization_is_bit_equal_to_the_torch_ops(dtype):
    from extractor.backends.quant import fp8_kernels
    from extractor.backends.quant.fp8 import quantize_rows
    assert fp8_kernels.works_on(torch.device("cuda"), dtype, quantize_rows), "the kernel's own check failed here"
    torch.manual_seed(0)
    for rows, cols in ((4096, 18944), (300, 3584), (1, 1536)):
        x = (torch.randn(rows, cols, device="cuda") * torch.rand(rows, 1, device="cuda") * 50).to(dtype)
        q, s = fp8_kernels.quantize_rows_triton(x)
        want_q, want_s = quantize_rows(x)
        assert torch.equal(s, want_s), (rows, cols)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), (rows, cols)
