"""The weights the `hf` backend decodes with, and the one place they change: the base model alone; one adapter
(a LoRA merged into the base weights for the fast path, or peft's own layers; a prompt-learning adapter's
wrapper, and its virtual part once computed); or several LoRA adapters loaded at once, their layers mixed
(lora_mixed.py).

The backend's decoders are built on these weights, so it drops them around `use` and `load_mix`; this module
knows nothing of decoders."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from extractor.errors import ModelError

MIXED = "\0mixed"  # Weights.adapter while several LoRA adapters are loaded at once (no request names it)
HANDED = "default"  # Weights.adapter of a peft model handed over by training (peft's own adapter name)


@dataclass
class Mix:
    """The LoRA adapters loaded together and their mixed layers (lora_mixed.MixedLoRA)."""
    names: list[str]
    lora: object


class Weights:
    """`model` decodes: `base`, or a peft model around it holding `adapter`. `paths`: the adapters this
    backend may load, by name. `say(line)`: a line on stderr, once per backend."""

    def __init__(self, base, model_path: Path, paths: dict[str, Path], device: str, say):
        self.base = self.model = base
        self.adapter: str | None = None
        self.model_path, self.paths, self.device, self._say = model_path, paths, device, say
        self.mix: Mix | None = None
        self._merged = None  # a LoRA adapter this backend loaded, merged into the base for the fast path
        self._unmergeable: str | None = None  # the adapter whose merge failed (its layers run unmerged)
        self._unmixable: set[frozenset] = set()  # adapter sets refused for mixing (said once)
        self._virtual = None  # the prompt-learning adapter's virtual part, once computed

    def hand_over(self, peft_model) -> None:
        """A peft model being trained (training's F1 evaluation): it is its adapter, never merged or swapped."""
        self.model, self.base, self.adapter = peft_model, peft_model.get_base_model(), HANDED
        self._virtual = None

    def trained(self) -> None:
        """The tensors were updated in place (a training step): inference mode again, and a prompt-learning
        adapter's virtual part recomputed at its next use."""
        self.base.eval()
        self.model.eval()
        self._virtual = None

    # -- one adapter at a time ---------------------------------------------------------------------
    def use(self, name: str | None) -> None:
        """Swap adapters on the one base model: mixed layers closed, a merge undone (the base weights back
        exactly), LoRA layers unloaded, prompt-learning wrappers dropped; then `name` loaded (None: base)."""
        from peft import PeftModel
        if self.mix is not None:  # its LoRA layers go with the unload below (the base weights' values unchanged)
            self.mix.lora.close()
            self.mix = None
        self._virtual = None
        if self._merged is not None:  # its layers are out already: the base weights back, exactly
            self._merged.restore()
            self._merged = None
        elif self.adapter is not None:
            self.base = self.model.unload() if hasattr(self.model, "unload") and not self.prompt_learning() \
                else self.model.get_base_model()
        self.model, self.adapter = self.base, None
        if name is None:
            return
        try:
            self.model = PeftModel.from_pretrained(self.base, self.paths[name]).to(self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"adapter '{self.paths[name]}' cannot be loaded on {self.model_path} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        self.model.eval()
        self.adapter = name

    def prompt_learning(self) -> bool:
        config = getattr(self.model, "peft_config", {}).get("default")
        return bool(config and config.is_prompt_learning)

    def virtual_tokens(self, adapter: str | None = None) -> int:
        """Positions a prompt-learning adapter puts before every prompt: the named adapter's (read from its
        config, nothing loaded), else the one in the model (training's)."""
        if adapter in self.paths:
            config = self.adapter_config(adapter)
            from extractor.backends.prompt_learning import KINDS
            return int(config.get("num_virtual_tokens") or 0) if config.get("peft_type") in KINDS else 0
        return self.model.peft_config["default"].num_virtual_tokens if self.prompt_learning() else 0

    def virtual_prefix(self, dtype):
        """A prompt-learning adapter's virtual part (None without one), computed once per adapter for both
        decoding paths: its tokens or K/V go first in the fast path's shared prefix and before each plain record."""
        if not self.prompt_learning():
            return None
        if self._virtual is None:
            from extractor.backends.prompt_learning import virtual_prefix
            self._virtual = virtual_prefix(self.model, dtype)
        return self._virtual

    def adapter_config(self, name: str) -> dict:
        return json.loads((self.paths[name] / "adapter_config.json").read_text(encoding="utf-8"))

    def merge(self) -> None:
        """A LoRA adapter this backend loaded decodes merged into the base weights (base speed; the weights
        come back exactly at the next `use`). A model handed over by training stays unmerged: its adapter is
        still being trained."""
        if self._merged is not None or self.adapter not in self.paths or self.prompt_learning() or \
                self.adapter == self._unmergeable:
            return  # merged already, no adapter, not one this backend loaded (training's), or tried and failed
        from extractor.backends.lora_merge import MergedLoRA
        try:
            merged = MergedLoRA(self.model)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError) as exc:
            print(f"fast path: the LoRA adapter cannot be merged ({str(exc).splitlines()[0][:160]}); its layers "
                  "run unmerged", file=sys.stderr, flush=True)
            self._unmergeable = self.adapter  # said once, not tried again at every call
            return
        # Merged, the LoRA layers only pass through to their base layers: take them out, so the model is
        # the very modules it was before (code compiled for it, or for an earlier adapter, still applies).
        self.model = self.base = self.model.unload()
        self._merged = merged

    @property
    def merged(self):
        """The merged adapter's restore record (lora_merge.MergedLoRA), None when nothing is merged."""
        return self._merged

    # -- several LoRA adapters mixed ---------------------------------------------------------------
    def mixing(self, names: list[str]) -> bool:
        """These adapters are all loaded and mixed now."""
        return self.mix is not None and set(names) <= set(self.mix.names)

    def refuses_mix(self, names: list[str]) -> bool:
        """These adapters cannot mix exactly, by their configs (said once), or were refused before."""
        if frozenset(names) in self._unmixable:
            return True
        from extractor.backends.lora_mixed import config_refusal
        why = next((w for n in names if (w := config_refusal(n, self.adapter_config(n)))), None)
        if why is None:
            return False
        self._refuse_mix(names, why)
        return True

    def load_mix(self, names: list[str]) -> bool:
        """Every adapter in `names` loaded on the base at once, their LoRA layers mixed; False (said once,
        the base alone again) where a layer cannot mix exactly. Mixing moves some base weights' storage
        (lora_mixed's fold): a decoder built before must not outlive this call."""
        from peft import PeftModel

        from extractor.backends.fast.families import FastPathError
        from extractor.backends.lora_mixed import MixedLoRA
        self.use(None)
        try:
            model = PeftModel.from_pretrained(self.base, self.paths[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(self.paths[name], adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"adapters {names} cannot be loaded together on {self.model_path} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        self.model, self.adapter = model.to(self.device).eval(), MIXED
        try:
            self.mix = Mix(names, MixedLoRA(self.model, names))
        except FastPathError as exc:
            self.use(None)
            self._refuse_mix(names, str(exc).removeprefix("mixed LoRA decoding: "))
            return False
        return True

    def _refuse_mix(self, names: list[str], why: str) -> None:
        """Not tried again for these adapters; said once."""
        self._unmixable.add(frozenset(names))
        self._say(f"fast path: mixed LoRA decoding refused ({why}); these adapters decode one at a time")

    @contextmanager
    def plain(self, adapter: str | None):
        """With adapters mixed: peft's own forward with only `adapter` active (None: base weights)."""
        if self.mix is None:
            yield
            return
        with self.mix.lora.off():
            if adapter is None:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(adapter)
                yield
