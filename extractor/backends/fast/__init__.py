"""The fast path: a static-cache, continuously batched greedy decoder over a transformers model's own forward.

The layer math is the model's own: FastDecoder calls the model's forward (its embeddings and their scaling,
norms wherever the family puts them, projections fused or not, rotary partial or per layer, MLP or MoE,
multipliers, the head and its softcap or scaling), with transformers' attention-function interface pointed
at our attention function. That function, and only it, is ours: it stores each layer's K/V in our cache
layout and attends with the layer's own scale, softcap and sliding window, as the module hands them over.
Which model types may take this path is an explicit list, each proven by a test (families.py).

One noun per file:
- decoder.py: FastDecoder, the loop that executes the scheduler's decisions with the runner;
- scheduler.py: slots, admission, refills, budgets; a step's decision as data (PrefillChunk, DecodeStep);
- cache.py: the slots' and the shared prefix's K/V (a prompt-learning adapter's virtual part included),
  slots for the free memory;
- runner.py: the model's passes with our attention, the probe, torch.compile, CUDA graphs;
- attention.py: the decode and prefill attention kernels; families.py: which models may take this path.

What makes it fast:
- the shared prompt prefix (instructions, few-shot examples) is prefilled once; its K/V live in one buffer
  that every row attends to, so neither prefill nor the cache repeats it per record;
- a preallocated cache of `slots` rows holds each record's own tokens; a finished row's slot is refilled
  with the next record (continuous batching); new records are prefilled together, in length order, with
  flash attention over prefix + own tokens, writing their K/V into their slots in place;
- a decode step runs the live rows packed into a batch bucket (a few sizes), captured as CUDA graphs:
  one launch per token; decode attention reads only each row's own length (attention.py);
- the loop runs one step ahead of the host: step k+1 takes its input tokens from step k's output on the
  GPU while the host books step k; with a constraint, the grammar work for step k+1's masks (in worker
  processes, constrain/workers.py) runs while the GPU runs step k+1's forward pass.

Greedy outputs equal `generate` (tests/test_fast.py and tests/test_fast_families.py on CPU in fp32;
tests/gpu/ on the GPU).

The names below load on first use, so that `families` (read from a model's config alone, before any weights)
imports without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FastDecoder": "decoder",
    "VirtualPrefix": "cache", "common_prefix": "cache", "kv_bytes_per_token": "cache",
    "slots_for_memory": "cache",
    "buckets_up_to": "runner", "decoder_layers": "runner",
    "FastPathError": "families", "FAMILIES": "families", "refusal": "families",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
