"""FastDecoder: a static-cache, continuously batched greedy decoder over a transformers model's own forward.

The layer math is the model's own: FastDecoder calls the model's forward (its embeddings and their scaling,
norms wherever the family puts them, projections fused or not, rotary partial or per layer, MLP or MoE,
multipliers, the head and its softcap or scaling), with transformers' attention-function interface pointed
at `_attention` below. That function, and only it, is ours: it stores each layer's K/V in our cache layout and
attends with the layer's own scale, softcap and sliding window, as the module hands them over. Which model
types may take this path is an explicit list, each proven by a test (fast_families.py).

What makes it fast (issue 6):
- the shared prompt prefix (instructions, few-shot examples) is prefilled once; its K/V live in one buffer
  that every row attends to, so neither prefill nor the cache repeats it per record;
- a preallocated cache of `slots` rows holds each record's own tokens; a finished row's slot is refilled
  with the next record (continuous batching); new records are prefilled together, in length order, with
  flash attention over prefix + own tokens, writing their K/V into their slots in place;
- a decode step runs the live rows packed into a batch bucket (a few sizes), captured as CUDA graphs:
  one launch per token; decode attention reads only each row's own length (fast_attention.py);
- the loop runs one step ahead of the host: step k+1 takes its input tokens from step k's output on the
  GPU while the host books step k; with a constraint, the grammar work for step k+1's masks (in worker
  processes, constrain/workers.py) runs while the GPU runs step k+1's forward pass.

Greedy outputs equal `generate` (tests/test_fast.py and tests/test_fast_families.py on CPU in fp32;
bench/gpu_fast.py on the GPU).
"""
from __future__ import annotations

import functools
import threading
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from extractor.backends import fast_attention
from extractor.backends.fast_families import FastPathError, check_attention_kwargs

ATTENTION = "extractor_fast"  # the name our attention function is registered under in transformers
_active = threading.local()   # the decoder whose forward pass is running on this thread


@torch._dynamo.disable  # ours, with Python-side state and a Triton kernel: compiled code calls it as it is
def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers' attention-function contract: q [B, H, T, D], k/v [B, KVH, T, D] after the layer's own
    rotary and norms; returns ([B, T, H, D], None)."""
    decoder = getattr(_active, "decoder", None)
    if decoder is None:
        raise FastPathError("the fast path's attention was called outside FastDecoder")
    check_attention_kwargs(module, kwargs)
    if scaling is None:  # what transformers' eager attention does without one
        scaling = module.head_dim ** -0.5
    out = decoder._attend(module.layer_idx, query, key, value, scaling, softcap, sliding_window)
    return out.transpose(1, 2), None


@torch._dynamo.disable
def _last_positions(_head, args):
    """Forward pre-hook of the head: in a prefill pass, each row's hidden state at its last real position."""
    decoder = getattr(_active, "decoder", None)
    last = decoder._mode.get("last") if decoder is not None else None
    if last is None:
        return None
    hidden = args[0]
    return (hidden[torch.arange(len(last), device=hidden.device), last].unsqueeze(1), *args[1:])


