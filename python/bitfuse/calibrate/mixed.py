"""Mixed-precision output channels (MPQ-DM): rank channels by kurtosis, give the most
heavy-tailed ones more bits and the flattest fewer, under an average-bits budget.

What the budget counts. `avg_bits` bounds the real bits per weight (docs/FORMAT.md §10) that the
split adds over uniform `bits`:

    Δbpw = Σ_rows (b_row − bits) · k_pad / (N·K)  +  32 / K   (the int32 `perm`, when split)
    split allowed  ⇔  bits + Δbpw ≤ avg_bits

Code padding (k_pad > K) and the permutation are counted. What no split changes is left out: the
scales/offsets (32/g bpw for every class alike) and the optional residual, low-rank and sparse
branches, which their own QuantConfig fields size. So a split never costs more real bpw than
uniform `avg_bits`-wide codes would (for integer avg_bits), and with the default
avg_bits = bits it never costs more than uniform `bits`.

How the split is chosen. Each candidate (n_hi, n_lo) gives the top n_hi channels by kurtosis
`hi` bits and the bottom n_lo `lo` bits. Channels are independent given their own scales, so the
measured error of any split is a sum of per-channel errors at each width: every size on the
row_align grid (a superset of MPQ-DM's 0/5/10/20% per side) is scored exactly, and the split
with the least measured error wins (uniform `bits` on ties).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .errors import BudgetError

PERM_BITS = 32


def kurtosis(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row kurtosis mean((w−μ)^4)/σ^4 over the masked entries (3 for a Gaussian)."""
    m = mask.float()
    n = m.sum(dim=1).clamp_min(1.0)
    mu = (w * m).sum(dim=1) / n
    d = (w - mu.unsqueeze(1)) * m
    var = d.square().sum(dim=1) / n
    k4 = d.pow(4).sum(dim=1) / n
    return torch.where(var > 0, k4 / var.square().clamp_min(1e-30), torch.zeros_like(var))


