"""Quantized weights for the `hf` backend: FP8 (W8A8) linear layers (fp8.py), the quantized checkpoints users
download, read and dequantized at load (schemes.py: which configs are read, without torch; unpack.py: the
formats' arithmetic; checkpoints.py: a folder's tensors into a model), and what a run records of it
(`describe`/`description`).

Both decoding paths run the same modules: the fast path calls the model's own forward, so a quantized layer is
the same layer on either path, and a test holding them token for token equal holds for the quantized model too.
"""
from __future__ import annotations

import weakref

QUANTIZE = ("none", "fp8")  # --quantize; "fp8-emulated" is reachable from Python only (CPU tests, accuracy checks)
EMULATED = "fp8-emulated"

_described: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def record(model, what: dict) -> None:
    """What was done to this model's weights at load (the run key's `quantization`)."""
    _described[model] = dict(what)


def description(model) -> dict | None:
    """The quantization recorded for this model at load (None: its weights are as saved, in the run dtype)."""
    try:
        found = _described.get(model)
    except TypeError:  # not weak-referenceable: nothing was recorded for it
        return None
    return dict(found) if found is not None else None
