"""The arithmetic of the quantized formats schemes.py reads: packed integers out of int32 words, and each
format's weight in fp32 as an nn.Linear holds it ([out N, in K]). Every function computes one rounding at most
(the product of an exact integer or e4m3 value and its scale, in fp32), so a reference computed the same way
elsewhere is equal bit for bit."""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words each holding 32 / bits unsigned fields, lowest bits first, spread along `dim` (that
    dimension grows by 32 / bits); int32 result."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    fields = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per] (>> is arithmetic:
    # the mask drops the sign's copies)
    fields = fields.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(words.shape)
    shape[dim] *= per
    return fields.reshape(shape)


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 weight [N, K] times its scale: one per tensor (any shape of one element), per output channel ([N]
    or [N, 1]), or per block ([ceil(N / bn), ceil(K / bk)], blocks as large as the shapes imply)."""
    w = weight.float()
    s = scale.float()
    n, k = w.shape
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == n and (s.ndim == 1 or s.shape[-1] == 1):
        return w * s.reshape(n, 1)
    if s.ndim != 2:
        raise ValueError(f"a weight scale of shape {tuple(scale.shape)} for a weight of shape {(n, k)}")
    bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
    if -(-n // bn) != s.shape[0] or -(-k // bk) != s.shape[1]:
        raise ValueError(f"block scales of shape {tuple(scale.shape)} do not tile a weight of shape {(n, k)}")
    full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w * full


def block_shape(weight: torch.Tensor, scale: torch.Tensor, block: tuple | None) -> None:
    """A FineGrainedFP8 scale must tile the weight by the config's weight_block_size."""
    if block is None or scale.numel() == 1:
        return
    n, k = weight.shape
    want = (-(-n // block[0]), -(-k // block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight_scale_inv of shape {tuple(scale.shape)}; weight_block_size {list(block)} over a "
                         f"weight of shape {(n, k)} needs {want}")


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AWQ GEMM: W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], returned as [N, K]."""
    order = torch.tensor(AWQ_ORDER, device=qweight.device)
    reverse = torch.argsort(order)  # column c of a word's eight is nibble reverse[c]

    def columns(words):
        fields = unpack_words(words, 4, -1)  # [rows, N] in nibble order within each eight
        rows, width = fields.shape
        return fields.reshape(rows, width // 8, 8)[:, :, reverse].reshape(rows, width)
    q, z = columns(qweight), columns(qzeros)
    k = q.shape[0]
    group = group or k
    if k % group or z.shape[0] != k // group or tuple(scales.shape) != (k // group, q.shape[1]):
        raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                         f"{tuple(scales.shape)} do not fit group_size {group}")
    index = torch.arange(k, device=q.device) // group
    return ((q - z[index]).float() * scales.float()[index]).t().contiguous()


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group: int, zero_offset: bool) -> torch.Tensor:
    """GPTQ: W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n] with g = g_idx (act-order) or k // group, and z the
    stored zero plus one in the classic format; returned as [N, K]."""
    q = unpack_words(qweight, bits, 0)  # [K, N]
    z = unpack_words(qzeros, bits, -1) + (1 if zero_offset else 0)  # [groups, N]
    k = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k, device=q.device) // (group or k)
    g_idx = g_idx.long()
    if g_idx.shape != (k,) or z.shape != scales.shape or z.shape[1] != q.shape[1] or \
            int(g_idx.min()) < 0 or int(g_idx.max()) >= z.shape[0]:
        raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} and g_idx {tuple(g_idx.shape)} do not fit together")
    return ((q - z[g_idx]).float() * scales.float()[g_idx]).t().contiguous()
