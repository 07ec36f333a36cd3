"""Per-group clipping-range search: pick each group's scale and offset to minimise its
(activation-weighted) squared error instead of taking the raw min/max (RTN).

Every step works on all groups at once; the only Python loops run over the handful of
candidate ranges and over row chunks (which bound memory on wide layers).

    error of a group = Σ_k d_k · (w_k − ŵ_k)²  over its real, non-outlier entries,

with d_k = 1 (data-free) or d_k = E[x_k²] (the diagonal of XᵀX/M), which makes the sum the
group's share of the output error when input channels are uncorrelated.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import pack
from .rtn import group_view, rtn_quantize

# Candidate ranges: first shrink both ends by the same fraction of the range, then shift the
# shrunk window. 2-bit codes want ~40% clipping on Gaussian-like groups, so the grid reaches 0.25
# per side.
SHRINK_STEPS = torch.linspace(0.0, 0.25, 11).tolist()
SHIFT_STEPS = [-0.08, -0.04, -0.02, 0.02, 0.04, 0.08]
REFIT_ROUNDS = 2
CHUNK_ELEMENTS = 1 << 22


def codes_for(wg: torch.Tensor, s16: torch.Tensor, z16: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code per entry for fp16 scales/offsets (rows, G) -> (rows, G, g) fp32 codes."""
    qmax = (1 << bits) - 1
    s, z = s16.float().unsqueeze(-1), z16.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round((wg - z) / safe), 0, qmax)
    return torch.where(s > 0, q, torch.zeros_like(q))


def group_error(wg, q, s16, z16, weight) -> torch.Tensor:
    """Σ weight·(w − q·s − z)² per group, ŵ from the fp16 parameters exactly as kernels see it."""
    what = q * s16.float().unsqueeze(-1) + z16.float().unsqueeze(-1)
    return ((wg - what).square() * weight).sum(dim=-1)


