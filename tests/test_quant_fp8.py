"""FP8 (W8A8) weights, emulated on CPU in fp32 (quantize, then dequantize with the same scales): the
quantization's arithmetic; which layers it takes and what stays in the run dtype; the fast path token for token
equal to `generate` on the same FP8 model for every family on the fast path's list; LoRA adapters over FP8
base weights (unmerged beside the FP8 layers, one at a time and mixed) and prompt-learning adapters over them
equal on both paths; the run key recording it; and `--quantize fp8` refused in one line where the device has no
FP8 units."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from extractor.backends.base import GenParams, Request
from extractor.backends.fast.families import FAMILIES
from extractor.backends.quant.fp8 import (AMAX_FLOOR, E4M3, E4M3_MAX, RECIP_E4M3_MAX, SMALLEST_NORMAL, FP8Linear,
                                          quantize_model, quantize_rows)
from tests.conftest import make_adapter, synth_corpus
from tests.families import build_family_model
from tests.helpers import assert_decoder_equals_generate

FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(FINITE, min_size=16, max_size=16), min_size=1, max_size=4))
@example([[0.0] * 15 + [3.2229864679470793e-44]])  # an fp32 subnormal absmax: its scale was 0
@example([[1e-37] * 8 + [5e-39] * 8])  # an absmax under the floor, and subnormals (they count as 0)
def test_rows_quantize_to_e4m3_with_absmax_scales(rows):
    raw = torch.tensor(rows, dtype=torch.float32)
    q, scale = quantize_rows(raw)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (len(rows), 1)
    x = torch.where(raw.abs() < SMALLEST_NORMAL, 0.0, raw)  # fp32 subnormals count as 0
    assert bool((q.float()[x == 0] == 0).all())
    amax = x.abs().amax(-1, keepdim=True)
    floored = torch.where(amax > 0, amax.clamp(min=AMAX_FLOOR), torch.ones_like(amax))
    assert torch.equal(scale, floored * RECIP_E4M3_MAX)
    back = q.float() * scale
    # e4m3: 3 mantissa bits (relative error at most 2^-4), subnormals below 2^-6 spaced 2^-9 apart
    assert bool(((back - x).abs() <= (x.abs() * 2 ** -4 + scale * 2 ** -10) * (1 + 1e-6)).all())
    assert bool((q.float().abs().amax(-1) <= E4M3_MAX).all())


def test_fp8_linear_emulates_what_the_scaled_gemm_computes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = FP8Linear.from_linear(linear, emulate=True)
    x = torch.randn(3, 5, 64)
    wq, ws = quantize_rows(linear.weight.detach())
    xq, xs = quantize_rows(x.reshape(-1, 64))
    # what _scaled_mm computes: (xq @ wq^T) scaled by each row's and each column's scale, then the bias
    want = ((xq.double() @ wq.double().t()) * xs.double() * ws.double().t()).float() + linear.bias.detach()
    got = fp8(x).reshape(-1, 48)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fp8.weight.dtype == E4M3 and fp8.compute_dtype == torch.float32
    assert not torch.equal(got, linear(x).reshape(-1, 48)), "the quantization must change the product"


@pytest.fixture(scope="module")
def family_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_families")
    built = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = build_family_model(tiny_model, model_type, root / model_type)
        return built[model_type]
    return get


def _fp8_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, quantize_model(model, emulate=True)


def test_decoder_linears_only_are_quantized(family_dir):
    model, what = _fp8_model(family_dir("llama"))
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert linears == {"lm_head"} and len(fp8) == 7 * 3
    assert {n.rsplit(".", 1)[-1] for n in fp8} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert what == {"method": "fp8", "weights": "e4m3 per output channel", "activations": "e4m3 per token, dynamic",
                    "layers": 21, "kept": ["embed_tokens", "lm_head"], "emulated": True,
                    "activation_kernel": "torch"}
    _, moe = _fp8_model(family_dir("qwen3_moe"))
    assert "moe experts" in moe["kept"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_fp8_fast_path_equals_generate(family_dir, model_type):
    """Shared prefix, two slots refilled one at a time, a budget per record, FP8 layers emulated: each output
    equals `generate` on the same FP8 model. In fp64: the quantizer is a step function, and the two paths'
    fp32 differences (attention kernels, batch shapes: 1e-7) move an activation across an e4m3 rounding
    boundary now and then (seen in fp32: qwen3 at the sixth token); in fp64 they stay below fp32's
    resolution, so the scales and codes the quantizer computes (in fp32) are the same on both paths. The MoE
    family runs fp32: its experts' grouped matmul takes no fp64."""
    dtype = torch.float32 if model_type == "qwen3_moe" else torch.float64
    model, _ = _fp8_model(family_dir(model_type), dtype)
    assert_decoder_equals_generate(model, seed=2, prefix_len=16, records=4, suffix_len=(2, 12), budget=(1, 8),
                                   slots=2, unique_len=32, refill=1, eos_ids=[model.config.eos_token_id])


