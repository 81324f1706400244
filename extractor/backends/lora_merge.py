"""A LoRA adapter merged into its base weights for the fast path, and taken out again exactly.

Merged, a LoRA model decodes at the base model's speed: on one H200 (anchor workload, rank 16 on every
linear layer) merged weights ran 1.00x the base fast path, unmerged layers 0.77x eager and 0.83x compiled
(docs/benchmarks.md). peft's own `merge` computes the merged weight; `unmerge` would subtract it again,
which in bf16 does not give back the base weights bit for bit, so the base weights are kept on the host and
copied back: the next adapter merges into exactly the weights the first one did, and a run with several
adapters decodes each one as its own run would. The weights change in place (same tensors), so a decoder's
compiled code and CUDA graphs stay valid across adapters.
"""
from __future__ import annotations


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class MergedLoRA:
    """The active LoRA adapter of `model` merged into its base layers until `restore()`. What is kept is each
    base module's own parameters (a Linear's weight and bias; an MoE experts module's stacked expert tensors,
    which peft's parameter wrappers merge into, one wrapper per tensor around the same module), once per module,
    before anything is merged into it."""

    def __init__(self, model):
        self._layers: list = []
        self._saved: dict[int, tuple] = {}
        try:
            for layer in lora_layers(model):
                if layer.merged or not layer.active_adapters:
                    continue
                base = layer.get_base_layer()
                if id(base) not in self._saved:
                    self._saved[id(base)] = (base, {name: p.detach().to("cpu", copy=True)
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
