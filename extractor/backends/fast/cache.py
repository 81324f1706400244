"""The decoder's K/V memory: one slot per record for its own tokens (plus a scratch slot that padding rows of a
decode bucket write into), and the shared prefix's K/V, stored once, that every row attends to. A prompt-learning
adapter's virtual part (VirtualPrefix) goes before the prefix's tokens; with mixed LoRA adapters each adapter
group has its own prefix K/V, computed through its own weights. Also: how many slots fit in GPU memory.
"""
from __future__ import annotations

import torch

from extractor.backends.fast.families import FastPathError


class VirtualPrefix:
    """What a prompt-learning adapter puts before every prompt, computed once per adapter. Either `embeds`
    [V, hidden] (prompt tuning, P-tuning: virtual tokens at positions 0..V-1 through every layer) or `keys` and
    `values`, one [KV heads, V, head dim] tensor per layer (prefix tuning: K/V that carry no position). The
    prompt's own tokens follow at positions V.., as peft's forward places them."""

    def __init__(self, embeds=None, keys=None, values=None):
        self.embeds, self.keys, self.values = embeds, keys, values

    @property
    def length(self) -> int:
        return self.embeds.shape[0] if self.embeds is not None else self.keys[0].shape[1]

    @staticmethod
    def shape(virtual: "VirtualPrefix | None") -> tuple | None:
        """What a decoder's buffers depend on: none, or the length and whether embeddings or K/V."""
        return None if virtual is None else (virtual.length, virtual.embeds is None)


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest common prefix, leaving every sequence at least one token of its own."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return first[:max(n, 0)]


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def kv_bytes_per_token(model) -> int:
    cfg = text_config(model)
    return 2 * cfg.num_hidden_layers * kv_heads(cfg) * head_dim(cfg) * next(model.parameters()).element_size()