def smooth_for_ranking(w: torch.Tensor, mask: torch.Tensor, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """W·diag(s) with SmoothQuant's per-input-channel scales s_j = max|x_j|^α / max_i|w_ij|^(1−α).

    SmoothQuant moves activation outliers into the weights with these scales; here the smoothed
    weight is only *looked at*: its row kurtosis ranks the channels, so an output channel whose
    large weights meet large activations ranks as salient, and one whose spikes sit on input
    channels that barely move does not. The quantized weight is W itself. α = 0 gives columns
    normalised by their max |w| (no activation information), α = 1 weighs columns by max|x_j|.
    w (N, k_pad), mask (N, k_pad) real non-outlier entries, x_max (K,) with K ≤ k_pad.
    """
    k = x_max.numel()
    xm = torch.ones(w.shape[1], device=w.device)
    xm[:k] = x_max.float().to(w.device)
    wmax = (w.abs() * mask).amax(dim=0)
    # Columns with no activation or no weight keep scale 0: they carry nothing to rank by.
    ok = (xm > 0) & (wmax > 0)
    s = torch.where(ok, xm.clamp_min(1e-30).pow(alpha) / wmax.clamp_min(1e-30).pow(1.0 - alpha),
                    torch.zeros_like(xm))
    return w * s.unsqueeze(0)


def side_widths(bits: int, mixed_bits: Tuple[int, ...]) -> Tuple[int, int]:
    """(hi, lo) code widths of the extra classes; 0 where that side does not exist."""
    hi = max(mixed_bits) if max(mixed_bits) > bits else 0
    lo = min(mixed_bits) if min(mixed_bits) < bits else 0
    return hi, lo


def split_delta_bpw(n: int, k: int, k_pad: int, bits: int, hi: int, n_hi, lo: int, n_lo):
    """Real bpw a split adds over uniform `bits` (see the module docstring). Accepts tensors."""
    codes = ((hi - bits) * n_hi - (bits - lo) * n_lo) * k_pad / float(n * k)
    classes = (n_hi > 0) * 1 + (n_lo > 0) * 1 + (n_hi + n_lo < n) * 1
    return codes + (classes > 1) * (PERM_BITS / float(k))


def choose_split(
    kurt: torch.Tensor, row_error: Dict[int, torch.Tensor], k: int, k_pad: int, bits: int,
    mixed_bits: Tuple[int, ...], avg_bits: float, row_align: int,
) -> Tuple[int, int, int, int, dict]:
    """The measured-best split under the budget: (hi, n_hi, lo, n_lo, info).

    row_error[b] is each channel's (N,) error when quantized with b bits. Raises BudgetError with
    the reachable minimum when no split meets avg_bits.
    """
    n = kurt.numel()
    hi, lo = side_widths(bits, mixed_bits)
    order = torch.argsort(kurt, descending=True, stable=True)
    sizes = torch.arange(0, n + 1, row_align, device=kurt.device)
    n_hi = sizes if hi else sizes[:1]
    n_lo = sizes if lo else sizes[:1]
    H, L = torch.meshgrid(n_hi, n_lo, indexing="ij")
    fits = (H + L) <= n
    delta = split_delta_bpw(n, k, k_pad, bits, hi, H, lo, L).double()
    allowed = fits & (bits + delta <= avg_bits + 1e-9)
    if not bool(allowed.any()):
        reachable = bits + float(delta[fits].min())
        raise BudgetError(
            f"avg_bits={avg_bits} cannot be met for a {n}x{k} layer with bits={bits}, "
            f"mixed_bits={tuple(mixed_bits)}: classes move in steps of {row_align} rows and a split "
            f"pays {PERM_BITS}/K={PERM_BITS / k:.3f} bpw for its permutation, so the reachable "
            f"minimum is avg_bits={reachable:.4f} (code bits + permutation per weight)"
        )

    def prefix(err):  # cumulative error of the first j channels in kurtosis order
        return torch.cat([err.new_zeros(1), torch.cumsum(err.double()[order], 0)])

    base = prefix(row_error[bits])
    total = base[-1]
    err = total.expand_as(H).clone()
    if hi:
        e_hi = prefix(row_error[hi])
        err += e_hi[H] - base[H]
    if lo:
        e_lo = prefix(row_error[lo])
        err += (e_lo[-1] - e_lo[n - L]) - (base[-1] - base[n - L])
    err = torch.where(allowed, err, torch.full_like(err, float("inf")))
    # Least error wins; on (near-)ties the split with fewer moved rows, so uniform stays uniform.
    best = float(err.min())
    near = err <= best + 1e-9 * max(abs(best), 1e-30)
    moved = torch.where(near, H + L, torch.full_like(H, n + 1))
    i, j = divmod(int(torch.argmin(moved.flatten())), moved.shape[1])
    info = {"uniform_error": float(total), "split_error": float(err[i, j]),
            "delta_bpw": float(delta[i, j])}
    return hi, int(H[i, j]), lo, int(L[i, j]), info


def classes_for_split(
    kurt: torch.Tensor, bits: int, hi: int, n_hi: int, lo: int, n_lo: int,
) -> Tuple[List[int], List[int], Optional[torch.Tensor]]:
    """Bit classes and the permutation: (class_bits, class_rows, perm or None).

    Packed order is the extra classes in descending bits, then the main class last (it absorbs the
    remainder that is not a multiple of row_align). Inside a class, channels keep their original
    order, so stores through the permutation stay as sequential as possible.
    """
    n = kurt.numel()
    order = torch.argsort(kurt, descending=True, stable=True)
    hi_rows = torch.sort(order[:n_hi]).values
    lo_rows = torch.sort(order[n - n_lo:]).values if n_lo else order[:0]
    main = torch.ones(n, dtype=torch.bool, device=kurt.device)
    main[hi_rows] = False
    main[lo_rows] = False
    main_rows = torch.nonzero(main).flatten()
    class_bits, class_rows, parts = [], [], []
    for b, rows in ((hi, hi_rows), (lo, lo_rows), (bits, main_rows)):
        if rows.numel():
            class_bits.append(b)
            class_rows.append(int(rows.numel()))
            parts.append(rows)
    if len(class_bits) == 1:
        return class_bits, class_rows, None
    return class_bits, class_rows, torch.cat(parts).to(torch.int32)
