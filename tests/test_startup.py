"""Start-up: the compile choice, phase timing, and full checkpoints swapped into a loaded model in place."""
import json
import shutil

import pytest

from extractor.backends.checkpoint_swap import load_in_place, same_architecture
from extractor.backends.startup import COMPILE_PAYS_FROM_TOKENS, Startup, choose_compile, process_age
from extractor.errors import ModelError


def test_compile_choice():
    assert choose_compile("on", cuda=False, tokens=1).compile
    assert not choose_compile("off", cuda=True, tokens=10**9).compile
    assert not choose_compile("auto", cuda=False, tokens=10**9).compile  # CPU: never pays
    assert not choose_compile("auto", cuda=True, tokens=None).compile  # unknown size: eager
    below = choose_compile("auto", cuda=True, tokens=COMPILE_PAYS_FROM_TOKENS - 1)
    above = choose_compile("auto", cuda=True, tokens=COMPILE_PAYS_FROM_TOKENS)
    assert not below.compile and above.compile
    assert "output tokens" in below.why and below.as_dict() == {"compile": False, "why": below.why}
    with pytest.raises(ValueError):
        choose_compile("sometimes", cuda=True, tokens=0)


def test_phases_are_said_and_timed(capsys):
    startup = Startup()
    with startup.phase("loading weights", "1.0 GB"):
        pass
    with startup.phase("loading weights"):  # a phase met twice adds up
        pass
    startup.note("compile", {"compile": False})
    said = capsys.readouterr().err.splitlines()
    assert said == ["loading weights 1.0 GB…", "loading weights…"]
    out = startup.as_dict()
    assert set(out["phases_s"]) == {"loading weights"} and out["compile"] == {"compile": False}
    assert 0 < process_age() < 3600


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model, tmp_path_factory):
    """tiny_model and a copy of it with other random weights (same config and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM
    other = tmp_path_factory.mktemp("ckpt") / "other"
    shutil.copytree(tiny_model, other)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(other, safe_serialization=True)
    return tiny_model, other


def test_load_in_place_equals_a_fresh_load(two_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM
    first, second = two_checkpoints
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    tensors = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert same_architecture(first, second) is None
    assert load_in_place(model, second) > 0
    fresh = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32).eval()
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
        assert p.data_ptr() == tensors[name]  # the same tensors: a decoder's graphs still read them
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_other_architecture_is_refused(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    bigger = tmp_path / "bigger"
    shutil.copytree(second, bigger)
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (bigger / "config.json").write_text(json.dumps(cfg))
    assert "num_hidden_layers" in same_architecture(first, bigger)
    (bigger / "tokenizer.json").write_text((bigger / "tokenizer.json").read_text() + " ")
    cfg["num_hidden_layers"] -= 1
    (bigger / "config.json").write_text(json.dumps(cfg))
    assert "tokenizer" in same_architecture(first, bigger)


def test_incomplete_checkpoint_is_refused(two_checkpoints, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    first, second = two_checkpoints
    partial = tmp_path / "partial"
    shutil.copytree(second, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    with pytest.raises(ModelError, match="lacks 1 of the model's weights"):
        load_in_place(model, partial)


def _compiled_counts(path, scope: str):
    """Greedy tokens of a compiled FastDecoder and dynamo's frame count, from a cold dynamo cache."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from extractor.backends.fast import FastDecoder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch._dynamo.reset()
    counters.clear()
    decoder = FastDecoder(model, [3, 4, 9, 10], slots=3, unique_len=32, eos_ids=[], compile=True, compile_scope=scope)
    if not decoder.compiled:
        pytest.skip("torch.compile is unavailable here")
    got = decoder.generate([[5 + i, 6, 7, 8 + i] for i in range(5)], 8)
    eager = FastDecoder(model, [3, 4, 9, 10], slots=3, unique_len=32, eos_ids=[]).generate(
        [[5 + i, 6, 7, 8 + i] for i in range(5)], 8)
    frames, breaks = counters["frames"]["total"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert breaks == 0, f"compiled layers break their graph {breaks} times: {dict(counters['graph_break'])}"
    return got, eager, frames


def test_regional_compile_compiles_one_layer_for_all(tmp_path):
    """Scope "layers": one compiled forward per decoder-layer class, reused by every layer, so a deeper model
    compiles no more frames; each is one graph (attention is an op in it, not a graph break: a break split
    the layer's functions into 28 frames); its tokens equal the eager decoder's (fp32)."""
    from extractor.datasets.tiny_models import build_tiny_model
    shallow, deep = (build_tiny_model(tmp_path / f"l{n}", layers=n) for n in (2, 4))
    got2, eager2, frames2 = _compiled_counts(shallow, "layers")
    got4, eager4, frames4 = _compiled_counts(deep, "layers")
    assert got2 == eager2 and got4 == eager4
    assert frames4 == frames2, f"regional compile traced per layer: {frames2} frames at 2 layers, {frames4} at 4"


def _run_args(corpus, out, *models):
    args = ["run", corpus, "--task", "jd_requirements", "--out", out, "--device", "cpu", "--dtype", "fp32",
            "--max-new-tokens", "12", "--quiet", "--fast", "on"]
    for m in models:
        args += ["--model", m]
    return args


def test_several_checkpoints_in_one_process_equal_separate_runs(two_checkpoints, tmp_path, run_cli):
    """--model A --model B: B's weights loaded in place of A's, the decoder kept; each output equals the
    one a command of its own writes (fp32, fast path), and its manifest names its own checkpoint."""
    from conftest import read_jsonl, synth_corpus
    first, second = two_checkpoints
    corpus, _ = synth_corpus(tmp_path, n=6)
    both = tmp_path / "both" / "preds.jsonl"
    both.parent.mkdir()
    result = run_cli(*_run_args(corpus, both, first, second))
    assert result.exit_code == 0, result.output
    for name, model in ((first.name, first), (second.name, second)):
        alone = tmp_path / f"alone_{name}.jsonl"
        assert run_cli(*_run_args(corpus, alone, model)).exit_code == 0
        got = both.with_name(f"preds.{name}.jsonl")
        assert read_jsonl(got) == read_jsonl(alone)
        manifest = json.loads(got.with_name(got.name + ".manifest.json").read_text())
        assert manifest["run_key"]["backend"]["model"]["path"] == str(model.resolve())
        assert manifest["startup"]["compile"] == {"compile": False, "why": "auto: not on CPU, where compiling does "
                                                                           "not pay"}
    phases = json.loads(both.with_name(f"preds.{second.name}.jsonl.manifest.json").read_text())["startup"]["phases_s"]
    assert "switching weights" in phases and "loading weights" in phases
    assert "recomputing the shared prefix" in phases  # the decoder was kept: only its prefix K/V recomputed
    assert read_jsonl(both.with_name(f"preds.{first.name}.jsonl")) != read_jsonl(both.with_name(
        f"preds.{second.name}.jsonl"))  # the second checkpoint really decoded with its own weights


def test_several_checkpoints_refusals(two_checkpoints, tmp_path, run_cli):
    from conftest import synth_corpus
    first, second = two_checkpoints
    corpus, gold = synth_corpus(tmp_path, n=2)
    refused = run_cli(*_run_args(corpus, tmp_path / "p.jsonl", first, second), "--adapter", str(first))
    assert refused.exit_code == 2 and "--adapter" in refused.stderr
    bigger = tmp_path / "bigger"
    shutil.copytree(second, bigger)
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (bigger / "config.json").write_text(json.dumps(cfg))
    other = run_cli(*_run_args(corpus, tmp_path / "q.jsonl", first, bigger))
    assert other.exit_code == 2 and "num_hidden_layers" in other.stderr and "Traceback" not in other.output
    assert not (tmp_path / f"q.{first.name}.jsonl").exists()  # refused before the first checkpoint ran
    missing = run_cli(*_run_args(corpus, tmp_path / "r.jsonl", first, tmp_path / "nope"))
    assert missing.exit_code == 2 and "nope" in missing.stderr and not list(tmp_path.glob("r.*"))


@pytest.mark.parametrize("kind", ["full", "ptuning"])
def test_weights_changed_in_place_decode_like_a_fresh_backend(tiny_model, tmp_path, kind):
    """Training scores each checkpoint through one backend: after the model's tensors change in place,
    weights_changed() and the kept fast decoder decode exactly what a backend built afresh decodes (fp32),
    for a full model and a P-tuning adapter (its virtual part recomputed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extractor.backends.base import GenParams, Request
    from extractor.backends.hf import HFBackend
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if kind == "ptuning":
        from peft import PromptEncoderConfig, get_peft_model
        model = get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                          encoder_hidden_size=32))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [[5, 6, 7, 8, 9, 10 + i, 11 + i] for i in range(4)]
    params = GenParams(max_new_tokens=6)

    def outputs(backend):
        requests = [Request("", record_id=str(i), ids=p) for i, p in enumerate(prompts)]
        return [(g.text, g.output_tokens, g.decoder) for g in backend.generate(requests, params)]
    kept = HFBackend.from_loaded(model, tok, tiny_model, fast="on")
    before = outputs(kept)
    decoder = kept._fast_decoder
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or kind == "full":
                p.add_(torch.randn_like(p) * 0.3)
    kept.weights_changed()
    after = outputs(kept)
    assert kept._fast_decoder is decoder  # built once
    assert after == outputs(HFBackend.from_loaded(model, tok, tiny_model, fast="on"))
    assert after != before and {d for _, _, d in after} == {"fast"}