def slots_for_memory(model, unique_len: int, device, fraction: float = 0.75, cap: int = 1024) -> int:
    """Slots whose own K/V fit in `fraction` of the free GPU memory, counting memory torch has cached but
    not allocated (the batch size from free memory); the rest is left to prefill activations and the
    logits of a decode step."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, unused
    return max(1, min(cap, int(free * fraction // (kv_bytes_per_token(model) * unique_len))))


class KVCache:
    """FastDecoder's K/V buffers and how a pass writes and reads them (a part of FastDecoder: the model's
    shape, `slots`, `unique_len` and the runner's `_logits_of` come from there). `k`, `v`: [layers, slots + 1,
    KV heads, unique_len, head dim]; `pk`, `pv`: [layers, (groups,) KV heads, prefix length, head dim]."""

    def _init_cache(self) -> None:
        # One extra slot is scratch: padding rows of a decode bucket write their K/V there.
        shape = (self.n_layers, self.slots + 1, self.kv_heads, self.unique_len, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.prefix: list[int] = []
        self.virtual, self.n_prefix = None, 0  # n_prefix: positions before a record's own (virtual + prefix)
        self.pk = self.pv = None

    # -- what one layer's attention stores ---------------------------------------------------------------
    def _store_prefix(self, layer: int, group: int | None, start: int, k, v):
        """The prefix pass's K/V [1, KVH, T, D] after `start` entries already there (prefix tuning's virtual
        K/V); returns the keys and values to attend to, those entries included."""
        t = k.shape[2]
        pk, pv = self._prefix_kv(layer, group)
        pk[:, start:start + t], pv[:, start:start + t] = k[0], v[0]
        if start:
            k = torch.cat((pk[:, :start].unsqueeze(0), k), dim=2)
            v = torch.cat((pv[:, :start].unsqueeze(0), v), dim=2)
        return k, v

    def _store_rows(self, layer: int, rows, width: int, k, v, groups):
        """A prefill chunk's K/V [B, KVH, width, D] into its rows' slots; returns the keys and values to attend
        to: the shared prefix's (each row's own adapter group's, with `groups`) before the rows' own."""
        self.k[layer, rows, :, :width] = k
        self.v[layer, rows, :, :width] = v
        if self.n_prefix:
            n = len(rows)
            if groups is None:
                k = torch.cat((self.pk[layer].unsqueeze(0).expand(n, -1, -1, -1), k), dim=2)
                v = torch.cat((self.pv[layer].unsqueeze(0).expand(n, -1, -1, -1), v), dim=2)
            else:  # each row after its own adapter's prefix K/V
                k = torch.cat((self.pk[layer][groups], k), dim=2)
                v = torch.cat((self.pv[layer][groups], v), dim=2)
        return k, v

    def _store_token(self, layer: int, slot, own, k, v) -> None:
        """A decode step's K/V [B, KVH, 1, D]: each row's at its own position `own` in its slot."""
        self.k[layer, slot, :, own] = k[:, :, 0]
        self.v[layer, slot, :, own] = v[:, :, 0]

    # -- the shared prefix ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _set_prefix(self, prefix: list[int]) -> None:
        """The shared prefix's K/V, once: a prompt-learning adapter's virtual part first, then the tokens."""
        virtual = self.virtual
        v_len = virtual.length if virtual is not None else 0
        self.n_prefix = v_len + len(prefix)
        shape = self._prefix_shape(self.n_prefix)
        if self.pk is None or tuple(self.pk.shape) != shape:  # else in place: captured graphs read these buffers
            self.pk = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.pv = torch.zeros(shape, device=self.device, dtype=self.dtype)
        ids = torch.tensor([prefix], device=self.device, dtype=torch.long)
        if self._group is not None:  # one prefix K/V per adapter group, each through its own weights
            positions = torch.arange(len(prefix), device=self.device).unsqueeze(0)
            for group in range(self.groups if prefix else 0):
                self._set_groups(torch.tensor([group]))
                self._logits_of(ids, positions, kind="prefix", group=group)
            return
        if virtual is not None and virtual.embeds is not None:  # virtual tokens through every layer
            embeds = torch.cat((virtual.embeds.to(self.dtype).unsqueeze(0), self.model.get_input_embeddings()(ids)), 1)
            positions = torch.arange(self.n_prefix, device=self.device).unsqueeze(0)
            self._logits_of(None, positions, embeds=embeds, kind="prefix")
            return
        if virtual is not None:  # prefix tuning: its K/V are the first entries, as they are
            for layer, (k, v) in enumerate(zip(virtual.keys, virtual.values)):
                if tuple(k.shape) != (self.kv_heads, v_len, self.head_dim):
                    raise FastPathError(f"the adapter's prefix K/V of layer {layer} have shape {tuple(k.shape)}, "
                                        f"not {self.kv_heads} heads of {self.head_dim}")
                self.pk[layer, :, :v_len], self.pv[layer, :, :v_len] = k, v
        if prefix:
            positions = (v_len + torch.arange(len(prefix), device=self.device)).unsqueeze(0)
            self._logits_of(ids, positions, kind="prefix", start=v_len)

    def _prefix_shape(self, length: int) -> tuple:
        """[layers, KV heads, length, head dim]; with mixed adapters a group axis after the layers."""
        groups = () if self._group is None else (self.groups,)
        return (self.n_layers, *groups, self.kv_heads, length, self.head_dim)

    def _prefix_kv(self, layer: int, group: int | None):
        """The prefix K/V of one layer [KV heads, P, D]: the one prefix, or this adapter group's."""
        if group is None:
            return self.pk[layer], self.pv[layer]
        return self.pk[layer, group], self.pv[layer, group]

    def reuse_for(self, virtual: VirtualPrefix | None) -> bool:
        """Take other weights of the same model (another LoRA adapter, merged into the same tensors in place)
        or another virtual part of the same length: the shared prefix's K/V are recomputed in place, the
        cache, compiled code and CUDA graphs are kept. False when the shapes differ (build a new decoder)."""
        if self.adapters is not None or VirtualPrefix.shape(virtual) != VirtualPrefix.shape(self.virtual):
            return False
        self.virtual = virtual
        self._set_prefix(self.prefix)
        return True
