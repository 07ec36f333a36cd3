"""The binary residual plane (MPQ-DMv2's binary residual branch): one sign bit per weight plus a
per-group alpha that refines the dense quantization step."""

from __future__ import annotations

from typing import Tuple

import torch

from .rtn import group_view


def fit_residual(
    r: torch.Tensor, mask: torch.Tensor, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit R ≈ α·(2·sign − 1) per (row, group) for the residual R = W − Ŵ_b.

    For fixed signs sign = [R ≥ 0], the squared error Σ(|R| − α)² is minimised in closed form by
    α = mean|R| over the group's real entries; it then drops by n·α² per group, which is the
    per-row gain returned (used to pick rows when only a fraction of channels gets a plane).
    Returns (signs bool (rows, k_pad), alpha fp16 (rows, G), gain fp32 (rows,)).
    """
    a = (r.abs() * mask).float()
    count = group_view(mask.float(), group_size).sum(dim=-1)
    alpha32 = group_view(a, group_size).sum(dim=-1) / count.clamp_min(1.0)
    alpha = alpha32.to(torch.float16)
    gain = (count * alpha32.square()).sum(dim=-1)
    return r >= 0, alpha, gain


def residual_values(signs: torch.Tensor, alpha: torch.Tensor, group_size: int) -> torch.Tensor:
    """α·(2·sign − 1) as a dense (rows, k_pad) fp32 tensor, from the stored fp16 α."""
    a = alpha.float().repeat_interleave(group_size, dim=1)
    return a * (signs.float() * 2.0 - 1.0)
