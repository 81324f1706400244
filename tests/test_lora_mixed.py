"""Several LoRA adapters in one stream: requests naming different adapters (and base weights,
adapter=None) interleaved in one call. Every output equals that adapter's own single-adapter run through
peft's forward (the plain path), fp32 on CPU, token for token: grouped per adapter where mixing is not
possible, and mixed in one FastDecoder (each row its own adapter's LoRA, unmerged) where it is."""
import random

import pytest

from extractor.backends.base import GenParams, Request
from extractor.backends.hf import HFBackend
from tests.test_fast_adapters import _lora, loras  # noqa: F401 - `loras` is a fixture used here


def _prompts(n: int, shared: bool, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(5, 1000) for _ in range(14)] if shared else []
    return [head + [rng.randrange(5, 1000) for _ in range(rng.randint(3, 14))] for _ in range(n)]


def _interleaved(prompts, names) -> list[Request]:
    """Round robin over the adapter names (None: base weights), every prompt once per name."""
    return [Request("", f"{i}:{name}", ids=ids, seq=k, adapter=name)
            for k, (i, ids, name) in enumerate((i, ids, name) for i, ids in enumerate(prompts) for name in names)]


def _backend(tiny_model, adapters, fast, slots=3):
    return HFBackend(str(tiny_model), adapters=[str(a) for a in adapters], dtype="fp32", device="cpu",
                     batch_size=slots, fast=fast)


def _reference(tiny_model, adapters, prompts, params, schema=None, fast="off"):
    """Each adapter's own run (and base weights'), plain path: {(prompt index, name): (text, tokens)}."""
    want = {}
    for adapter in [None, *adapters]:
        backend = _backend(tiny_model, [adapter] if adapter else [], fast)
        name = adapter.name if adapter else None
        backend.use_adapter(name)
        requests = [Request("", str(i), ids=ids) for i, ids in enumerate(prompts)]
        for i, gen in enumerate(backend.generate(requests, params, schema)):
            want[(i, name)] = (gen.text, gen.output_tokens)
    return want


def _streamed(backend, requests, params, schema=None):
    pairs = [p for batch in backend.generate_stream(iter(requests), params, schema) for p in batch]
    assert sorted(r.seq for r, _ in pairs) == list(range(len(requests)))
    return {(int(r.record_id.split(":")[0]), r.adapter): g for r, g in pairs}


@pytest.mark.parametrize("fast", ["off", "on"])
def test_mixed_stream_grouped_equals_each_adapters_own_run(tiny_model, loras, fast, monkeypatch):  # noqa: F811
    """A window of requests naming several adapters is served per adapter (small windows: several groups per
    adapter, the stream read a window ahead): each output equals its adapter's single run."""
    monkeypatch.setattr(HFBackend, "PEEK", 5)
    prompts = _prompts(6, shared=True)
    params = GenParams(max_new_tokens=10)
    want = _reference(tiny_model, loras, prompts, params)
    backend = _backend(tiny_model, loras, fast)
    got = _streamed(backend, _interleaved(prompts, [None, *[a.name for a in loras]]), params)
    assert {k: (g.text, g.output_tokens) for k, g in got.items()} == want
    batch = backend.generate(_interleaved(prompts[:3], [loras[1].name, None, loras[0].name]), params)
    assert [(g.text, g.output_tokens) for g in batch] == \
        [want[(i, n)] for i in range(3) for n in (loras[1].name, None, loras[0].name)]


def _mixed_backend(tiny_model, adapters, slots=3):
    backend = _backend(tiny_model, adapters, "on", slots)
    return backend


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("count", [2, 3])
def test_mixed_lora_rows_equal_each_adapters_own_run(tiny_model, loras, count, shared):  # noqa: F811
    """2 and 3 LoRA adapters (ranks 4, 8 with rsLoRA, 2; q/v, every linear layer, MLP + o_proj) and base
    requests interleaved in one stream, 3 slots refilled: one mixed FastDecoder, every output equal to its
    adapter's own plain run (peft's forward)."""
    adapters = loras[:count]
    prompts = _prompts(7, shared)
    params = GenParams(max_new_tokens=12)
    want = _reference(tiny_model, adapters, prompts, params)
    backend = _mixed_backend(tiny_model, adapters)
    got = _streamed(backend, _interleaved(prompts, [a.name for a in adapters] + [None]), params)
    assert {k: (g.text, g.output_tokens) for k, g in got.items()} == want
    assert {g.decoder for g in got.values()} == {"fast"}
    assert backend.weights.mix is not None and backend._mix_decoder.groups == count + 1
    assert backend._mix_decoder.stats["prefills"] > 1, "slots were refilled"


