"""Several LoRA adapters in one decode step (S-LoRA / Punica style): each row of a pass applies its own
adapter's LoRA, unmerged, and base rows none.

Each peft LoRA Linear's forward becomes base(x) + ((x @ A_cat) * scale[group of the row]) @ B_cat, where
A_cat [in, R] and B_cat [R, out] concatenate every loaded adapter's A and B for that module, and the scale
table [groups, R] holds, in row g, adapter g's own peft scaling (alpha / r, or alpha / sqrt(r) with rsLoRA;
peft's `scaling[adapter]`) on its columns and zeros elsewhere. Group 0 is base weights (a zero row); a module
an adapter does not target has no columns for it. The row groups are read from one static buffer (`rows`, the
decoder's per-row group, staged like its slots), so CUDA graphs and compiled code stay valid.

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

from extractor.backends.fast_families import FastPathError

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
        if "forward" in vars(module) or any(hasattr(module, name) for name in (*BUFFERS, "mixed_state")):
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
_MIXED: dict[type, type] = {}  # a LoRA layer class -> its mixed subclass (one per class: one forward to compile)


def _mixed_class(cls: type) -> type:
    mixed = _MIXED.get(cls)
    if mixed is None:
        class Mixed(cls):
            def forward(self, x, *args, **kwargs):
                mix = self.mixed_state
                if not mix.enabled:
                    return super().forward(x, *args, **kwargs)
                if x.dim() != 3:  # rows must be the batch dimension for each row's group to apply
                    raise FastPathError(f"mixed LoRA: a layer's input has shape {tuple(x.shape)}, "
                                        "not [rows, tokens, features]")
                a, b = self.mixed_a, self.mixed_b
                result = self.base_layer(x, *args, **kwargs)
                scale = self.mixed_scale[mix.rows[: x.shape[0]]].unsqueeze(1)  # [rows, 1, R]: its adapter's
                return result + (((x.to(a.dtype) @ a) * scale) @ b).to(result.dtype)

        Mixed.__name__ = Mixed.__qualname__ = f"Mixed{cls.__name__}"
        mixed = _MIXED[cls] = Mixed
    return mixed


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
            operands = self._operands(layer)
            for name, tensor in zip(BUFFERS, operands):
                layer.register_buffer(name, tensor, persistent=False)
            layer.mixed_state = self
            self._layers.append((layer, type(layer)))
            layer.__class__ = _mixed_class(type(layer))

    def group(self, adapter: str | None) -> int:
        return 0 if adapter is None else self.names.index(adapter) + 1

    def attach(self, rows: int) -> torch.Tensor:
        """The per-row group buffer a decoder stages into, at least `rows` long."""
        if self.rows.numel() < rows:
            self.rows = torch.zeros(rows, dtype=torch.long, device=self.rows.device)
        return self.rows

    @torch.no_grad()
    def _operands(self, layer):
        """A_cat [in, R], B_cat [R, out] (the base layer's dtype) and the scale table [groups, R]."""
        base = layer.get_base_layer().weight
        present = [(g, name) for g, name in enumerate(self.names, 1) if name in layer.lora_A]
        a = torch.cat([layer.lora_A[name].weight.t() for _, name in present], 1).to(base.dtype).contiguous()
        b = torch.cat([layer.lora_B[name].weight.t() for _, name in present], 0).to(base.dtype).contiguous()
        table = torch.zeros(self.groups, a.shape[1], dtype=base.dtype, device=base.device)
        col = 0
        for g, name in present:
            r = layer.lora_A[name].weight.shape[0]
            table[g, col:col + r] = layer.scaling[name]
            col += r
        return a, b, table

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
            for name in BUFFERS:
                delattr(layer, name)
            del layer.mixed_state
        self._layers = []