def _hook_head(model) -> None:
    """The head sees each prefill row's last position only. One hook per model, for good (a no-op outside
    our prefill passes): a hook made per pass would make compiled code recompile at every prefill chunk."""
    head = model.get_output_embeddings()
    if not getattr(head, "_extractor_last_positions", False):
        head.register_forward_pre_hook(_last_positions)
        head._extractor_last_positions = True


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, _attention)


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


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextmanager
def _gc_paused():
    import gc
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def decoder_layers(model, n_layers: int) -> list | None:
    """The model's stack of decoder layers (the one ModuleList of `n_layers` blocks), else None."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return list(module)
    return None


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def kv_bytes_per_token(model) -> int:
    cfg = _text_config(model)
    return 2 * cfg.num_hidden_layers * _kv_heads(cfg) * _head_dim(cfg) * next(model.parameters()).element_size()


def slots_for_memory(model, unique_len: int, device, fraction: float = 0.75, cap: int = 1024) -> int:
    """Slots whose own K/V fit in `fraction` of the free GPU memory, counting memory torch has cached but
    not allocated (the batch size from free memory); the rest is left to prefill activations and the
    logits of a decode step."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, unused
    return max(1, min(cap, int(free * fraction // (kv_bytes_per_token(model) * unique_len))))


def buckets_up_to(slots: int, smallest: int = 8, per_octave: int = 4) -> list[int]:
    """Decode batch sizes: multiples of `smallest` up to 8 * smallest, then `per_octave` evenly spaced sizes
    per doubling (padding: under `smallest` rows, or at most a quarter of the live rows). Rows finishing at
    EOS shrink the live batch a few at a time, so coarse buckets would pad many steps heavily."""
    sizes = {slots}
    top = smallest * 8
    sizes.update(s for s in range(smallest, min(top, slots) + 1, smallest) if s < slots)
    low = top
    while low < slots:
        sizes.update(s for s in range(low + low // per_octave, 2 * low + 1, low // per_octave) if s < slots)
        low *= 2
    return sorted(sizes)


class FastDecoder:
    """Greedy decoding of many suffixes after one shared prefix. `unique_len`: the longest suffix plus the
    most new tokens a record may get. Raises FastPathError at construction when the model's forward does not
    run on this path (checked on a short probe against the model's own forward)."""

    def __init__(self, model, prefix: list[int], slots: int, unique_len: int, eos_ids: list[int],
                 attention: str = "auto", prefill_tokens: int = 32768, compile: bool = False,
                 virtual: VirtualPrefix | None = None, adapters=None, compile_scope: str = "layers"):
        _register()
        if adapters is not None and virtual is not None:
            raise FastPathError("mixed LoRA adapters and a prompt-learning adapter's virtual part in one decoder")
        self.model = model
        # adapters (lora_mixed.MixedLoRA): rows of several LoRA adapters (and base) decode together, each
        # record's group in its stream item; one prefix K/V per group. None: one set of weights, as before.
        self.adapters = adapters
        self.groups = adapters.groups if adapters is not None else 1
        cfg = _text_config(model)
        self.n_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = _kv_heads(cfg)
        self.head_dim = _head_dim(cfg)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.slots, self.unique_len = slots, unique_len
        self.eos = np.array(sorted(set(eos_ids)) or [-1])
        self.prefill_tokens = prefill_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if attention == "auto":
            attention = "triton" if self.device.type == "cuda" and fast_attention.works_on(
                self.device, self.dtype, self.head_dim, self.heads, self.kv_heads) else "torch"
        self._attn_fn = fast_attention.decode_attention_triton if attention == "triton" \
            else fast_attention.decode_attention_torch
        self.attention = attention
        # One extra slot is scratch: padding rows of a decode bucket write their K/V there.
        shape = (self.n_layers, slots + 1, self.kv_heads, unique_len, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._flash_gqa = self.device.type == "cuda" and _flash_takes_gqa(self.device, self.dtype, self.head_dim)
        self._mode: dict = {}
        # Every config object the model's modules read `_attn_implementation` from (sub-configs included):
        # found once, switched to our attention for each forward pass.
        self._configs = list({id(m.config): m.config for m in model.modules()
                              if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
        _hook_head(model)
        self._forward = self.model
        self._layer_calls: list = []  # regional compilation: (layer, its compiled forward), set in _native
        self.compile_scope = compile_scope
        self.compiled = bool(compile)  # off by default: CUDA graphs already remove the decode step's launches
        if self.compiled:
            self._compile()
        # Static inputs/outputs of the decode step (the captured graphs read and write these).
        self._ids = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._slot = torch.full((slots,), slots, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._logits = torch.zeros(slots, self.vocab, dtype=self.dtype, device=self.device)
        # each row's adapter group (prefill and decode passes; the LoRA layers and the prefix read it)
        self._group = adapters.attach(slots + 1) if adapters is not None else None
        self.prefix: list[int] = []
        self.virtual, self.n_prefix = None, 0  # n_prefix: positions before a record's own (virtual + prefix)
        self.pk = self.pv = None
        if not (self.compiled and self._compiles()):  # _compiles probes the compiled forward itself
            self._forward, self.compiled, self._layer_calls = self.model, False, []
            self._probe()
        self.prefix, self.virtual = list(prefix), virtual
        self._set_prefix(self.prefix)
        pinned = self.device.type == "cuda"
        # Host staging and token buffers of a step, two sets used in turn (the pipelined loop has one step in
        # flight while it stages the next).
        staged = 4 if adapters is None else 5  # source, slot, position, last token (, group)
        self._stage = [torch.zeros(staged, slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._tok_dev = [torch.zeros(slots, dtype=torch.long, device=self.device) for _ in range(2)]
        self._tok_host = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pinned else None
        self.buckets = buckets_up_to(slots)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._use_graphs, self._pool = False, None
        self.stats = {"prefill_s": 0.0, "prefills": 0, "decode_s": 0.0, "steps": 0, "padded_rows": 0,
                      "collect_wait_s": 0.0, "mask_s": 0.0}
        self.trace: list | None = None  # a list: (rows, width, tokens, seconds) of each prefill chunk

    # -- the model's own forward, with our attention -----------------------------------------------------
    @contextmanager
    def _native(self, **mode):
        """The model's forward runs with `_attention` in this block; `mode` tells it what the pass is:
        prefix, prefill (rows, width, last) or decode (slot, own)."""
        before = [c._attn_implementation for c in self._configs]
        previous = getattr(_active, "decoder", None)
        _active.decoder, self._mode = self, mode
        for c in self._configs:
            c._attn_implementation = ATTENTION
        for layer, call in self._layer_calls:  # only our passes run compiled: the plain path stays the reference
            layer.forward = call
        try:
            yield
        finally:
            for layer, _ in self._layer_calls:
                del layer.forward
            for c, implementation in zip(self._configs, before):
                c._attn_implementation = implementation
            _active.decoder, self._mode = previous, {}

    def _logits_of(self, ids, positions, embeds=None, **mode) -> torch.Tensor:
        """The model's logits at each row's last position (`mode["last"]` in prefill, else the last column);
        `embeds` instead of `ids`: input embeddings (a prompt-learning adapter's virtual tokens)."""
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        with self._native(**mode):
            out = self._forward(**inputs, position_ids=positions, use_cache=False)
        return out.logits[:, -1]

    def _compile(self) -> None:
        """torch.compile around our attention (each layer's attention call is a graph break), so that norms,
        rotary and activations fuse into fewer kernels. Scope "layers" (regional): one compiled forward per
        decoder-layer class, which every layer of that class reuses (its weights are inputs of the graph),
        so a 28-layer model traces and compiles one layer, not 28; the embeddings and head run eager.
        "model": the whole forward. Either way only our passes run it (`_native`)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 512)
        layers = decoder_layers(self.model, self.n_layers) if self.compile_scope == "layers" else None
        if layers is None:
            self._forward = torch.compile(self.model, dynamic=True)
            return
        compiled: dict = {}
        for layer in layers:
            fn = compiled.setdefault(type(layer), torch.compile(type(layer).forward, dynamic=True))
            self._layer_calls.append((layer, functools.partial(fn, layer)))

    def _compiles(self) -> bool:
        """Run the compiled forward once on the probe: where this machine cannot (no compiler, an unsupported
        GPU), say so and stay eager instead of failing mid-run."""
        try:
            self._probe()
            return True
        except FastPathError as exc:
            import warnings
            warnings.warn(f"torch.compile is unavailable here ({str(exc)[:200]}); the fast path runs eager",
                          stacklevel=3)
            return False

    def _attend(self, layer: int, q, k, v, scale: float, softcap, window):
        """Store this layer's new K/V in the cache and attend: q [B, H, T, D], k/v [B, KVH, T, D]."""
        if k.shape[1] != self.kv_heads or k.shape[-1] != self.head_dim or not 0 <= layer < self.n_layers:
            raise FastPathError(f"layer {layer} has K/V of shape {tuple(k.shape)}, not the config's "
                                f"{self.kv_heads} heads of {self.head_dim}")
        mode = self._mode
        kind = mode.get("kind")
        if kind == "prefix":  # after `start` entries already there (prefix tuning's virtual K/V)
            start, t = mode.get("start", 0), k.shape[2]
            pk, pv = self._prefix_kv(layer, mode.get("group"))
            pk[:, start:start + t], pv[:, start:start + t] = k[0], v[0]
            if start:
                k = torch.cat((pk[:, :start].unsqueeze(0), k), dim=2)
                v = torch.cat((pv[:, :start].unsqueeze(0), v), dim=2)
            return fast_attention.prefill_attention(q, k, v, scale, softcap, window, self._flash_gqa)
        if kind == "prefill":
            rows, width = mode["rows"], mode["width"]
            self.k[layer, rows, :, :width] = k
            self.v[layer, rows, :, :width] = v
            if self.n_prefix:
                n, groups = len(rows), mode.get("groups")
                if groups is None:
                    k = torch.cat((self.pk[layer].unsqueeze(0).expand(n, -1, -1, -1), k), dim=2)
                    v = torch.cat((self.pv[layer].unsqueeze(0).expand(n, -1, -1, -1), v), dim=2)
                else:  # each row after its own adapter's prefix K/V
                    k = torch.cat((self.pk[layer][groups], k), dim=2)
                    v = torch.cat((self.pv[layer][groups], v), dim=2)
            return fast_attention.prefill_attention(q, k, v, scale, softcap, window, self._flash_gqa)
        if kind == "decode":
            slot, own = mode["slot"], mode["own"]
            self.k[layer, slot, :, own] = k[:, :, 0]
            self.v[layer, slot, :, own] = v[:, :, 0]
            grouped = {"prefix_group": mode["groups"]} if "groups" in mode else {}
            out = self._attn_fn(q[:, :, 0].contiguous(), self.k[layer], self.v[layer], self.pk[layer],
                                self.pv[layer], slot, own + 1, scale, softcap=softcap, window=window,
                                **mode.get("trim", {}), **grouped)
            return out.unsqueeze(2)
        raise FastPathError(f"attention called in an unknown mode {kind!r}")

    @torch.inference_mode()
    def _probe(self, length: int = 6) -> None:
        """Prove this model's forward runs on the path before any record does: a short sequence prefilled
        into the scratch slot, then one decode step, against the model's own forward. Raises FastPathError."""
        self.pk = torch.zeros(self._prefix_shape(0), device=self.device, dtype=self.dtype)
        self.pv = torch.zeros_like(self.pk)
        ids = torch.arange(1, length + 2, device=self.device).remainder(self.vocab).unsqueeze(0)
        try:
            # with mixed adapters: base weights (group 0) on both sides
            grouped = {} if self._group is None else {"groups": self._set_groups(torch.zeros(1, dtype=torch.long))}
            want = self.model(input_ids=ids, use_cache=False).logits[0, -2:].float()
            scratch = torch.tensor([self.slots], device=self.device)
            first = self._prefill_logits(scratch, ids[:, :length], np.array([length - 1]), **grouped)
            pos = torch.tensor([length], device=self.device)
            second = self._logits_of(ids[:, length:], pos.unsqueeze(1), kind="decode", slot=scratch,
                                     own=pos, **grouped)
        except FastPathError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the family's code does differently: not proven
            raise FastPathError(f"the model's forward does not run on the fast path ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
        got = torch.stack((first[0], second[0])).float()
        tol = 1e-3 if self.dtype == torch.float32 else 0.1
        gap = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if not gap <= tol:
            raise FastPathError(f"the fast path's logits differ from the model's own forward on a probe "
                                f"(relative gap {gap:.2g} > {tol})")

    # -- the shared prefix -----------------------------------------------------------------------------
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

    def _set_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """The next pass's rows' adapter groups, where its LoRA layers read them; returns that view."""
        n = len(groups)
        self._group[:n] = groups.to(self.device, non_blocking=True)
        return self._group[:n]

    def reuse_for(self, virtual: VirtualPrefix | None) -> bool:
        """Take other weights of the same model (another LoRA adapter, merged into the same tensors in place)
        or another virtual part of the same length: the shared prefix's K/V are recomputed in place, the
        cache, compiled code and CUDA graphs are kept. False when the shapes differ (build a new decoder)."""
        if self.adapters is not None or VirtualPrefix.shape(virtual) != VirtualPrefix.shape(self.virtual):
            return False
        self.virtual = virtual
        self._set_prefix(self.prefix)
        return True

    # -- prefill of new records ------------------------------------------------------------------------
    def _prefill(self, slots: list[int], suffixes: list[list[int]], groups: list[int] | None = None) -> torch.Tensor:
        """Several new records at once (right-padded): writes their K/V into their slots; returns the
        logits of each one's last position (its first generated token). groups: each one's adapter group."""
        width = max(len(s) for s in suffixes)
        padded = np.zeros((len(suffixes), width), np.int64)  # numpy: a list of lists is slow to convert
        for i, s in enumerate(suffixes):
            padded[i, : len(s)] = s
        rows = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        last = np.array([len(s) - 1 for s in suffixes], np.int64)
        grouped = {} if groups is None else {"groups": self._set_groups(torch.tensor(groups, dtype=torch.long))}
        return self._prefill_logits(rows, torch.from_numpy(padded).to(self.device), last, **grouped)

    def _prefill_logits(self, rows, ids, last: np.ndarray, **grouped) -> torch.Tensor:
        width = ids.shape[1]
        positions = (self.n_prefix + torch.arange(width, device=self.device)).unsqueeze(0).expand(len(ids), -1)
        return self._logits_of(ids, positions, kind="prefill", rows=rows, width=width,
                               last=torch.from_numpy(last).to(self.device), **grouped)

    # -- decode ----------------------------------------------------------------------------------------
    def _step(self, b: int) -> None:
        """One token for the first `b` rows of the static inputs; their logits into self._logits."""
        slot, pos = self._slot[:b], self._pos[:b]
        own = pos - self.n_prefix  # position inside the slot
        trim = {}
        if self.attention == "torch" and self.device.type == "cpu":  # no graphs: read up to the longest row only
            trim["max_len"] = int(own.max()) + 1
        grouped = {} if self._group is None else {"groups": self._group[:b]}  # staged with the slots
        logits = self._logits_of(self._ids[:b].unsqueeze(1), pos.unsqueeze(1), kind="decode", slot=slot, own=own,
                                 trim=trim, **grouped)
        self._logits[:b].copy_(logits)

    def capture(self) -> None:
        """Decode steps run as CUDA graphs from now on (CUDA only): one graph per batch bucket, captured when
        a step first needs it (a fixed-length job touches a few buckets; capture costs ~0.1 s each)."""
        self._use_graphs = self.device.type == "cuda"

    def _graph(self, b: int):
        graph = self._graphs.get(b)
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up kernels (Triton compiles) and the allocator outside the graph
                    self._step(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:  # no garbage collection while capturing: a collection there costs time and frees nothing of ours
                with _gc_paused(), torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                    self._step(b)
            except RuntimeError as exc:  # the family's code syncs with the host (e.g. an MoE's expert loop)
                return self._no_graphs(exc)
            self._pool = graph.pool()
            self._graphs[b] = graph
        return graph

    def _no_graphs(self, exc: Exception) -> None:
        """This model's decode step cannot be captured: decode eagerly from now on (same tokens, slower)."""
        import warnings
        torch.cuda.synchronize()
        self._use_graphs = False
        warnings.warn(f"{type(self.model).__name__}'s decode step cannot run as a CUDA graph "
                      f"({str(exc).splitlines()[0][:160]}); the fast path decodes without graphs", stacklevel=3)
        return None

    # -- the scheduler -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, suffixes: list[list[int]], max_new, refill: int | None = None, constraint=None,
                 groups: list[int] | None = None):
        """Greedy outputs for each suffix (after the shared prefix), in input order: (tokens, finish_reason).
        All suffixes are known, so they enter in length order (each batched prefill pads little).
        groups: each suffix's adapter group (a decoder with mixed adapters)."""
        budgets = [max_new] * len(suffixes) if np.isscalar(max_new) else list(max_new)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        results: list = [None] * len(suffixes)
        items = ((i, suffixes[i], budgets[i]) if groups is None else (i, suffixes[i], budgets[i], groups[i])
                 for i in order)
        for key, tokens, reason in self.stream(items, refill, constraint, lookahead=len(suffixes)):
            results[key] = (tokens, reason)
        return results

    @torch.inference_mode()
    def stream(self, source, refill: int | None = None, constraint=None, lookahead: int | None = None):
        """Decode records pulled from `source` — (key, suffix, budget) triples, or (key, suffix, budget,
        adapter group) with mixed adapters — yielding (key, tokens, finish_reason) as each finishes. Records
        are pulled only when slots free up (at most `lookahead` waiting), admitted first come first served once
        `refill` slots are free (default: an eighth), and prefilled in length-sorted chunks. constraint:
        per-row token masks (constrain.batch.BatchConstraint)."""
        source = iter(source)
        refill = refill or max(1, self.slots // 8)
        lookahead = lookahead or 2 * self.slots
        yield from self._stream_pipelined(source, refill, lookahead, constraint)

    def _stream_pipelined(self, source, refill, lookahead, constraint=None):
        """The decode loop, one step ahead of the host: step k+1's forward pass is queued (its input tokens
        gathered on the GPU from step k's output) before step k's tokens are read back and booked, so the
        host's bookkeeping overlaps the GPU. A row that stops at EOS runs one step more than needed (its
        token is dropped); rows stopping on their budget are known ahead and never over-run.
        With a constraint, step k+1's argmax waits for its masks, which need step k's tokens: the host
        reads those, hands them to the constraint (its worker processes) and applies the masks while the
        GPU runs step k+1's forward pass, so the grammar's CPU work hides under it."""
        waiting: deque = deque()
        exhausted = False
        st = _SlotState(self.slots)
        launched = np.zeros(self.slots, np.int64)  # tokens each row will hold once its launched steps are read
        next_own = np.zeros(self.slots, np.int64)  # cache position the row's next launched step writes
        prev = None  # (rows, their record indices, buffer parity) of the step in flight
        parity = 0
        while True:
            exhausted = exhausted or self._top_up(source, waiting, lookahead)
            free = np.flatnonzero(st.key_index < 0)
            if waiting and (len(free) >= min(refill, len(waiting)) or len(free) == self.slots):
                admitted = self._admit(free, waiting, st, constraint)
                launched[admitted] = 1
                next_own[admitted] = st.own[admitted]
                yield from self._finished(st, admitted, constraint)
            rows = np.flatnonzero((st.key_index >= 0) & (launched < st.budget) & (next_own < self.unique_len))
            current = logits = None
            t0 = time.perf_counter()
            if len(rows):
                logits = self._forward_step(rows, st, prev, next_own[rows], parity)
                launched[rows] += 1
                next_own[rows] += 1
                current = (rows, st.key_index[rows].copy(), parity)
                self.stats["steps"] += 1
                parity ^= 1
                if constraint is None:
                    self._pick(logits, current[2])
            finished = []
            if prev is not None:
                done_rows, keys, par = prev
                toks = self._collect(par, len(done_rows))
                same = st.key_index[done_rows] == keys  # rows still holding the record they ran for
                st.record(done_rows[same], toks[same])
                finished = list(self._finished(st, done_rows[same], constraint))
            if current is not None and constraint is not None:
                # The grammar work starts before the caller sees the finished records (parsing, writing),
                # so that work overlaps it.
                apply = self._constrain(current, st, constraint)
                yield from finished
                self._pick_masked(logits, current[2], apply)
            else:
                yield from finished
            self.stats["decode_s"] += time.perf_counter() - t0
            prev = current
            if prev is None and not waiting and exhausted and not (st.key_index >= 0).any():
                return

    def _constrain(self, current, st: "_SlotState", constraint):
        """Hand a step's rows (with the tokens they took in) to the constraint; returns its mask callable.
        Rows that finished at the step before (slot freed, or refilled) ran this step for nothing: the
        constraint skips them."""
        t = time.perf_counter()
        rows, keys, _ = current
        live = rows[st.key_index[rows] == keys]
        apply = constraint.hook(st.keys_of(live), st.last[live], live)
        self.stats["mask_s"] += time.perf_counter() - t
        return lambda logits: apply(logits, rows)

    def _pick_masked(self, logits, parity: int, apply) -> None:
        """Mask a step's logits (waiting for the grammar work) and queue its argmax."""
        t = time.perf_counter()
        apply(logits)
        self._pick(logits, parity)
        self.stats["mask_s"] += time.perf_counter() - t

    def _forward_step(self, rows: np.ndarray, st: "_SlotState", prev, own: np.ndarray, parity: int):
        """Queue one decode step's forward pass for `rows` (packed into the smallest bucket that holds them)
        without waiting, and return its logits: a row that ran in the previous step takes its input token
        from that step's output on the GPU; any other row takes its last token from the host. `_pick`
        queues the argmax, `_collect` reads the tokens back."""
        n = len(rows)
        b = next(s for s in self.buckets if s >= n)
        self.stats["padded_rows"] += b - n
        src = np.full(n, -1, np.int64)
        if prev is not None:
            prev_rows, prev_keys, _ = prev
            where = np.full(self.slots, -1, np.int64)
            where[prev_rows] = np.arange(len(prev_rows))
            key_then = np.full(self.slots, -2, np.int64)
            key_then[prev_rows] = prev_keys
            src = np.where(key_then[rows] == st.key_index[rows], where[rows], -1)
        stage = self._stage[parity][:, :b]
        if self._events is not None:
            self._events[parity].synchronize()  # the copy that last used this staging buffer is done
        stage[0, :n] = torch.from_numpy(src)
        stage[1, :n] = torch.from_numpy(rows)
        stage[2, :n] = torch.from_numpy(own + self.n_prefix)
        stage[3, :n] = torch.from_numpy(st.last[rows])
        stage[0, n:], stage[1, n:], stage[2, n:], stage[3, n:] = -1, self.slots, self.n_prefix, 0
        if self._group is not None:  # each row's adapter group; padding rows base weights
            stage[4, :n], stage[4, n:] = torch.from_numpy(st.group[rows]), 0
        staged = stage.to(self.device, non_blocking=True)
        previous = self._tok_dev[parity ^ 1]
        self._ids[:b] = torch.where(staged[0] >= 0, previous[staged[0].clamp(min=0)], staged[3])
        self._slot[:b], self._pos[:b] = staged[1], staged[2]
        if self._group is not None:
            self._group[:b] = staged[4]
        graph = self._graph(b) if self._use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._step(b)
        return self._logits[:n]

    def _pick(self, logits, parity: int) -> None:
        n = logits.shape[0]
        out = self._tok_dev[parity][:n]
        out.copy_(logits.argmax(-1))
        self._tok_host[parity][:n].copy_(out, non_blocking=True)
        if self._events is not None:
            self._events[parity].record()

    def _collect(self, parity: int, n: int) -> np.ndarray:
        if self._events is not None:
            t = time.perf_counter()
            self._events[parity].synchronize()
            self.stats["collect_wait_s"] += time.perf_counter() - t
        return self._tok_host[parity][:n].numpy().copy()

    def _top_up(self, source, waiting: deque, lookahead: int) -> bool:
        """Pull records until `lookahead` wait; True once the source is exhausted."""
        while len(waiting) < lookahead:
            item = next(source, None)
            if item is None:
                return True
            self._check_fits(item)
            waiting.append(item)
        return False

    def _check_fits(self, item) -> None:
        if self._group is not None and not (len(item) == 4 and 0 <= item[3] < self.groups):
            raise ValueError(f"record {item[0]}: a decoder with {self.groups} adapter groups takes (key, suffix, "
                             "budget, group) items")
        if len(item[1]) + int(item[2]) > self.unique_len:
            raise ValueError(f"record {item[0]}: {len(item[1])} tokens plus a budget of {item[2]} exceed the "
                             f"decoder's unique_len {self.unique_len}")

    def _finished(self, st: "_SlotState", slots: np.ndarray, constraint):
        """Finish the rows that stopped (an EOS token) or ran out of budget or cache; free their slots."""
        toks = st.last[slots]
        stop = np.isin(toks, self.eos)
        length = ~stop & ((st.count[slots] >= st.budget[slots]) | (st.own[slots] >= self.unique_len))
        done = stop | length
        for s, is_stop in zip(slots[done].tolist(), stop[done].tolist()):
            key = st.keys[st.key_index[s]]
            if constraint is not None:
                constraint.release(key)
            yield key, st.out[s, : st.count[s]].tolist(), "stop" if is_stop else "length"
            st.free(s)

    def _chunk_size(self, lengths: list[int]) -> int:
        """How many of these (ascending) suffixes the next prefill chunk takes: at most `prefill_tokens`
        padded tokens; once it holds a few thousand (enough for the matmuls to run at full rate) it also
        stops before padding passes 4%, since padding is computed like real tokens."""
        take, real = 1, lengths[0]
        while take < len(lengths) and lengths[take] * (take + 1) <= self.prefill_tokens:
            padded = lengths[take] * (take + 1)
            if padded >= self.prefill_tokens * 3 // 8 and padded - real - lengths[take] > 0.04 * padded:
                break
            real += lengths[take]
            take += 1
        return take

    def _admit(self, free, waiting: deque, st: "_SlotState", constraint) -> np.ndarray:
        """Prefill waiting records into free slots: first come first served, then sorted by length into
        chunks of at most `prefill_tokens` padded tokens."""
        t0 = time.perf_counter()
        try:
            return self._admit_chunks(free, waiting, st, constraint)
        finally:
            self.stats["prefill_s"] += time.perf_counter() - t0

    def _admit_chunks(self, free, waiting: deque, st: "_SlotState", constraint) -> np.ndarray:
        batch = sorted((waiting.popleft() for _ in range(min(len(free), len(waiting)))), key=lambda it: len(it[1]))
        admitted = []
        fi = 0
        while batch:
            take = self._chunk_size([len(it[1]) for it in batch[:self.prefill_tokens]])
            chunk, batch = batch[:take], batch[take:]
            slots = free[fi: fi + len(chunk)]
            fi += len(chunk)
            t0 = time.perf_counter()
            groups = None if self._group is None else [it[3] for it in chunk]
            logits = self._prefill(slots.tolist(), [it[1] for it in chunk], groups)
            if constraint is not None:
                constraint.start([it[0] for it in chunk], [it[2] for it in chunk])
                constraint.mask_first([it[0] for it in chunk], logits, slots)
            first = logits.argmax(-1).cpu().numpy()
            if self.trace is not None:
                self.trace.append((len(chunk), max(len(it[1]) for it in chunk), sum(len(it[1]) for it in chunk),
                                   time.perf_counter() - t0))
            self.stats["prefills"] += 1
            st.take(slots, chunk, first, groups)
            admitted.append(slots)
        return np.concatenate(admitted) if admitted else np.array([], np.int64)


def _flash_takes_gqa(device, dtype, head_dim: int) -> bool:
    """Whether this torch's flash attention runs grouped K/V heads with a lower-right causal mask (and
    agrees with the expanded computation); else prefill expands K/V per query head."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    q = torch.randn(2, 4, 16, head_dim, device=device, dtype=dtype)
    k = torch.randn(2, 2, 40, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(16, 40), enable_gqa=True)
    except RuntimeError:
        return False
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=causal_lower_right(16, 40))
    return bool((got - ref).abs().max() < 2e-2)


class _SlotState:
    """Per-slot bookkeeping as numpy arrays, so a step's updates are vectorized over the live rows."""

    def __init__(self, slots: int):
        self.key_index = np.full(slots, -1)  # index into self.keys of the record in each slot (-1: free)
        self.keys: dict[int, object] = {}
        self._next = 0
        self.own = np.zeros(slots, np.int64)    # tokens in the slot's cache
        self.count = np.zeros(slots, np.int64)  # tokens generated
        self.last = np.zeros(slots, np.int64)
        self.budget = np.zeros(slots, np.int64)
        self.group = np.zeros(slots, np.int64)  # adapter group (mixed adapters; else 0)
        self.out = np.zeros((slots, 64), np.int64)

    def take(self, slots: np.ndarray, chunk, first: np.ndarray, groups: list[int] | None = None) -> None:
        need = max(int(it[2]) for it in chunk)
        if need > self.out.shape[1]:
            self.out = np.concatenate([self.out, np.zeros((len(self.out), need - self.out.shape[1]), np.int64)], 1)
        for s, it in zip(slots.tolist(), chunk):
            self.keys[self._next] = it[0]
            self.key_index[s] = self._next
            self._next += 1
        self.own[slots] = [len(it[1]) for it in chunk]
        self.budget[slots] = [int(it[2]) for it in chunk]
        self.count[slots] = 1
        self.last[slots] = first
        self.out[slots, 0] = first
        if groups is not None:
            self.group[slots] = groups

    def record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Book one decoded token for each of these slots."""
        self.out[slots, self.count[slots]] = tokens
        self.count[slots] += 1
        self.own[slots] += 1
        self.last[slots] = tokens

    def keys_of(self, slots: np.ndarray) -> list:
        return [self.keys[i] for i in self.key_index[slots].tolist()]

    def free(self, slot: int) -> None:
        del self.keys[int(self.key_index[slot])]
        self.key_index[slot] = -1
