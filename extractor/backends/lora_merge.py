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
    """The active LoRA adapter of `model` merged into its base layers until `restore()`."""

    def __init__(self, model):
        self._saved = []
        try:
            for layer in lora_layers(model):
                if layer.merged or not layer.active_adapters:
                    continue
                base = layer.get_base_layer()
                names = [n for n in ("weight", "bias") if getattr(base, n, None) is not None]
                self._saved.append((layer, {n: getattr(base, n).detach().to("cpu", copy=True) for n in names}))
                layer.merge()
        except Exception:
            self.restore()  # all or nothing: no layer left merged
            raise

    def __len__(self) -> int:
        return len(self._saved)

    def restore(self) -> None:
        """The base weights as they were before the merge, bit for bit; the layers unmerged."""
        import torch
        with torch.no_grad():
            for layer, saved in self._saved:
                base = layer.get_base_layer()
                for name, value in saved.items():
                    getattr(base, name).copy_(value)
                layer.merged_adapters.clear()
        self._saved = []