def range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) for the range [lo, hi]."""
    qmax = (1 << bits) - 1
    return ((hi - lo).clamp_min(0) / qmax).to(torch.float16), lo.to(torch.float16)


def least_squares_params(wg, q, weight, s16, z16) -> Tuple[torch.Tensor, torch.Tensor]:
    """For fixed codes, the (scale, offset) minimising Σ weight·(w − q·s − z)²: a 2×2 solve per
    group. Groups whose system is singular (all codes equal) or whose solution has s ≤ 0 keep
    their old parameters."""
    sw, swq, swqq = weight.sum(-1), (weight * q).sum(-1), (weight * q * q).sum(-1)
    swx, swqx = (weight * wg).sum(-1), (weight * q * wg).sum(-1)
    det = swqq * sw - swq * swq
    ok = det > 1e-12 * (swqq * sw).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    s = (swqx * sw - swq * swx) / safe
    z = (swqq * swx - swq * swqx) / safe
    ok &= (s > 0) & torch.isfinite(s) & torch.isfinite(z) & (s.abs() < 65504) & (z.abs() < 65504)
    return torch.where(ok, s.to(torch.float16), s16), torch.where(ok, z.to(torch.float16), z16)


class _Evaluator:
    """Error of candidate (scale, offset) pairs for one chunk of groups, computed in one reused
    buffer with in-place ops (no full-size temporaries per candidate). Bit-identical to
    group_error(wg, codes_for(wg, s, z, bits), s, z, weight)."""

    def __init__(self, wg, weight, bits):
        self.wg, self.bits = wg, bits
        # Data-free layers without padding or outliers weigh every entry 1: skip the multiply.
        self.weight = None if bool((weight == 1).all()) else weight
        self.buf = torch.empty_like(wg)

    def error(self, s16, z16):
        qmax = (1 << self.bits) - 1
        s, z = s16.float().unsqueeze(-1), z16.float().unsqueeze(-1)
        pos = s > 0
        safe = torch.where(pos, s, torch.ones_like(s))
        t = torch.sub(self.wg, z, out=self.buf)
        t.div_(safe).round_().clamp_(0, qmax)
        if not bool(pos.all()):
            t.mul_(pos)
        # ŵ = q·s + z, then (ŵ − w)² (= (w − ŵ)² exactly).
        t.mul_(s).add_(z).sub_(self.wg).square_()
        if self.weight is not None:
            t.mul_(self.weight)
        return t.sum(dim=-1)


def _search_chunk(wg, weight, lo0, hi0, bits, refit_rounds):
    # Only the per-group (scale, offset) of the best candidate is tracked; its codes are
    # recomputed when needed (codes are a pure function of the parameters).
    ev = _Evaluator(wg, weight, bits)
    width = hi0 - lo0
    best_s, best_z = range_params(lo0, hi0, bits)
    best_e = ev.error(best_s, best_z)
    best_t = torch.zeros_like(lo0)

    def consider(s, z):
        nonlocal best_s, best_z, best_e
        e = ev.error(s, z)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        return better

    for t in SHRINK_STEPS[1:]:
        s, z = range_params(lo0 + t * width, hi0 - t * width, bits)
        best_t = torch.where(consider(s, z), torch.full_like(best_t, t), best_t)
    for u in SHIFT_STEPS:
        s, z = range_params(lo0 + (best_t + u) * width, hi0 - (best_t - u) * width, bits)
        consider(s, z)
    for _ in range(refit_rounds):
        # Lloyd-style: best parameters for the current codes, then best codes for them.
        s, z = least_squares_params(wg, codes_for(wg, best_s, best_z, bits), weight, best_s, best_z)
        consider(s, z)
    return codes_for(wg, best_s, best_z, bits), best_s, best_z


def _row_chunks(w, mask, group_size, col_weight):
    """(r0, r1, wg, mg, weight) over row chunks of at most CHUNK_ELEMENTS entries (bounding the
    candidate buffers on wide layers): the chunk's groups (rows, G, g), their mask, and each
    entry's error weight (col_weight, 1 when None, times the mask)."""
    rows, kp = w.shape
    cw = torch.ones(kp, device=w.device) if col_weight is None else col_weight.float()
    cw = group_view(cw.unsqueeze(0), group_size)
    step = max(1, CHUNK_ELEMENTS // kp)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wg, mg = group_view(w[r0:r1], group_size), group_view(mask[r0:r1], group_size)
        yield r0, r1, wg, mg, cw * mg.float()


def search_quantize(
    w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
    col_weight: Optional[torch.Tensor] = None, refit_rounds: int = REFIT_ROUNDS,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as rtn_quantize (codes uint8, scales fp16, zeros fp16, ŵ fp32), with each
    group's range searched. col_weight (k_pad,) weighs input columns (activation mean squares).
    Never worse than RTN on any group: the min/max range is the first candidate."""
    rows, kp = w.shape
    q_all = torch.empty(rows, kp, dtype=torch.uint8, device=w.device)
    what = torch.empty(rows, kp, device=w.device)
    n_g = kp // group_size
    scales = torch.empty(rows, n_g, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    for r0, r1, wg, mg, weight in _row_chunks(w, mask, group_size, col_weight):
        lo = torch.where(mg, wg, torch.full_like(wg, float("inf"))).amin(dim=-1)
        hi = torch.where(mg, wg, torch.full_like(wg, float("-inf"))).amax(dim=-1)
        empty = ~mg.any(dim=-1)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
        q, s, z = _search_chunk(wg, weight, lo, hi, bits, refit_rounds)
        q_all[r0:r1] = q.reshape(r1 - r0, kp).to(torch.uint8)
        scales[r0:r1], zeros[r0:r1] = s, z
        what[r0:r1] = (q * s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).reshape(r1 - r0, kp)
    return q_all, scales, zeros, what


def quantize(w, mask, bits, group_size, method: str = "search", col_weight=None):
    """Dispatch on the calibration method: "search" (this module) or "rtn" (plain min/max)."""
    if method == "rtn":
        return rtn_quantize(w, mask, bits, group_size)
    return search_quantize(w, mask, bits, group_size, col_weight)


# Neighbours of the snapped point tried on the compact grid (FORMAT.md §5.1): scale codes ± 1,
# offset codes ± 2. Rounding each parameter alone ignores how a group's error depends on both.
COMPACT_SCALE_MOVES = (-1, 0, 1)
COMPACT_ZERO_MOVES = (-2, -1, 0, 1, 2)


def refine_compact(w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
                   scale_codes: torch.Tensor, zero_codes: torch.Tensor, scale_rows: torch.Tensor,
                   col_weight: Optional[torch.Tensor] = None):
    """Per group, the best (scale code, offset code) among the snapped point's neighbours on the
    row's compact grids, by the same (activation-weighted) group error the range search uses.
    Never worse than the snapped point (it is a candidate). Returns new (scale_codes, zero_codes)."""
    out_s, out_z = scale_codes.clone(), zero_codes.clone()
    for r0, r1, wg, _, weight in _row_chunks(w, mask, group_size, col_weight):
        ev = _Evaluator(wg, weight, bits)
        sc0, zc0 = scale_codes[r0:r1].long(), zero_codes[r0:r1].long()
        rf = scale_rows[r0:r1]
        best_s, best_z, best_e = sc0, zc0, None
        for ds in COMPACT_SCALE_MOVES:
            # a zero scale stays zero (an empty or constant group), a positive one stays >= 1
            sc = torch.where(sc0 > 0, (sc0 + ds).clamp(1, 255), sc0)
            for dz in COMPACT_ZERO_MOVES:
                zc = (zc0 + dz).clamp(0, 255)
                e = ev.error(*pack.expand_scales(sc, zc, rf))
                if best_e is None:
                    best_e, best_s, best_z = e, sc, zc
                    continue
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_s, best_z = torch.where(better, sc, best_s), torch.where(better, zc, best_z)
        out_s[r0:r1], out_z[r0:r1] = best_s.to(torch.uint8), best_z.to(torch.uint8)
    return out_s, out_z
