"""The low-rank branch initialised from the quantization error (SVDQuant / MPQ-DMv2)."""

from __future__ import annotations

from typing import Tuple

import torch


def lowrank_from_error(e: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the (N, K) error: L_up = U_r Σ_r^½ (N, r), L_down = Σ_r^½ V_rᵀ (r, K).

    Splitting Σ evenly keeps both factors in the same numeric range, which matters once they are
    stored in fp16. Large matrices use a randomized SVD (a few power iterations), which is
    accurate for the leading components at a fraction of the cost.
    """
    n, k = e.shape
    rank = min(rank, n, k)
    e = e.float()
    if min(n, k) > 1024 and rank < min(n, k) // 4:
        u, s, v = torch.svd_lowrank(e, q=min(rank + 16, min(n, k)), niter=4)
        u, s, vt = u[:, :rank], s[:rank], v[:, :rank].t()
    else:
        u, s, vt = torch.linalg.svd(e, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    root = s.sqrt()
    return (root.unsqueeze(1) * vt), (u * root)
