"""Adapters on the fast path: a LoRA adapter's layers are part of the model's own forward, so FastDecoder runs
them as peft does. fp32 outputs of `--fast on` equal the plain path (peft's own forward through `generate`),
constrained and not, with refills; several adapters in one run each equal their own single-adapter run; the
manifest counts every record as `fast`. Prompt tuning, P-tuning (MLP and LSTM) and prefix tuning (with and
without projection) on both paths equal peft's own forward over the whole sequence."""
import json

import pytest

from tests.conftest import make_adapter, read_jsonl, synth_corpus
from tests.families import build_family_model


def _one_step(model_dir, config, out, seed):
    """One SGD step with a large learning rate (so outputs change) on a fresh adapter of this peft config."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config.task_type = "CAUSAL_LM"
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    batch = tok(["本科，java" + '{"学历要求": ["本科"]}'], return_tensors="pt")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.save_pretrained(out)
    return out


def _lora(model_dir, out, seed, **config):
    from peft import LoraConfig
    return _one_step(model_dir, LoraConfig(**config), out, seed)


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
            manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
            assert manifest["run_key"]["backend"]["adapter"]["name"] == adapter.name  # the requests' adapter


def test_loras_merge_for_the_fast_path_and_share_one_decoder(tiny_model, loras):
    """Each LoRA adapter the backend loads decodes merged into the base weights, through one decoder (its
    cache kept, the prefix K/V recomputed per adapter), equal to its unmerged plain output; taking the
    adapter out gives back the base weights bit for bit."""
    import torch

    from extractor.backends.base import GenParams, Request
    from extractor.backends.hf import HFBackend
    backend = HFBackend(str(tiny_model), adapters=[str(a) for a in loras], device="cpu", batch_size=4, fast="on")
    reference = HFBackend(str(tiny_model), adapters=[str(a) for a in loras], device="cpu", batch_size=4, fast="off")
    base = {k: v.clone() for k, v in backend.base.state_dict().items()}
    prompts = [f"岗位：工程师{i}，要求本科，熟悉java" for i in range(5)]
    params = GenParams(max_new_tokens=12)
    decoders = set()
    for adapter in loras:
        requests = [Request(p, adapter=adapter.name) for p in prompts]
        plain = [g.text for g in reference.generate(requests, params)]
        fast = [g for g in backend.generate(requests, params)]
        assert [g.text for g in fast] == plain, adapter.name
        assert {g.decoder for g in fast} == {"fast"}
        assert len(backend.weights.merged) > 0, "the adapter's layers were merged"
        decoders.add(id(backend._fast_decoder))
    assert len(decoders) == 1, "one decoder for every adapter"
    backend.use_adapter(None)
    after = backend.base.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_lora_on_moe_experts(tmp_path, tiny_model):
    """LoRA on Qwen3-MoE's stacked expert tensors (peft's target_parameters) and its attention: the fast path
    (merged) equals the plain path (peft's unmerged forward); taking the adapter out restores every base
    tensor bit for bit (two parameter wrappers merge into the same experts module)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from extractor.backends.base import GenParams, Request
    from extractor.backends.hf import HFBackend
    model = build_family_model(tiny_model, "qwen3_moe", tmp_path / "moe")
    adapter = _lora(model, tmp_path / "moe-lora", 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    backend = HFBackend(str(model), adapters=[str(adapter)], device="cpu", batch_size=4, fast="on")
    reference = HFBackend(str(model), adapters=[str(adapter)], device="cpu", batch_size=4, fast="off")
    requests = [Request(f"岗位：工程师{i}，要求本科，熟悉java", adapter=adapter.name) for i in range(5)]
    params = GenParams(max_new_tokens=12)
    plain = [g.text for g in reference.generate(requests, params)]
    fast = backend.generate(requests, params)
    assert [g.text for g in fast] == plain
    assert {g.decoder for g in fast} == {"fast"} and len(backend.weights.merged) > 0
    backend.use_adapter(None)
    base = [g.text for g in backend.generate([Request(r.prompt) for r in requests], params)]
    assert base != plain, "the adapter must change the outputs"
    want = AutoModelForCausalLM.from_pretrained(model).state_dict()
    now = backend.base.state_dict()
    assert set(now) == set(want) and all(torch.equal(now[k], want[k]) for k in want)


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


def _prompt_adapter(model_dir, out, kind, seed):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    config = {
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=5),
        "ptuning-mlp": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32),
        "ptuning-lstm": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32,
                                                    encoder_reparameterization_type="LSTM"),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=6),
        "prefix-projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                        encoder_hidden_size=32),
    }[kind]()
    return _one_step(model_dir, config, out, seed)


