"""The model's own forward with our attention (hook.py): `_attend` stores each layer's K/V in the cache layout
(cache.py) and attends with the layer's own scale, softcap and sliding window, as the module hands them over
(attention.py). Around it: the probe that proves a model runs on this path,
torch.compile (regional or whole-model), prefill passes, and decode steps captured as CUDA graphs, one per
batch bucket.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from extractor.backends.fast import attention as kernels
from extractor.backends.fast.cache import head_dim, kv_heads, text_config
from extractor.backends.fast.families import FastPathError
from extractor.backends.fast.hook import ATTENTION, active, hook_head, index_layers, register


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


def _one_graph_for_all_sizes():
    """While our compiled passes trace: sizes of 1 (one row, one token) are not specialized, so one graph
    serves prefill and decode at every batch size; with 0/1 specialization each compiled function traced 4
    graphs (one row or several, one token or several). The traced code is the same for every size (the
    tests compare its tokens with eager ones at 1 and more rows and tokens)."""
    from torch.fx.experimental import _config
    return _config.patch(backed_size_oblivious=True)


def decoder_layers(model, n_layers: int) -> list | None:
    """The model's stack of decoder layers (the one ModuleList of `n_layers` blocks), else None."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return list(module)
    return None


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


class ModelRunner:
    """The passes FastDecoder runs through the model (a part of FastDecoder: `slots` and `unique_len` come
    from there, the K/V buffers and where a pass stores them from KVCache)."""

    def _init_runner(self, model, attention: str, compile: bool, compile_scope: str, adapters) -> None:
        """The model's shape, the attention kernel, the cache, compiled code and static decode inputs; then
        the probe (raises FastPathError where the model's forward does not run on this path)."""
        register()
        index_layers(model)
        self.model = model
        # adapters (lora_mixed.MixedLoRA): rows of several LoRA adapters (and base) decode together, each
        # record's group in its stream item; one prefix K/V per group. None: one set of weights.
        self.adapters = adapters
        self.groups = adapters.groups if adapters is not None else 1
        cfg = text_config(model)
        self.n_layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.kv_heads, self.head_dim = kv_heads(cfg), head_dim(cfg)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._choose_attention(attention)
        self._init_cache()
        self._flash_gqa = self.device.type == "cuda" and kernels.flash_takes_gqa(self.device, self.dtype, self.head_dim)
        self._mode: dict = {}
        # Every config object the model's modules read `_attn_implementation` from (sub-configs included):
        # found once, switched to our attention for each forward pass.
        self._configs = list({id(m.config): m.config for m in model.modules()
                              if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
        hook_head(model)
        self._forward = self.model
        self._layer_calls: list = []  # regional compilation: (layer, its compiled forward), set in _native
        self.compile_scope = compile_scope
        self.compiled = bool(compile)  # off by default: CUDA graphs already remove the decode step's launches
        if self.compiled:
            self._compile()
        # Static inputs/outputs of the decode step (the captured graphs read and write these).
        self._ids = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self._slot = torch.full((self.slots,), self.slots, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self._logits = torch.zeros(self.slots, self.vocab, dtype=self.dtype, device=self.device)
        # each row's adapter group (prefill and decode passes; the LoRA layers and the prefix read it)
        self._group = adapters.attach(self.slots + 1) if adapters is not None else None
        if not (self.compiled and self._compiles()):  # _compiles probes the compiled forward itself
            self._forward, self.compiled, self._layer_calls = self.model, False, []
            self._probe()
        self.buckets = buckets_up_to(self.slots)  # decode batch sizes, a CUDA graph each once captured
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._use_graphs, self._pool = False, None

    def _choose_attention(self, attention: str) -> None:
        if attention == "auto":
            attention = "triton" if self.device.type == "cuda" and kernels.works_on(
                self.device, self.dtype, self.head_dim, self.heads, self.kv_heads) else "torch"
        self._attn_fn = kernels.decode_attention_triton if attention == "triton" else kernels.decode_attention_torch
        self.attention = attention

    # -- the model's own forward, with our attention -----------------------------------------------------
    @contextmanager
    def _native(self, **mode):
        """The model's forward runs with `_attention` in this block; `mode` tells it what the pass is:
        prefix, prefill (rows, width, last) or decode (slot, own)."""
        before = [c._attn_implementation for c in self._configs]
        previous = getattr(active, "decoder", None)
        active.decoder, self._mode = self, mode
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
            active.decoder, self._mode = previous, {}

    def _logits_of(self, ids, positions, embeds=None, **mode) -> torch.Tensor:
        """The model's logits at each row's last position (`mode["last"]` in prefill, else the last column);
        `embeds` instead of `ids`: input embeddings (a prompt-learning adapter's virtual tokens)."""
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        with self._native(**mode), _one_graph_for_all_sizes() if self.compiled else nullcontext():
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
        if kind == "prefix":
            k, v = self._store_prefix(layer, mode.get("group"), mode.get("start", 0), k, v)
        elif kind == "prefill":
            k, v = self._store_rows(layer, mode["rows"], mode["width"], k, v, mode.get("groups"))
        elif kind == "decode":
            slot, own = mode["slot"], mode["own"]
            self._store_token(layer, slot, own, k, v)
            grouped = {"prefix_group": mode["groups"]} if "groups" in mode else {}
            out = self._attn_fn(q[:, :, 0].contiguous(), self.k[layer], self.v[layer], self.pk[layer],
                                self.pv[layer], slot, own + 1, scale, softcap=softcap, window=window,
                                **mode.get("trim", {}), **grouped)
            return out.unsqueeze(2)
        else:
            raise FastPathError(f"attention called in an unknown mode {kind!r}")
        return kernels.prefill_attention(q, k, v, scale, softcap, window, self._flash_gqa)

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

    def _set_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """The next pass's rows' adapter groups, where its LoRA layers read them; returns that view."""
        n = len(groups)
        self._group[:n] = groups.to(self.device, non_blocking=True)
        return self._group[:n]

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

    def _decode(self, b: int) -> None:
        """A decode step for the first `b` rows of the static inputs: its CUDA graph, or eager."""
        graph = self._graph(b) if self._use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._step(b)

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
