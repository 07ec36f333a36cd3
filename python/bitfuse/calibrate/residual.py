"""The binary residual plane (MPQ-DMv2's binary residual branch): one sign bit per weight plus a
per-group alpha that refines the dense quantization step."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .rtn import group_view
from .search import codes_for, group_error, least_squares_params


def fit_residual(
    r: torch.Tensor, mask: torch.Tensor, group_size: int, col_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit R ≈ α·(2·sign − 1) per (row, group) for the residual R = W − Ŵ_b.

    For fixed signs sign = [R ≥ 0], the weighted squared error Σ d·(|R| − α)² is minimised in
    closed form by α = Σ d|R| / Σ d over the group's real entries (d = 1 data-free: α = mean|R|).
    Returns (signs bool (rows, k_pad), alpha fp16 (rows, G), gain fp32 (rows,)), where gain is
    how much the plane lowers each row's (weighted) error, used to pick rows when only a fraction
    of channels gets a plane.
    """
    d = mask.float() if col_weight is None else mask.float() * col_weight.float().unsqueeze(0)
    rg, dg = group_view(r.float(), group_size), group_view(d, group_size)
    alpha32 = (rg.abs() * dg).sum(-1) / dg.sum(-1).clamp_min(1e-30)
    alpha = alpha32.to(torch.float16)
    fitted = rg - alpha.float().unsqueeze(-1) * torch.where(rg >= 0, 1.0, -1.0)
    gain = ((rg.square() - fitted.square()) * dg).sum(dim=(-1, -2))
    return r >= 0, alpha, gain


def residual_values(signs: torch.Tensor, alpha: torch.Tensor, group_size: int) -> torch.Tensor:
    """α·(2·sign − 1) as a dense (rows, k_pad) fp32 tensor, from the stored fp16 α."""
    a = alpha.float().repeat_interleave(group_size, dim=1)
    return a * (signs.float() * 2.0 - 1.0)


def refit_with_residual(
    w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    col_weight: Optional[torch.Tensor] = None, rounds: int = 2,
):
    """Alternate the dense part and the residual plane for a few rounds (coordinate descent):
    signs and α for the current codes, then codes and (scale, offset) for the current plane.

    Each group keeps the best state it reached, so the result is never worse than fitting the
    plane once. Returns (codes uint8, scales, zeros, signs, alpha, error per row): the codes and
    parameters of the dense part, and the plane on top of it.
    """
    cw = torch.ones(w.shape[1], device=w.device) if col_weight is None else col_weight.float()
    weight = group_view(mask.float() * cw.unsqueeze(0), group_size)
    wg = group_view(w.float(), group_size)
    q, s, z = group_view(codes.float(), group_size), scales, zeros

    def plane_for(q, s, z):
        dense = q * s.float().unsqueeze(-1) + z.float().unsqueeze(-1)
        sign, alpha, _ = fit_residual((wg - dense).flatten(1), mask, group_size, col_weight)
        pm = torch.where(group_view(sign, group_size), 1.0, -1.0)
        return sign, alpha, pm

    sign, alpha, pm = plane_for(q, s, z)
    plane = alpha.float().unsqueeze(-1) * pm
    best = [q, s, z, sign, alpha]
    best_e = group_error(wg - plane, q, s, z, weight)
    for _ in range(rounds):
        target = wg - plane
        s, z = least_squares_params(target, q, weight, s, z)
        q = codes_for(target, s, z, bits)
        sign, alpha, pm = plane_for(q, s, z)
        plane = alpha.float().unsqueeze(-1) * pm
        e = group_error(wg - plane, q, s, z, weight)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        b3 = better.unsqueeze(-1)
        best = [torch.where(b3, q, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2]),
                torch.where(b3, group_view(sign, group_size), group_view(best[3], group_size)).flatten(1),
                torch.where(better, alpha, best[4])]
        # continue from the best state so a bad round cannot derail the next one
        q, s, z = best[0], best[1], best[2]
        plane = best[4].float().unsqueeze(-1) * torch.where(group_view(best[3], group_size), 1.0, -1.0)
    q, s, z, sign, alpha = best
    return q.flatten(1).to(torch.uint8), s, z, sign, alpha, best_e.sum(-1)
