"""Several LoRA adapters in one stream (issue 15): requests naming different adapters (and base weights,
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


def _reference(tiny_model, adapters, prompts, params, schema=None):
    """Each adapter's own run (and base weights'), plain path: {(prompt index, name): (text, tokens)}."""
    want = {}
    for adapter in [None, *adapters]:
        backend = _backend(tiny_model, [adapter] if adapter else [], "off")
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
