"""A static-cache, continuously batched greedy decoder for Llama/Qwen2-style models (issue 6, first step).

Work in progress: not yet wired into the `hf` backend. It holds a preallocated KV cache of `slots` rows;
the shared prompt prefix is prefilled once and its KV copied into each slot; a finished slot is refilled
with the next record (continuous batching); new records are prefilled together; decode runs one token for
every live slot per step with per-slot positions. Greedy outputs equal `generate` (tested on CPU in fp32).
CUDA-graph capture of the decode step is the next step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """Llama/Qwen2-style decoder layers (q/k/v/o projections, shared rotary embedding), no peft wrapper."""
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if layers is None or not hasattr(core, "rotary_emb") or hasattr(model, "peft_config"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    if attn is None or getattr(model.config, "use_sliding_window", False):
        return False
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


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


def slots_for_memory(model, max_len: int, device, fraction: float = 0.6, cap: int = 1024) -> int:
    """Slots whose K/V cache fits in `fraction` of the free GPU memory (the batch size from free memory)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * max_len * head_dim * \
        next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, min(cap, int(free * fraction // per_slot)))


@dataclass
class Slot:
    index: int = -1  # which request occupies the slot (-1: free)
    length: int = 0  # tokens in the cache for this slot
    tokens: list[int] = field(default_factory=list)


class FastDecoder:
    def __init__(self, model, slots: int, max_len: int, eos_ids: list[int]):
        self.model = model
        self.core = model.model
        cfg = model.config
        self.layers = self.core.layers
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.slots, self.max_len = slots, max_len
        self.eos = set(eos_ids)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (self.n_layers, slots, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.prefix_len = 0
        self.prefix: list[int] = []
        # Host staging and device buffers of the decode step (static: the captured graph reads them).
        self._ids = torch.zeros(slots, 1, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._pos = torch.zeros(slots, 1, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._ids_buf = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._pos_buf = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._graphs: dict[int, tuple] = {}
        self.spans = [max_len]
        self.stats = {"prefill_s": 0.0, "prefills": 0, "decode_s": 0.0, "steps": 0}  # where the time goes

    # -- model pieces --------------------------------------------------------------------------------
    def _rope(self, x, positions):
        cos, sin = self.core.rotary_emb(x, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _forward(self, ids, positions, rows, mask, span=None):
        """ids/positions [B, T]; rows: cache rows of the batch; mask [B, 1, T, max_len] (True = attend).
        Writes K/V at `positions` of `rows` and returns the last hidden state per row."""
        x = self.core.embed_tokens(ids)
        cos, sin = self._rope(x, positions)
        b, t = ids.shape
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kc, vc = self.k[i], self.v[i]
            if rows is None:  # every slot, in order: write in place and attend over the whole cache
                idx = positions.view(b, 1, t, 1).expand(b, self.kv_heads, t, self.head_dim)
                kc.scatter_(2, idx, k)
                vc.scatter_(2, idx, v)
                kc_rows, vc_rows = kc[:, :, :span], vc[:, :, :span]  # only the first `span` positions
            else:
                idx = positions.unsqueeze(1).unsqueeze(-1).expand(b, self.kv_heads, t, self.head_dim)
                kc_rows = kc[rows].scatter(2, idx, k)
                vc_rows = vc[rows].scatter(2, idx, v)
                kc[rows], vc[rows] = kc_rows, vc_rows
            out = self._attend(q, kc_rows, vc_rows, mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.core.norm(x)

    def _attend(self, q, k, v, mask):
        """Grouped-query attention without expanding K/V to every query head: the query heads that share a
        K/V head are stacked as extra query rows (HF's layout: KV head j serves query heads j*g .. j*g+g-1),
        so the kernel reads each K/V head once."""
        b, _, t, d = q.shape
        group = self.heads // self.kv_heads
        if group == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q = q.reshape(b, self.kv_heads, group * t, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, group, 1))
        return out.reshape(b, self.heads, t, d)

    def _mask(self, positions, span=None):
        """Causal mask over the cache: a query at position p sees cache positions <= p."""
        cols = torch.arange(span or self.max_len, device=self.device)
        return (cols.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1))

    def _logits_last(self, hidden):
        return self.model.lm_head(hidden)

    # -- prefix and prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def set_prefix(self, prefix: list[int]) -> None:
        """Prefill the shared prefix once (in slot 0) and copy its K/V into every slot."""
        self.prefix_len = len(prefix)
        self.prefix = list(prefix)
        if not prefix:
            return
        ids = torch.tensor([prefix], device=self.device)
        pos = torch.arange(len(prefix), device=self.device).unsqueeze(0)
        rows = torch.tensor([0], device=self.device)
        self._forward(ids, pos, rows, self._mask(pos, None))
        self.k[:, 1:, :, : len(prefix)] = self.k[:, :1, :, : len(prefix)]
        self.v[:, 1:, :, : len(prefix)] = self.v[:, :1, :, : len(prefix)]

    def _prefill(self, slot_ids: list[int], suffixes: list[list[int]]) -> list[int]:
        """Prefill several new records' suffixes at once (right-padded); returns each one's first token."""
        width = max(len(s) for s in suffixes)
        start = self.prefix_len
        ids = torch.tensor([s + [0] * (width - len(s)) for s in suffixes], device=self.device)
        pos = start + torch.arange(width, device=self.device).unsqueeze(0).expand(len(suffixes), width)
        rows = torch.tensor(slot_ids, device=self.device)
        hidden = self._forward(ids, pos, rows, self._mask(pos, None))
        last = torch.tensor([len(s) - 1 for s in suffixes], device=self.device)
        h = hidden[torch.arange(len(suffixes), device=self.device), last]
        return self._logits_last(h).argmax(-1).tolist()

    def _decode(self, slot_ids: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        """One token for every slot (free slots compute a dummy token in the scratch position, discarded):
        static shapes, so the step can be captured as a CUDA graph."""
        # Attend over the smallest span that holds every live position; its last position is the scratch
        # that free slots write their dummy K/V into (beyond the prefix, never attended by a live slot).
        span = next(s for s in self.spans if s > max(positions) + 1)
        self._ids.zero_()
        self._pos.fill_(span - 1)
        sel = torch.tensor(slot_ids)
        self._ids[sel, 0] = torch.tensor(tokens)
        self._pos[sel, 0] = torch.tensor(positions)
        if self._graphs:
            out = self._step_graph(span)
        else:
            if self.device.type == "cuda":
                self._ids_buf.copy_(self._ids)
                self._pos_buf.copy_(self._pos)
            out = self._step(span).cpu()
        return out[sel].tolist()

    def _step(self, span):
        pos = self._pos_dev()
        hidden = self._forward(self._ids_dev(), pos, None, self._mask(pos, span), span)
        return self._logits_last(hidden[:, -1]).argmax(-1)

    def _ids_dev(self):
        return self._ids_buf if self.device.type == "cuda" else self._ids

    def _pos_dev(self):
        return self._pos_buf if self.device.type == "cuda" else self._pos

    def _step_graph(self, span):
        self._ids_buf.copy_(self._ids, non_blocking=True)
        self._pos_buf.copy_(self._pos, non_blocking=True)
        graph, out = self._graphs[span]
        graph.replay()
        return out.cpu()

    def set_spans(self, spans) -> None:
        """Attention spans (cache lengths) to choose from per step; each must exceed the prefix + 1."""
        spans = sorted({s for s in spans if self.prefix_len + 1 < s < self.max_len} | {self.max_len})
        self.spans = spans

    def capture(self) -> None:
        """Capture the decode step as one CUDA graph per span (CUDA only): one launch per token."""
        if self.device.type != "cuda":
            return
        pool = None
        for span in self.spans:
            # Warm-up and capture run the step for real: every slot points at the span's scratch
            # position, so nothing overwrites the shared prefix or live positions.
            self._ids_buf.zero_()
            self._pos_buf.fill_(span - 1)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up kernels and allocator outside the graph
                    self._step(span)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                out = self._step(span)
            pool = graph.pool()
            self._graphs[span] = (graph, out)

    # -- the scheduler -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, suffixes: list[list[int]], max_new: int, refill: int = 8):
        """Greedy outputs for each suffix (after the shared prefix), in order: (tokens, finish_reason)."""
        results: list = [None] * len(suffixes)
        # Records enter in length order, so each batched prefill pads little; results keep input order.
        queue = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        slots = [Slot() for _ in range(self.slots)]
        while queue or any(s.index >= 0 for s in slots):
            free = [i for i, s in enumerate(slots) if s.index < 0]
            if queue and free:
                take = free[: min(len(free), max(refill, 1))]
                batch = [queue.pop(0) for _ in take[: len(queue)]]
                take = take[: len(batch)]
                t0 = time.perf_counter()
                firsts = self._prefill(take, [suffixes[j] for j in batch])
                self.stats["prefill_s"] += time.perf_counter() - t0
                self.stats["prefills"] += 1
                for slot_id, j, tok in zip(take, batch, firsts):
                    slots[slot_id] = Slot(j, self.prefix_len + len(suffixes[j]), [tok])
                    self._finish_if_done(slots, slot_id, results, max_new)
            live = [i for i, s in enumerate(slots) if s.index >= 0]
            if not live:
                continue
            t0 = time.perf_counter()
            nxt = self._decode(live, [slots[i].tokens[-1] for i in live], [slots[i].length for i in live])
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["steps"] += 1
            for slot_id, tok in zip(live, nxt):
                slot = slots[slot_id]
                slot.length += 1
                slot.tokens.append(tok)
                self._finish_if_done(slots, slot_id, results, max_new)
        return results

    def _finish_if_done(self, slots, slot_id, results, max_new) -> None:
        slot = slots[slot_id]
        last = slot.tokens[-1]
        if last in self.eos:
            results[slot.index] = (slot.tokens, "stop")
        elif len(slot.tokens) >= max_new or slot.length + 2 >= self.max_len:  # the last position is scratch
            results[slot.index] = (slot.tokens, "length")
        else:
            return
        slots[slot_id] = Slot()