def test_mixed_lora_constrained(tiny_model, loras):  # noqa: F811
    """Constrained (BatchConstraint over the mixed rows): equal to each adapter's plain constrained run."""
    from extractor.tasks.task import load_task
    schema = load_task("jd_requirements").schema
    prompts = _prompts(5, shared=True, seed=5)
    params = GenParams(max_new_tokens=40, constrained=True)
    want = _reference(tiny_model, loras, prompts, params, schema)
    backend = _mixed_backend(tiny_model, loras)
    got = _streamed(backend, _interleaved(prompts, [None, *[a.name for a in loras]]), params, schema)
    assert {k: (g.text, g.output_tokens) for k, g in got.items()} == want
    assert {g.decoder for g in got.values()} == {"fast"} and backend.weights.mix is not None


def test_mixed_batch_misfits_and_back_to_one_adapter(tiny_model, loras, monkeypatch):  # noqa: F811
    """`generate` with base weights and one adapter mixed; a record without the shared prefix (after the
    first PEEK requests set it) goes plain with its own adapter; afterwards one adapter alone (merged) and
    base weights, the base tensors unchanged."""
    import torch
    monkeypatch.setattr(HFBackend, "PEEK", 6)
    prompts = _prompts(6, shared=True, seed=9)
    prompts[5] = prompts[5][14:]  # no shared prefix: a misfit
    params = GenParams(max_new_tokens=10)
    want = _reference(tiny_model, loras[1:2], prompts, params)
    backend = _mixed_backend(tiny_model, loras)
    base = {k: v.clone() for k, v in backend.base.state_dict().items()}
    names = [None, loras[1].name]
    gens = backend.generate(_interleaved(prompts, names), params)
    assert [(g.text, g.output_tokens) for g in gens] == [want[(i, n)] for i in range(6) for n in names]
    assert backend.weights.mix is not None
    assert [g.decoder for g in gens].count("plain") == 2  # the misfit, once per adapter
    alone = backend.generate([Request("", ids=ids, adapter=loras[1].name) for ids in prompts], params)
    assert [(g.text, g.output_tokens) for g in alone] == [want[(i, loras[1].name)] for i in range(6)]
    assert backend.weights.mix is None and len(backend.weights.merged) > 0
    backend.use_adapter(None)
    assert all(torch.equal(backend.base.state_dict()[k], v) for k, v in base.items())


