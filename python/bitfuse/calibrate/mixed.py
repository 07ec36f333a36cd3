"""Mixed-precision output channels (MPQ-DM): rank channels by kurtosis, give the most
heavy-tailed ones more bits and the flattest fewer, under an average-bits budget."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..config import ConfigError

DEFAULT_SIDE_FRACTION = 0.10


def kurtosis(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row kurtosis mean((w−μ)^4)/σ^4 over the masked entries (3 for a Gaussian)."""
    m = mask.float()
    n = m.sum(dim=1).clamp_min(1.0)
    mu = (w * m).sum(dim=1) / n
    d = (w - mu.unsqueeze(1)) * m
    var = d.square().sum(dim=1) / n
    k4 = d.pow(4).sum(dim=1) / n
    return torch.where(var > 0, k4 / var.square().clamp_min(1e-30), torch.zeros_like(var))


def _align(count: float, align: int) -> int:
    return int(round(count / align)) * align


def plan_class_sizes(
    n: int, bits: int, mixed_bits: Tuple[int, ...], avg_bits: float, row_align: int,
    side_fraction: float = DEFAULT_SIDE_FRACTION,
) -> Tuple[int, int, int, int]:
    """Rows for the high and low classes: (hi_bits, n_hi, lo_bits, n_lo).

    Starts from `side_fraction` of the rows on each side that exists (MPQ-DM's b±1 on the top and
    bottom 10%), in multiples of row_align so no kernel tile straddles classes. Then, while the
    mean code width is over budget, it adds low rows, or failing that drops high rows; while a
    budget above `bits` leaves room, it adds high rows.
    """
    hi = max(mixed_bits) if max(mixed_bits) > bits else 0
    lo = min(mixed_bits) if min(mixed_bits) < bits else 0
    n_hi = min(_align(side_fraction * n, row_align), n) if hi else 0
    n_lo = min(_align(side_fraction * n, row_align), n - n_hi) if lo else 0

    def over(h: int, l: int) -> float:
        # Extra code bits per input column beyond the budget; must end <= 0.
        return h * (hi - bits) - l * (bits - lo) - n * (avg_bits - bits) - 1e-9

    while over(n_hi, n_lo) > 0 and lo and n_hi + n_lo + row_align <= n:
        n_lo += row_align
    while over(n_hi, n_lo) > 0 and n_hi:
        n_hi = max(0, n_hi - row_align)
    while hi and n_hi + n_lo + row_align <= n and over(n_hi + row_align, n_lo) <= 0:
        n_hi += row_align
    if over(n_hi, n_lo) > 0:
        reachable = bits - (bits - lo) * (n_lo / n) if lo else bits
        raise ConfigError(
            f"avg_bits={avg_bits} cannot be met for a layer with {n} channels (classes move in "
            f"steps of {row_align} rows); the reachable minimum here is {reachable:.3f}"
        )
    return hi, n_hi, lo, n_lo


def assign_classes(
    kurt: torch.Tensor, bits: int, mixed_bits: Optional[Tuple[int, ...]], avg_bits: float,
    row_align: int,
) -> Tuple[List[int], List[int], Optional[torch.Tensor]]:
    """Bit classes and the permutation: (class_bits, class_rows, perm or None).

    Packed order is the extra classes in descending bits, then the main class last (it absorbs the
    remainder that is not a multiple of row_align). Inside a class, channels keep their original
    order, so stores through the permutation stay as sequential as possible.
    """
    n = kurt.numel()
    if not mixed_bits:
        return [bits], [n], None
    hi, n_hi, lo, n_lo = plan_class_sizes(n, bits, mixed_bits, avg_bits, row_align)
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
