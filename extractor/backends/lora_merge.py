"""A LoRA adapter merged into its base weights for the fast path, and taken out again exactly.

Merged, a LoRA model decodes at the base model's speed: on one H200 (anchor workload, rank 16 on every
linear layer) merged weights ran 1.00x the base fast path, unmerged layers 0.77x eager and 0.83x compiled
(docs/benchmarks.md). peft's own `merge` computes the merged weight; `unmerge` would subtract it again,
which in bf16 does not give back the base weights bit for bit, so the base weights are kept (on the GPU
when there is room, else on the host) and copied back: the next adapter merges into exactly the weights
the first one did, and a run with several adapters decodes each one as its own run would. The weights
change in place (same tensors), so a decoder's compiled code and CUDA graphs stay valid across adapters.
"""
from __future__ import annotations


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _keep_on(layers) -> str | None:
    """Where the base tensors wait: beside them on the GPU when twice their size is free there (a copy back
    is then a device copy, not a trip over PCIe each way), else in host memory."""
    import torch
    tensors = {id(p): p for layer in layers for p in layer.get_base_layer().parameters(recurse=False)}
    if not tensors:
        return None
    device = next(iter(tensors.values())).device
    if device.type != "cuda":
        return "cpu"
    need = sum(p.numel() * p.element_size() for p in tensors.values())
    free, _ = torch.cuda.mem_get_info(device)
    return None if free > 2 * need else "cpu"  # None: the tensor's own device


def _check_untied(model, layers) -> None:
    """A LoRA on an embedding matrix the output head shares (tied word embeddings) cannot be merged: merged, the
    head would change too, while peft's forward adds the LoRA to the lookup only. Raises ValueError (the
    caller keeps the layers unmerged: the model's own forward, exactly)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    for layer in layers:
        base = layer.get_base_layer()
        if weight is not None and getattr(base, "weight", None) is weight:
            raise ValueError("the adapter has a LoRA on the input embeddings, which the output head shares "
                             "(tied word embeddings)")


def _check_not_fp8(layers) -> None:
    """FP8 base weights (quant/fp8.py) cannot take a merge: the LoRA would be rounded to e4m3. Raises ValueError
    (the caller keeps the layers unmerged, beside the FP8 layers: peft's own forward, exactly)."""
    from extractor.backends.quant.fp8 import FP8Linear
    for layer in layers:
        if isinstance(layer.get_base_layer(), FP8Linear):
            raise ValueError(FP8Linear.MERGE_REFUSAL)


class MergedLoRA:
    """The active LoRA adapter of `model` merged into its base layers until `restore()`. What is kept is each
    base module's own parameters (a Linear's weight and bias; an MoE experts module's stacked expert tensors,
    which peft's parameter wrappers merge into, one wrapper per tensor around the same module), once per module,
    before anything is merged into it."""

    def __init__(self, model):
        self._layers: list = []
        self._saved: dict[int, tuple] = {}
        layers = [layer for layer in lora_layers(model) if not layer.merged and layer.active_adapters]
        _check_untied(model, layers)
        _check_not_fp8(layers)
        keep = _keep_on(layers)
        try:
            for layer in layers:
                base = layer.get_base_layer()
                if id(base) not in self._saved:
                    self._saved[id(base)] = (base, {name: p.detach().to(keep or p.device, copy=True)
                                                    for name, p in base.named_parameters(recurse=False)})
                self._layers.append(layer)
                layer.merge()
        except Exception:
            self.restore()  # all or nothing: no layer left merged
            raise

    def __len__(self) -> int:
        return len(self._layers)

    def restore(self) -> None:
        """The base weights as they were before the merge, bit for bit; the layers unmerged."""
        import torch
        with torch.no_grad():
            for base, saved in self._saved.values():
                for name, value in saved.items():
                    getattr(base, name).copy_(value)
            for layer in self._layers:
                layer.merged_adapters.clear()
        self._layers, self._saved = [], {}
