"""Sparse outliers (SqueezeLLM's dense-and-sparse split): the weights that would stretch the
quantization range most are taken out and kept exactly in a sparse fp16 branch."""

from __future__ import annotations

from typing import Optional

import torch


def select_outliers(
    w: torch.Tensor, fraction: float, act_norm: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Boolean (N, K) mask of the top `fraction` of weights by |w| (times the input channel's
    activation norm when calibration activations are given). Empty when fraction is 0."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    count = int(round(fraction * w.numel()))
    if count == 0:
        return mask
    score = w.abs()
    if act_norm is not None:
        score = score * act_norm.to(score).unsqueeze(0)
    idx = torch.topk(score.flatten(), count).indices
    mask.view(-1)[idx] = True
    return mask
