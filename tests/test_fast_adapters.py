"""Adapters on the fast path: a LoRA adapter's layers are part of the model's own forward, so FastDecoder runs
them as peft does. fp32 outputs of `--fast on` equal the plain path (peft's own forward through `generate`),
constrained and not, with refills; several adapters in one run each equal their own single-adapter run; the
manifest counts every record as `fast`. Adapter types not yet proven go the plain way and say so."""
import json

import pytest

from tests.conftest import make_adapter, read_jsonl, synth_corpus
from tests.families import build_family_model


def _lora(model_dir, out, seed, **config):
    """One SGD step with a large learning rate (so outputs change) on a LoRA adapter of this config."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(task_type="CAUSAL_LM", **config))
    batch = tok(["本科，java" + '{"学历要求": ["本科"]}'], return_tensors="pt")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.save_pretrained(out)
    return out


def _run(run_cli, corpus, model, out, fast, adapters, *extra, tokens=20):
    args = ["run", corpus, "--task", "jd_requirements", "--model", model, "--out", out, "--fast", fast,
            "--batch-size", "3", "--max-new-tokens", tokens, "--few-shot", "1", "--quiet", *extra]
    for a in adapters:
        args += ["--adapter", a]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return result


def _raw(path):
    return [(r["id"], r["raw"], r["adapter"]) for r in read_jsonl(path)]


def _decoder(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())["summary"].get("decoder")


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [
        make_adapter(tiny_model, "lora", root / "qv", seed=0),  # r 4, alpha 8, q/v
        _lora(tiny_model, root / "all", 1, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
        _lora(tiny_model, root / "mlp", 2, r=2, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                              "o_proj"]),
    ]


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_lora_fast_equals_plain(tmp_path, tiny_model, loras, run_cli, constrained):
    corpus, _ = synth_corpus(tmp_path, n=7)
    extra = ["--constrained"] if constrained else []
    tokens = 56 if constrained else 20
    for adapter in loras:
        runs = {}
        for fast in ("off", "on"):
            out = tmp_path / f"{adapter.name}.{fast}.jsonl"
            _run(run_cli, corpus, tiny_model, out, fast, [adapter], *extra, tokens=tokens)
            runs[fast] = _raw(out)
            assert _decoder(out) == {"fast" if fast == "on" else "plain": 7}
        assert runs["on"] == runs["off"], adapter.name


def test_several_loras_in_one_run_each_equal_its_own_run(tmp_path, tiny_model, loras, run_cli):
    """Two and three adapters on one loaded base: each output equals that adapter's single run."""
    corpus, _ = synth_corpus(tmp_path, n=6)
    single = {}
    for adapter in loras:
        out = tmp_path / f"single.{adapter.name}.jsonl"
        _run(run_cli, corpus, tiny_model, out, "on", [adapter])
        single[adapter.name] = _raw(out)
    assert len({tuple(raw for _, raw, _ in v) for v in single.values()}) == 3, "the adapters must differ"
    for group in (loras[:2], loras):
        out = tmp_path / f"multi{len(group)}.jsonl"
        _run(run_cli, corpus, tiny_model, out, "on", group)
        for adapter in group:
            path = out.with_name(f"multi{len(group)}.{adapter.name}.jsonl")
            assert _raw(path) == single[adapter.name]
            assert _decoder(path) == {"fast": 6}


def test_lora_on_fused_projections(tmp_path, tiny_model, run_cli):
    """Phi-3's fused qkv and gate_up projections, as peft saves LoRA on them."""
    model = build_family_model(tiny_model, "phi3", tmp_path / "phi3")
    adapter = _lora(model, tmp_path / "phi3-lora", 3, r=4, lora_alpha=8,
                    target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
    corpus, _ = synth_corpus(tmp_path, n=5)
    outs = {}
    for fast in ("off", "on"):
        out = tmp_path / f"{fast}.jsonl"
        _run(run_cli, corpus, model, out, fast, [adapter])
        outs[fast] = _raw(out)
    assert outs["on"] == outs["off"]
    assert _decoder(tmp_path / "on.jsonl") == {"fast": 5}


def test_unproven_adapter_type_goes_plain_and_says_why(tmp_path, tiny_model, run_cli):
    adapter = make_adapter(tiny_model, "prompt", tmp_path / "prompt")
    corpus, _ = synth_corpus(tmp_path, n=3)
    out = tmp_path / "p.jsonl"
    result = _run(run_cli, corpus, tiny_model, out, "auto", [adapter])
    assert "fast path: peft adapters of type PROMPT_TUNING decode with plain generate" in result.stderr
    assert _decoder(out) == {"plain": 3}