# -- LoRA over FP8 base weights, through the backend ----------------------------------------------------
@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    from peft import LoraConfig

    from tests.test_fast_adapters import _one_step
    root = tmp_path_factory.mktemp("fp8_loras")
    return [make_adapter(tiny_model, "lora", root / "qv", seed=0),
            _one_step(tiny_model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"), root / "all", 1)]


def _requests(tmp_path, adapters):
    import json
    corpus, _ = synth_corpus(tmp_path, n=6)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    prefix = "从下面的职位描述中抽取要求，输出 JSON。\n"
    return [Request(prefix + t[:60], adapter=adapters[i % len(adapters)]) for i, t in enumerate(texts)]


def _backend(model, adapters, fast):
    from extractor.backends.hf import HFBackend
    return HFBackend(str(model), adapters=[str(a) for a in adapters], device="cpu", dtype="fp32", fast=fast,
                     batch_size=3, quantize="fp8-emulated", quiet=True)


def test_lora_over_fp8_unmerged_equals_plain(tmp_path, tiny_model, loras, capfd):
    """One adapter at a time: the fast path's merge is refused in one line (a merge would round the adapter to
    e4m3) and the LoRA layers run unmerged beside the FP8 layers, equal to peft's own forward."""
    params = GenParams(max_new_tokens=12)
    outs = {}
    for fast in ("off", "on"):
        backend = _backend(tiny_model, loras, fast)
        for adapter in [a.name for a in loras]:
            outs[fast, adapter] = [(g.text, g.output_tokens) for g in backend.generate(
                [Request(r.prompt, adapter=adapter) for r in _requests(tmp_path, [adapter])], params)]
        assert backend.identity()["quantization"]["method"] == "fp8"
    for adapter in [a.name for a in loras]:
        assert outs["on", adapter] == outs["off", adapter], adapter
    err = capfd.readouterr().err
    assert "the LoRA adapter cannot be merged (the base weights are FP8" in err and "Traceback" not in err


def test_mixed_loras_over_fp8_equal_plain(tmp_path, tiny_model, loras):
    """Requests of two adapters and base weights in one call: mixed in one decoder (the LoRA beside each FP8
    layer, per row) equals each adapter's own plain decoding."""
    names = [a.name for a in loras] + [None]
    params = GenParams(max_new_tokens=12)
    outs = {}
    for fast in ("off", "on"):
        backend = _backend(tiny_model, loras, fast)
        outs[fast] = [(g.text, g.output_tokens, g.decoder) for g in backend.generate(_requests(tmp_path, names), params)]
        if fast == "on":
            assert backend.weights.mix is not None, "the adapters must have decoded mixed"
    assert [o[:2] for o in outs["on"]] == [o[:2] for o in outs["off"]]
    assert {o[2] for o in outs["on"]} == {"fast"}


def test_quantize_fp8_refused_without_fp8_units(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=2)
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", tmp_path / "o.jsonl",
                     "--quantize", "fp8", "--device", "cpu", "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == ("error: --quantize fp8 needs a GPU with FP8 units (compute capability 8.9 or "
                                     "newer: Ada, Hopper); this device is cpu; drop --quantize")


@pytest.fixture(scope="module")
def prompt_learners(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_prompt_learning")
    return [make_adapter(tiny_model, kind, root / kind, seed=3) for kind in ("ptuning", "prefix", "prompt")]


def test_prompt_learning_over_fp8_equals_plain(tmp_path, tiny_model, prompt_learners):
    """P-tuning, prefix and prompt tuning over FP8 base weights: their virtual tokens (or prefix K/V) go in front
    of the FP8 layers, which they do not touch; each adapter's outputs with --fast on equal --fast off's."""
    params = GenParams(max_new_tokens=12)
    outs = {}
    for fast in ("off", "on"):
        backend = _backend(tiny_model, prompt_learners, fast)
        assert backend.identity()["quantization"]["method"] == "fp8"
        for adapter in [a.name for a in prompt_learners]:
            done = backend.generate([Request(r.prompt, adapter=adapter) for r in _requests(tmp_path, [adapter])],
                                    params)
            assert {g.decoder for g in done} == {"fast" if fast == "on" else "plain"}, (fast, adapter)
            outs[fast, adapter] = [(g.text, g.output_tokens) for g in done]
    for adapter in [a.name for a in prompt_learners]:
        assert outs["on", adapter] == outs["off", adapter], adapter
    assert len({tuple(outs["off", a.name]) for a in prompt_learners}) == 3  # each adapter changes what decodes