PROMPT_KINDS = ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-projection"]


@pytest.fixture(scope="module")
def prompt_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_adapters")
    return {k: _prompt_adapter(tiny_model, root / k, k, seed=i) for i, k in enumerate(PROMPT_KINDS)}


def _peft_forward_greedy(model_dir, adapter, ids, n, eos):
    """The reference: peft's own forward over the whole sequence at every step (no cache, no generate)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    seq, out = list(ids), []
    with torch.no_grad():
        while len(out) < n:
            token = int(model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long))
                        .logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
            if token in eos:
                break
    return out


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_prompt_learning_equals_peft_forward(tiny_model, prompt_adapters, kind, shared):
    """Both paths, token for token, equal peft's forward: virtual tokens (or prefix K/V) once, the prompt after
    them; with a shared prompt prefix across records and without one; three slots refilled."""
    import random

    from extractor.backends.base import GenParams, Request
    from extractor.backends.hf import HFBackend
    rng = random.Random(7)
    head = [rng.randrange(5, 1000) for _ in range(12)] if shared else []
    prompts = [head + [rng.randrange(5, 1000) for _ in range(rng.randint(3, 12))] for _ in range(5)]
    params = GenParams(max_new_tokens=10)
    got = {}
    for mode in ("off", "on"):
        backend = HFBackend(str(tiny_model), adapters=[str(prompt_adapters[kind])], dtype="fp32", device="cpu",
                            batch_size=3, fast=mode)
        backend.use_adapter(backend.adapters()[0])
        requests = [Request("", str(i), ids=ids, seq=i) for i, ids in enumerate(prompts)]
        pairs = [p for batch in backend.generate_stream(requests, params) for p in batch]
        got[mode] = {int(r.record_id): g for r, g in pairs}
        assert {g.decoder for g in got[mode].values()} == {"plain" if mode == "off" else "fast"}
    for i, ids in enumerate(prompts):
        want = _peft_forward_greedy(tiny_model, prompt_adapters[kind], ids, 10, backend.eos_ids)
        text = backend.tokenizer.decode([t for t in want if t not in backend.eos_ids], skip_special_tokens=True)
        assert got["off"][i].text.rstrip("\ufffd") == text.rstrip("\ufffd"), (kind, i)
        assert (got["on"][i].text, got["on"][i].output_tokens) == (got["off"][i].text, got["off"][i].output_tokens)


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_prompt_learning_run_fast_equals_plain(tmp_path, tiny_model, prompt_adapters, run_cli, constrained):
    corpus, _ = synth_corpus(tmp_path, n=5)
    extra = ["--constrained"] if constrained else []
    for kind in ("ptuning-mlp", "prefix"):
        outs = {}
        for fast in ("off", "on"):
            out = tmp_path / f"{kind}.{fast}.jsonl"
            _run(run_cli, corpus, tiny_model, out, fast, [prompt_adapters[kind]], *extra,
                 tokens=48 if constrained else 16)
            outs[fast] = _raw(out)
            assert _decoder(out) == {"fast" if fast == "on" else "plain": 5}
        assert outs["on"] == outs["off"], kind


def test_unproven_adapter_type_goes_plain_and_says_why(tmp_path, tiny_model, run_cli):
    """IA3 injects layers too, but no test proves it on the fast path: plain, with one line saying why."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    corpus, _ = synth_corpus(tmp_path, n=3)
    out = tmp_path / "p.jsonl"
    result = _run(run_cli, corpus, tiny_model, out, "auto", [tmp_path / "ia3"])
    assert "fast path: peft adapters of type IA3 decode with plain generate" in result.stderr
    assert _decoder(out) == {"plain": 3}
