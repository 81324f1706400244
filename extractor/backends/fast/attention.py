"""Decode attention for FastDecoder: one query token per row against a shared prompt prefix plus the row's
own cache slot, reading only the row's own length.

Two implementations with one contract:
- `triton`: one program per (row, KV head) that loops over the prefix and then over the row's own keys
  with an online softmax. The query heads that share a KV head are stacked as rows of one tile, so each
  K/V block is read once per group; the prefix is the same memory for every row, so after the first rows
  it is served from L2 instead of HBM. Used on CUDA when Triton is importable.
- `torch`: gathers the rows' cache slots and runs SDPA under a length mask (CPU, tests, fallback).

Shapes: q [B, H, D]; cache k/v [S, KVH, L, D] (one layer); prefix k/v [KVH, P, D]; slot [B] (cache row of
each batch row); n [B] (own keys to attend, the current token's included). Returns [B, H, D]. With
`prefix_group` [B] (several LoRA adapters mixed: each adapter's own prefix K/V), prefix k/v are [G, KVH, P, D]
and each row attends to its group's.

The layer's own attention settings, as the model's attention module passes them: `scale`; `softcap` (scores
become softcap * tanh(scores / softcap) before the softmax, Gemma-2); `window` (a sliding window: a key is seen
while query position - key position < window, transformers' sliding_window_overlay). The query's position is
P + n - 1: the prefix's P positions come first, then the row's own.

`prefill_attention` is the many-query counterpart for prefill chunks and the prefix itself.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:  # Triton comes with CUDA builds of torch; absent (or unusable) elsewhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def available() -> bool:
    return triton is not None


def works_on(device, dtype, head_dim: int = 64, heads: int = 4, kv_heads: int = 2) -> bool:
    """Triton is importable and the kernel runs here, for this head shape, and agrees with the reference on a
    small case."""
    if triton is None:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, kc, vc = (torch.randn(shape, generator=gen).to(device, dtype) for shape in
                 ((3, heads, head_dim), (4, kv_heads, 40, head_dim), (4, kv_heads, 40, head_dim)))
    pk, pv = (torch.randn((kv_heads, 9, head_dim), generator=gen).to(device, dtype) for _ in range(2))
    slot, n = torch.tensor([2, 0, 3], device=device), torch.tensor([1, 40, 17], device=device)
    grouped = torch.tensor([1, 0, 1], device=device)
    # Plain, softcapped, a window that leaves the whole prefix (and some own keys) behind, prefix groups.
    for softcap, window, group in ((None, None, None), (5.0, None, None), (None, 4, None), (None, None, grouped)):
        if group is not None:
            pk, pv = torch.stack((pk, pv)), torch.stack((pv, pk))
        try:
            got = decode_attention_triton(q, kc, vc, pk, pv, slot, n, 0.125, softcap=softcap, window=window,
                                          prefix_group=group)
        except Exception as exc:  # noqa: BLE001 - an unsupported GPU or Triton build: use the torch path
            import warnings
            warnings.warn(f"the Triton decode kernel does not run here ({type(exc).__name__}: {str(exc)[:200]}); "
                          "decode attention runs in torch (slower)", stacklevel=2)
            return False
        ref = decode_attention_torch(q, kc, vc, pk, pv, slot, n, 0.125, softcap=softcap, window=window,
                                     prefix_group=group)
        if not bool((got.float() - ref.float()).abs().max() < 0.05):
            import warnings
            warnings.warn(f"the Triton decode kernel disagrees with the reference here (softcap {softcap}, "
                          f"window {window}); decode attention runs in torch (slower)", stacklevel=2)
            return False
    return True


def _softcap(scores, softcap):
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def decode_attention_torch(q, k_cache, v_cache, pk, pv, slot, n, scale: float, max_len: int | None = None,
                           softcap: float | None = None, window: int | None = None, prefix_group=None):
    """`max_len` (at least n.max()): only that much of each slot is read, where the caller knows it (CPU)."""
    b, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if max_len is not None:
        k_cache, v_cache = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
    k = k_cache[slot]  # [B, KVH, L, D]
    v = v_cache[slot]
    # The query heads sharing a KV head become rows of one query (HF layout: KV head j serves query
    # heads j*g .. j*g+g-1), so K/V are not expanded per query head; the shared prefix is one [KVH, P, D]
    # operand for every row, never copied beside each row's own keys.
    qg = q.view(b, kv_heads, group, d)
    scores = _softcap(torch.matmul(qg, k.transpose(-1, -2)) * scale, softcap)  # [B, KVH, G, L]
    cols = torch.arange(k.shape[2], device=q.device)
    hidden = cols.view(1, 1, 1, -1) >= n.view(-1, 1, 1, 1)
    prefix = pk.shape[-2]
    shared = "hpd" if prefix_group is None else "bhpd"  # one prefix for all rows, or each row's group's
    if prefix_group is not None:
        pk, pv = pk[prefix_group], pv[prefix_group]
    if window:  # own key i sits at position prefix + i, the query at prefix + n - 1
        hidden = hidden | ((n.view(-1, 1, 1, 1) - 1 - cols.view(1, 1, 1, -1)) >= window)
    scores = scores.masked_fill(hidden, float("-inf"))
    if prefix:
        pscores = _softcap(torch.einsum(f"bhgd,{shared}->bhgp", qg, pk) * scale, softcap)
        if window:
            pcols = torch.arange(prefix, device=q.device)
            far = (prefix + n.view(-1, 1, 1, 1) - 1 - pcols.view(1, 1, 1, -1)) >= window
            pscores = pscores.masked_fill(far, float("-inf"))
        scores = torch.cat((pscores, scores), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., prefix:], v)
    if prefix:
        out = out + torch.einsum(f"bhgp,{shared}->bhgd", probs[..., :prefix], pv)
    return out.reshape(b, heads, d)


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, PK, PV, SLOT, N, PGROUP, OUT, P, sm_scale, WINDOW,
                       s_qb, s_qh, s_ks, s_kh, s_kl, s_pg, s_ph, s_pl, s_ob, s_oh,
                       G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, GROUPED: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        slot = tl.load(SLOT + row)
        if GROUPED:  # each row's own prefix K/V (its LoRA adapter's); else one prefix for every row
            p_base = tl.load(PGROUP + row).to(tl.int64) * s_pg + kvh * s_ph
        else:
            p_base = kvh * s_ph
        n = tl.load(N + row)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)  # a head dim that is not a power of two (Phi-3's 96) is padded and masked
        in_d = d < D
        heads = kvh * G + g
        q = tl.load(Q + row * s_qb + heads[:, None] * s_qh + d[None, :], mask=(g < G)[:, None] & in_d[None, :],
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        # Two key ranges with one loop body: the shared prefix, then this row's own slot. With a sliding
        # window, each range starts at its first key within the window (the query sits at position P + n - 1).
        for part in tl.static_range(2):
            if part == 0:
                k_base = PK + p_base
                v_base = PV + p_base
                s_l = s_pl
                length = P
                lo = tl.maximum(P + n - WINDOW, 0)
            else:
                k_base = K + slot * s_ks + kvh * s_kh
                v_base = V + slot * s_ks + kvh * s_kh
                s_l = s_kl
                length = n
                lo = tl.maximum(n - WINDOW, 0)
            for start in range((lo // BLOCK_N) * BLOCK_N, length, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                valid = (cols < length) & (cols >= lo)
                k = tl.load(k_base + cols[:, None] * s_l + d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * sm_scale
                if SOFTCAP > 0:  # softcap * tanh(s / softcap), tanh from exp (portable across Triton builds)
                    x = s / SOFTCAP
                    t = tl.exp(-2.0 * tl.abs(x))
                    s = SOFTCAP * tl.where(x >= 0, 1.0, -1.0) * (1.0 - t) / (1.0 + t)
                s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                # A block with no key in the window while none came before: m_new is -inf, and -inf - -inf
                # would be NaN. Subtracting 0 instead leaves every term 0, as it should be.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_sum = l_sum * alpha + tl.sum(p, 1)
                v = tl.load(v_base + cols[:, None] * s_l + d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
        out = acc / tl.maximum(l_sum, 1e-30)[:, None]
        tl.store(OUT + row * s_ob + heads[:, None] * s_oh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(g < G)[:, None] & in_d[None, :])


    # On the GPU the block size and pipelining are tuned once per model shape, at the first decode step
    # (before any graph capture); the kernel only writes its output, so trial runs are harmless. The choice is
    # kept in Triton's cache (keyed by the kernel's source, the shape key and the GPU): the tuning cost 5.5 s
    # of every `extractor run` on an H200 (2026-12-05), paid now once per machine.
    _cache_results = ({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
                      else {})
    _decode_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                 for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)],
        key=["G", "D", "BLOCK_D", "IEEE", "SOFTCAP", "GROUPED"], **_cache_results)(_decode_kernel)


def decode_attention_triton(q, k_cache, v_cache, pk, pv, slot, n, scale: float, softcap: float | None = None,
                            window: int | None = None, prefix_group=None):
    b, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    assert k_cache.stride() == v_cache.stride() and pk.stride() == pv.stride() and k_cache.stride(-1) == 1
    # No window: one wider than any cache (the kernel has no branch on it, so both cases compile alike).
    grouped = prefix_group is not None
    assert pk.dim() == (4 if grouped else 3) and pk.stride(-1) == 1
    args = (q, k_cache, v_cache, pk, pv, slot, n, prefix_group if grouped else slot, out, pk.shape[-2], scale,
            int(window or 1 << 30), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), pk.stride(0) if grouped else 0, pk.stride(-3), pk.stride(-2), out.stride(0),
            out.stride(1))
    shape = dict(G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d,
                 BLOCK_D=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32,
                 SOFTCAP=float(softcap or 0.0), GROUPED=grouped)
    if q.is_cuda and q.dtype != torch.float32:
        _decode_kernel_tuned[(b, kv_heads)](*args, **shape)
    else:  # Triton's CPU interpreter (tests), and fp32 (correctness checks, not speed): one fixed configuration.
        # Tuning compiles all 12 configurations for every new shape key: on an H200 the fp32 checks of
        # tests/gpu, one key per tiny family config, did not finish in 200 s.
        _decode_kernel[(b, kv_heads)](*args, **shape, BLOCK_N=64, num_warps=4, num_stages=2)
    return out


def _expand(kv, group: int):
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def flash_takes_gqa(device, dtype, head_dim: int) -> bool:
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


def prefill_attention(q, k, v, scale: float, softcap: float | None = None, window: int | None = None,
                      flash_gqa: bool = False):
    """Many queries at once (a prefill chunk, or the shared prefix itself): q [B, H, T, D]; k/v [B, KVH, K, D]
    with the shared prefix's K - T keys first, then the rows' own T. Key j sits at position j and query t at
    K - T + t: each query sees the prefix and its own earlier tokens, within the window. Returns [B, H, T, D]."""
    t, total = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if not softcap and (not window or window >= total):
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(t, total)
        if flash_gqa:  # flash reads the shared K/V heads itself: no copy per query head
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, _expand(k, group), _expand(v, group), attn_mask=bias, scale=scale)
    qpos = torch.arange(total - t, total, device=q.device).view(-1, 1)
    kpos = torch.arange(total, device=q.device).view(1, -1)
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (qpos - kpos < window)
    k, v = _expand(k, group), _expand(v, group)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = _softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap).masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