REFUSED = {"dora": (dict(use_dora=True, target_modules=["q_proj", "v_proj"]), "DoRA"),
           "lora-bias": (dict(lora_bias=True, target_modules=["q_proj", "v_proj"]), "LoRA bias"),
           "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), "Embedding")}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_kind_decodes_per_adapter(tmp_path, tiny_model, loras, kind, capfd, monkeypatch):  # noqa: F811
    """DoRA, a LoRA bias (refused from their configs) or LoRA on the embeddings (refused from its layers)
    beside a plain LoRA: one line says why, and the stream is served per adapter (each merged on the fast
    path), every output equal to its adapter's own run on the plain path (an embedding LoRA on tied embeddings
    is not merged either: merged, the shared head would change with it)."""
    monkeypatch.setattr(HFBackend, "PEEK", 4)
    config, named = REFUSED[kind]
    odd = _lora(tiny_model, tmp_path / kind, 5, r=4, lora_alpha=8, **config)
    adapters = [odd, loras[0]]
    prompts = _prompts(5, shared=True, seed=11)
    params = GenParams(max_new_tokens=10)
    want = _reference(tiny_model, adapters, prompts, params, fast="off")
    backend = _mixed_backend(tiny_model, adapters)
    got = _streamed(backend, _interleaved(prompts, [odd.name, None, loras[0].name]), params)
    assert {k: (g.text, g.output_tokens) for k, g in got.items()} == want
    assert {g.decoder for g in got.values()} == {"fast"} and backend.weights.mix is None
    said = [line for line in capfd.readouterr().err.splitlines() if "mixed LoRA decoding refused" in line]
    assert len(said) == 1, said
    assert named in said[0]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny model of 4 decoder layers and 2 LoRA adapters on it (q/v; every linear layer, rsLoRA)."""
    from extractor.datasets.tiny_models import build_tiny_model
    from tests.conftest import make_adapter
    root = tmp_path_factory.mktemp("deep")
    model = build_tiny_model(root / "tiny4", layers=4)
    return model, [make_adapter(model, "lora", root / "qv", seed=0),
                   _lora(model, root / "all", 1, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")]


def _compiled_run(model, adapters, requests, params):
    """A compiled FastDecoder's outputs and dynamo's compile counts, from a cold dynamo cache."""
    import torch
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    backend = HFBackend(str(model), adapters=[str(a) for a in adapters], dtype="fp32", device="cpu",
                        batch_size=3, fast="on", compile=True)
    got = _streamed(backend, requests, params)
    decoder = backend._mix_decoder if adapters else backend._fast_decoder
    if not decoder.compiled:
        pytest.skip("torch.compile is unavailable here")
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return got, frames, graphs, backend


def test_mixed_lora_compiled_compiles_once_for_every_layer(deep):
    """torch.compile around a mixed decoder (as on CUDA): its outputs equal each adapter's plain run, and it
    compiles no more frames or graphs than the base model's compiled decoder: every layer's LoRA runs one
    forward, its A, B and scales read as tensors. (A forward bound per layer is a constant dynamo guards on:
    each layer recompiled the shared layer code, 9 frames more per layer here; 28 layers went past the
    recompile limit on an H200, then ran eager.)"""
    model, adapters = deep
    prompts = _prompts(5, shared=True, seed=13)
    params = GenParams(max_new_tokens=8)
    want = _reference(model, adapters, prompts, params)
    base, base_frames, base_graphs, _ = _compiled_run(model, [], _interleaved(prompts, [None]), params)
    assert {k: (g.text, g.output_tokens) for k, g in base.items()} == {k: v for k, v in want.items() if k[1] is None}
    mixed = _interleaved(prompts, [None, *[a.name for a in adapters]])
    got, frames, graphs, backend = _compiled_run(model, adapters, mixed, params)
    assert {k: (g.text, g.output_tokens) for k, g in got.items()} == want
    assert {g.decoder for g in got.values()} == {"fast"} and backend._mix_decoder.groups == 3
    # equal here (1 frame, 1 graph: every size, prefill and decode); a compile per layer would add at least one
    # of each per layer
    assert frames - base_frames < 4 and graphs - base_graphs < 4, \
        f"recompiled per layer: {frames} frames, {graphs} graphs; base weights {base_frames}, {base_graphs}"


def test_mixed_layers_swap_class_and_close_restores_exactly(tiny_model, loras):  # noqa: F811
    """Mixed, each LoRA layer is its class's one mixed subclass (one forward for all) holding its operands as
    non-persistent buffers (the state dict unchanged); `off()` is peft's forward; `close()` gives every layer
    back its own class and attributes exactly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from extractor.backends.fast.families import FastPathError
    from extractor.backends.lora_mixed import MixedLoRA
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), loras[0],
                                      adapter_name=loras[0].name)
    model.load_adapter(loras[1], adapter_name=loras[1].name)
    model.eval()
    model.set_adapter(loras[1].name)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    before = [(type(m), dict(vars(m)), dict(m._buffers), set(m._non_persistent_buffers_set)) for m in layers]
    weights = {id(m): m.get_base_layer().weight.detach().clone() for m in layers}
    keys = list(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        peft_out = model(input_ids=ids).logits
    mix = MixedLoRA(model, [loras[0].name, loras[1].name])
    # two mixed classes: B folded into the base GEMM (output at least as wide as the input), and not
    folded = [m for m in layers if hasattr(m, "mixed_fold")]
    assert 0 < len(folded) < len(layers) and len({type(m) for m in layers}) == 2
    assert all(m.out_features >= m.in_features for m in folded)
    for m in folded:  # the base weight is a view of W_fold: stored once, its values unchanged
        weight = m.get_base_layer().weight
        assert weight.data_ptr() == m.mixed_fold.data_ptr() and torch.equal(weight, weights[id(m)])
    assert {type(m).forward for m in layers} & {before[0][0].forward} == set()
    assert all("forward" not in vars(m) for m in layers) and list(model.state_dict()) == keys
    mix.attach(1)[0] = 2
    with torch.no_grad():
        # row group 2: adapter 2's LoRA, as peft's (to rounding: the scale applies before B here)
        torch.testing.assert_close(model(input_ids=ids).logits, peft_out)
        with mix.off():
            assert torch.equal(model(input_ids=ids).logits, peft_out)
        with pytest.raises(FastPathError, match="not \\[rows, tokens, features\\]"):
            layers[0](torch.zeros(3, layers[0].in_features))
    mix.close()
    assert [(type(m), dict(vars(m)), dict(m._buffers), set(m._non_persistent_buffers_set)) for m in layers] == before
    for m in layers:  # every base weight contiguous in storage of its own again, bit for bit
        weight = m.get_base_layer().weight
        assert weight.is_contiguous() and torch.equal(weight, weights[id(m)])
