"""Quantized checkpoints as users download them, written here from a tiny random Llama by packers of this file's
own (independent of the loader's unpacking): compressed-tensors FP8 per channel, fbgemm_fp8, transformers' fp8
block-wise, AWQ GEMM, GPTQ with and without act-order (classic zero offset). Each loads through HFBackend with
exactly the weights of its dequantized reference (the same model saved plain with the dequantized values) and
decodes the same tokens on the fast path; the run key records the checkpoint's quantization. A
quantization_config the backend does not read is refused in one line before torch loads."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from extractor.backends.base import GenParams, Request
from extractor.backends.model_files import check_quantization
from extractor.errors import ModelError
from tests.conftest import synth_corpus
from tests.families import build_family_model

GROUP = 32
LINEAR = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")


def _pack(nibbles: np.ndarray, axis: int, order=range(8)) -> torch.Tensor:
    """Eight 4-bit values per int32 word along `axis`, value order[i] of each eight in bits 4i..4i+3."""
    x = np.moveaxis(nibbles.astype(np.uint32), axis, -1)
    x = x.reshape(*x.shape[:-1], -1, 8)
    words = np.zeros(x.shape[:-1], np.uint32)
    for i, j in enumerate(order):
        words |= x[..., j] << np.uint32(4 * i)
    return torch.from_numpy(np.moveaxis(words.view(np.int32), -1, axis).copy())


def _fp8_rows(w, scale_dtype):
    scale = (w.abs().amax(1, keepdim=True) / 448).to(scale_dtype)
    q = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale.float()


def _fp8_blocks(w, b=GROUP):
    n, k = w.shape
    blocks = w.reshape(n // b, b, k // b, b)
    scale = blocks.abs().amax((1, 3)) / 448
    full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)
    q = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale}, q.float() * full


def _int4_codes(w, rng, groups):
    n, k = w.shape
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(1, 16, (groups, n))
    s = torch.from_numpy(rng.uniform(0.005, 0.03, (groups, n))).half()
    return q, z, s


def _awq(w, rng):
    k = w.shape[1]
    q, z, s = _int4_codes(w, rng, k // GROUP)
    g = np.arange(k) // GROUP
    dense = (torch.from_numpy(q - z[g]).float() * s.float()[g]).t()
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    return {"qweight": _pack(q, 1, order), "qzeros": _pack(z, 1, order), "scales": s}, dense


def _gptq(act_order):
    def pack(w, rng):
        k = w.shape[1]
        q, z, s = _int4_codes(w, rng, k // GROUP)
        g = rng.permutation(np.arange(k) // GROUP) if act_order else np.arange(k) // GROUP
        dense = (torch.from_numpy(q - z[g]).float() * s.float()[g]).t()
        return {"qweight": _pack(q, 0), "qzeros": _pack(z - 1, 1), "scales": s,
                "g_idx": torch.from_numpy(g.astype(np.int32))}, dense
    return pack


CT_CONFIG = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "ignore": ["lm_head"], "config_groups": {"group_0": {
                 "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                    "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                       "dynamic": True}}}}
FORMATS = {
    "compressed-tensors": (lambda w, rng: _fp8_rows(w, torch.bfloat16), CT_CONFIG),
    "fbgemm_fp8": (lambda w, rng: _fp8_rows(w, torch.float32), {"quant_method": "fbgemm_fp8",
                                                                "activation_scale_ub": 1200.0}),
    "fp8": (lambda w, rng: _fp8_blocks(w), {"quant_method": "fp8", "activation_scheme": "dynamic",
                                            "weight_block_size": [GROUP, GROUP]}),
    "awq": (_awq, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}),
    "gptq": (_gptq(False), {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
                            "checkpoint_format": "gptq"}),
    "gptq-act-order": (_gptq(True), {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                                     "sym": False}),
}


@pytest.fixture(scope="module")
def plain_llama(tiny_model, tmp_path_factory):
    return build_family_model(tiny_model, "llama", tmp_path_factory.mktemp("ckpt") / "llama")


def _write(plain, root, fmt):
    """(quantized folder, its dequantized reference folder)."""
    pack, qconfig = FORMATS[fmt]
    rng = np.random.default_rng(7)
    state = load_file(plain / "model.safetensors")
    quantized, reference = {}, {}
    for key, value in state.items():
        if key.endswith(".weight") and any(p in key for p in LINEAR):
            parts, dense = pack(value, rng)
            prefix = key[: -len(".weight")]
            quantized.update({f"{prefix}.{name}": t.contiguous() for name, t in parts.items()})
            reference[key] = dense.contiguous()
        else:
            quantized[key] = reference[key] = value
    out = {}
    for name, tensors in (("q", quantized), ("ref", reference)):
        folder = root / f"{fmt}-{name}"
        shutil.copytree(plain, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        out[name] = folder
    config = json.loads((out["q"] / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out["q"] / "config.json").write_text(json.dumps(config))
    return out["q"], out["ref"]


def _backend(model, **kw):
    from extractor.backends.hf import HFBackend
    return HFBackend(str(model), device="cpu", dtype="fp32", fast="on", batch_size=3, quiet=True, **kw)


def _decode(backend, tmp_path):
    corpus, _ = synth_corpus(tmp_path, n=5)
    texts = [json.loads(line)["text"][:50] for line in corpus.read_text(encoding="utf-8").splitlines()]
    gens = backend.generate([Request("抽取职位要求，输出 JSON。\n" + t) for t in texts], GenParams(max_new_tokens=10))
    assert {g.decoder for g in gens} == {"fast"}
    return [(g.text, g.output_tokens) for g in gens]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_checkpoint_loads_as_its_dequantized_reference(tmp_path, plain_llama, fmt):
    qdir, ref = _write(plain_llama, tmp_path, fmt)
    loaded, reference = _backend(qdir), _backend(ref)
    want = reference.base.state_dict()
    got = loaded.base.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    assert _decode(loaded, tmp_path) == _decode(reference, tmp_path)
    record = loaded.identity()["quantization"]
    assert record["checkpoint"] == FORMATS[fmt][1]["quant_method"] and record["loaded_as"] == "float32"
    assert "quantization" not in reference.identity()


def test_fp8_checkpoint_keeps_its_own_values_for_fp8_layers(tmp_path, plain_llama):
    """With FP8 layers (emulated here), a checkpoint saved in FP8 per channel runs on its own e4m3 weights and
    scales, not on a second quantization of the dequantized ones."""
    from extractor.backends.quant.fp8 import FP8Linear
    qdir, _ = _write(plain_llama, tmp_path, "compressed-tensors")
    backend = _backend(qdir, quantize="fp8-emulated")
    saved = load_file(qdir / "model.safetensors")
    layer = backend.base.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, FP8Linear)
    assert torch.equal(layer.weight.view(torch.uint8), saved["model.layers.1.mlp.down_proj.weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale.reshape(-1), saved["model.layers.1.mlp.down_proj.weight_scale"].float().reshape(-1))
    record = backend.identity()["quantization"]
    assert record["method"] == "fp8" and record["checkpoint"]["loaded_as"].startswith("fp8 (its own")


REFUSED = {
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "int compressed-tensors": {**CT_CONFIG, "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
    "gptq 3-bit": {"quant_method": "gptq", "bits": 3, "group_size": 128},
    "awq gemv": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unread_quantization_refused_in_one_line(tmp_path, plain_llama, name):
    folder = tmp_path / "m"
    shutil.copytree(plain_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": REFUSED[name]}))
    with pytest.raises(ModelError) as exc:
        check_quantization(folder)
    line = str(exc.value)
    assert "\n" not in line and str(folder / "config.json") in line and "--backend vllm" in line


def test_unknown_method_exits_2_through_the_cli(tmp_path, plain_llama, run_cli):
    folder = tmp_path / "m"
    shutil.copytree(plain_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "hqq"}}))
    corpus, _ = synth_corpus(tmp_path, n=2)
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", folder, "--out", tmp_path / "o.jsonl",
                     "--device", "cpu", "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {folder / 'config.json'}: quantization_config quant_method 'hqq' is not read by the hf backend "
        "(it reads compressed-tensors FP8, fp8, fbgemm_fp8, awq, gptq); dequantize it to bf16 first (save it "
        "without quantization_config) or run it with --backend vllm"]
