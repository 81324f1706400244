"""Several LoRA adapters in one decode step (S-LoRA / Punica style): each row of a pass applies its own
adapter's LoRA, unmerged, and base rows none.

Each peft LoRA Linear's forward becomes base(x) + ((x @ A_cat) * scale[group of the row]) @ B_cat, where
A_cat [in, R] and B_cat [R, out] concatenate every loaded adapter's A and B for that module, and the scale
table [groups, R] holds, in row g, adapter g's own peft scaling (alpha / r, or alpha / sqrt(r) with rsLoRA;
peft's `scaling[adapter]`) on its columns and zeros elsewhere. Group 0 is base weights (a zero row); a module
an adapter does not target has no columns for it. The row groups are read from one static buffer (`rows`, the
decoder's per-row group, staged like its slots), so CUDA graphs and compiled code stay valid.

Where a layer's output is at least as wide as its input (q, o, gate and up projections), B is folded into
the base matmul instead: the base weight W [out, in] becomes the first columns of W_fold = [W | B_cat^T]
[out, in + R], and the layer computes [x | (x @ A_cat) * scale] @ W_fold^T in one GEMM. That spares writing,
then re-reading, a second [rows, out] product and the add over it (gate/up: 8,960 wide on a 1.5B model),
and a kernel per layer; an H200 ran four mixed adapters at 0.78x base weights without it. The base weight's
storage is W_fold's while mixed (the same Parameter, a view), so no weight is held twice; `close()` gives
it contiguous storage of its own again, with the same values.

One forward for every layer: each mixed layer's class becomes a subclass of its own (made once per class)
whose `forward` is the mixed one, and its A_cat, B_cat and scale table are non-persistent buffers on it.
torch.compile then sees one function and per-layer tensors it reads as inputs; a per-layer bound forward
(a partial) would be a constant it guards on by id, and every decoder layer would recompile the shared layer
code (seen on an H200: 28 layers past the recompile limit, then eager).

What this does not compute exactly is refused in one line (`config_refusal`, `module_refusal`) and decodes
with one adapter at a time instead (merged): DoRA and other LoRA variants, LoRA on embeddings or on
parameters (MoE experts), a LoRA bias, fan_in_fan_out layers, modules saved whole per adapter, trainable
tokens, dropout at train time.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from extractor.backends.fast.families import FastPathError
from extractor.backends.quant.fp8 import FP8Linear

# adapter_config.json keys whose (truthy) value means the adapter is not a plain LoRA this mixes exactly
REFUSED_CONFIG = {
    "use_dora": "DoRA", "target_parameters": "LoRA on parameters (MoE experts)",
    "modules_to_save": "modules saved whole (modules_to_save)", "trainable_token_indices": "trainable tokens",
    "lora_bias": "a LoRA bias", "alora_invocation_tokens": "activated LoRA", "use_alora": "activated LoRA",
    "layer_replication": "layer replication", "fan_in_fan_out": "fan_in_fan_out layers",
    "megatron_config": "Megatron layers", "use_qalora": "QALoRA",
}


def config_refusal(name: str, config: dict) -> str | None:
    """Why this adapter (its adapter_config.json) cannot decode mixed with others (None: it can)."""
    if config.get("peft_type") != "LORA":
        return f"adapter {name} is {config.get('peft_type')}, not LoRA"
    for key, what in REFUSED_CONFIG.items():
        if config.get(key):
            return f"adapter {name} uses {what}"
    return None


def module_refusal(model, names: list[str]) -> str | None:
    """Why the loaded adapters' layers cannot decode mixed (None: every one is a plain LoRA Linear)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear
    if model.training:
        return "the model is in training mode (dropout)"
    for path, module in model.named_modules():
        if type(module).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
            return f"{path} is saved whole per adapter"
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not Linear:
            return f"LoRA on a {type(module).__name__} layer ({path})"
        if ".experts." in f".{path}.":
            return f"LoRA on MoE experts ({path})"
        if "forward" in vars(module) or any(hasattr(module, name) for name in (*BUFFERS, *FOLDED, "mixed_state")):
            return f"{path} has its forward replaced already (a hook, or mixed LoRA)"
        if module.fan_in_fan_out or module.merged:
            return f"{path} is {'fan_in_fan_out' if module.fan_in_fan_out else 'merged'}"
        for name in names:
            if name in module.lora_variant:
                return f"adapter {name} is a LoRA variant ({type(module.lora_variant[name]).__name__}) at {path}"
            if module.lora_bias.get(name) or name in module.lora_embedding_A:
                return f"adapter {name} has a LoRA bias or embedding at {path}"
    return None


BUFFERS = ("mixed_a", "mixed_b", "mixed_scale")  # A_cat [in, R], B_cat [R, out], table [groups, R]
FOLDED = ("mixed_a", "mixed_fold", "mixed_scale")  # B folded: W_fold [out, in + R] instead of B_cat
_MIXED: dict[tuple[type, bool], type] = {}  # (LoRA layer class, folded) -> its mixed subclass: one forward each


