"""Round-to-nearest with a per-group min/max range (the baseline every better method must beat)."""

from __future__ import annotations

from typing import Tuple

import torch

FP16_MAX = 65504.0


def group_view(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, k_pad) -> (rows, G, group_size)."""
    r, k = t.shape
    return t.reshape(r, k // group_size, group_size)


def rtn_quantize(
    w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize (rows, k_pad) fp32 weights group by group.

    `mask` marks the entries that define the range (real columns that are not sparse outliers);
    padding and outliers are still given codes, but do not stretch the range.
    Returns (codes uint8, scales fp16 (rows, G), zeros fp16 (rows, G), ŵ fp32 (rows, k_pad)).
    ŵ is computed from the fp16 scale and offset, exactly as every kernel will.
    """
    qmax = (1 << bits) - 1
    wg, mg = group_view(w, group_size), group_view(mask, group_size)
    lo = torch.where(mg, wg, torch.full_like(wg, float("inf"))).amin(dim=-1)
    hi = torch.where(mg, wg, torch.full_like(wg, float("-inf"))).amax(dim=-1)
    empty = ~mg.any(dim=-1)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    scales = ((hi - lo) / qmax).to(torch.float16)
    zeros = lo.to(torch.float16)
    s32, z32 = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    q = torch.clamp(torch.round((wg - z32) / safe), 0, qmax)
    q = torch.where(s32 > 0, q, torch.zeros_like(q))
    what = (q * s32 + z32).reshape(w.shape)
    return q.reshape(w.shape).to(torch.uint8), scales, zeros, what