def _mixed_class(cls: type, folded: bool) -> type:
    mixed = _MIXED.get((cls, folded))
    if mixed is None:
        class Mixed(cls):
            def forward(self, x, *args, **kwargs):
                mix = self.mixed_state
                if not mix.enabled:
                    return super().forward(x, *args, **kwargs)
                if x.dim() != 3:  # rows must be the batch dimension for each row's group to apply
                    raise FastPathError(f"mixed LoRA: a layer's input has shape {tuple(x.shape)}, "
                                        "not [rows, tokens, features]")
                a = self.mixed_a
                scale = self.mixed_scale[mix.rows[: x.shape[0]]].unsqueeze(1)  # [rows, 1, R]: its adapter's
                t = (x.to(a.dtype) @ a) * scale
                if folded:
                    return torch.nn.functional.linear(torch.cat([x, t.to(x.dtype)], -1), self.mixed_fold,
                                                      self.base_layer.bias)
                result = self.base_layer(x, *args, **kwargs)
                return result + (t @ self.mixed_b).to(result.dtype)

        Mixed.__name__ = Mixed.__qualname__ = f"Mixed{'Folded' if folded else ''}{cls.__name__}"
        mixed = _MIXED[(cls, folded)] = Mixed
    return mixed


def _foldable(layer) -> bool:
    """B goes into the base GEMM where the output is at least as wide as the input (the second product
    and its add cost more than widening the input by R) and the base layer is a plain Linear."""
    base = layer.get_base_layer()
    return type(base) is torch.nn.Linear and base.out_features >= base.in_features


class MixedLoRA:
    """The LoRA layers of a peft model holding exactly the adapters `names`, their forward replaced by the
    mixed one (group g: adapter names[g - 1]; 0: base weights) until `close()`. Raises FastPathError (one
    line, from module_refusal) where a layer cannot be mixed exactly; nothing is replaced then."""

    def __init__(self, model, names: list[str]):
        from peft.tuners.lora import LoraLayer
        why = module_refusal(model, names)
        if why is not None:
            raise FastPathError(f"mixed LoRA decoding: {why}")
        self.names = list(names)
        self.groups = len(names) + 1
        self.enabled = True
        p = next(model.parameters())
        self.rows = torch.zeros(1, dtype=torch.long, device=p.device)
        self._layers = []  # (layer, its own class)
        for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
            a, b, table = self._operands(layer)
            folded = _foldable(layer)
            operands = (a, self._fold(layer, b), table) if folded else (a, b, table)
            for name, tensor in zip(FOLDED if folded else BUFFERS, operands):
                layer.register_buffer(name, tensor, persistent=False)
            layer.mixed_state = self
            self._layers.append((layer, type(layer)))
            layer.__class__ = _mixed_class(type(layer), folded)

    def group(self, adapter: str | None) -> int:
        return 0 if adapter is None else self.names.index(adapter) + 1

    def attach(self, rows: int) -> torch.Tensor:
        """The per-row group buffer a decoder stages into, at least `rows` long."""
        if self.rows.numel() < rows:
            self.rows = torch.zeros(rows, dtype=torch.long, device=self.rows.device)
        return self.rows

    @torch.no_grad()
    def _operands(self, layer):
        """A_cat [in, R], B_cat [R, out] (the base layer's dtype; an FP8 layer's compute dtype) and the scale
        table [groups, R]."""
        base = layer.get_base_layer().weight
        dtype = layer.get_base_layer().compute_dtype if isinstance(layer.get_base_layer(), FP8Linear) else base.dtype
        present = [(g, name) for g, name in enumerate(self.names, 1) if name in layer.lora_A]
        a = torch.cat([layer.lora_A[name].weight.t() for _, name in present], 1).to(dtype).contiguous()
        b = torch.cat([layer.lora_B[name].weight.t() for _, name in present], 0).to(dtype).contiguous()
        table = torch.zeros(self.groups, a.shape[1], dtype=dtype, device=base.device)
        col = 0
        for g, name in present:
            r = layer.lora_A[name].weight.shape[0]
            table[g, col:col + r] = layer.scaling[name]
            col += r
        return a, b, table

    @staticmethod
    @torch.no_grad()
    def _fold(layer, b: torch.Tensor) -> torch.Tensor:
        """W_fold = [W | B_cat^T]; the base weight becomes a view of its first columns (its storage freed)."""
        weight = layer.get_base_layer().weight
        fold = torch.cat([weight, b.t()], 1)
        weight.data = fold[:, : weight.shape[1]]
        return fold

    @contextmanager
    def off(self):
        """peft's own forward in this block (the plain path, with whichever adapter peft has active)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def close(self) -> None:
        """Every layer back to its own class (peft's forward), its buffers and the shared state gone."""
        for layer, cls in self._layers:
            layer.__class__ = cls
            if hasattr(layer, "mixed_fold"):  # the base weight's own storage again, the same values
                weight = layer.get_base_layer().weight
                weight.data = weight.data.clone(memory_format=torch.contiguous_format)
            for name in {*BUFFERS, *FOLDED}:
                if hasattr(layer, name):
                    delattr(layer, name)
            del layer.mixed_state
        self._layers = []
