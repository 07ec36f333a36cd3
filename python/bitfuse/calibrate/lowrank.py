"""The low-rank branch initialised from the quantization error (SVDQuant / MPQ-DMv2)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Ridge added to H = XᵀX/M before whitening, relative to its mean diagonal: keeps the Cholesky
# factor well conditioned when some input channels barely move (GPTQ uses the same 1% damping).
DAMP = 0.01


def _randomized_svd(a: torch.Tensor, rank: int, oversample: int = 16, power_iters: int = 4):
    """Halko-Martinsson-Tropp randomized SVD with a fixed-seed sketch (deterministic, unlike
    torch.svd_lowrank, which draws from the global RNG)."""
    n, k = a.shape
    q = min(rank + oversample, n, k)
    gen = torch.Generator(device=a.device).manual_seed(0)
    y = a @ torch.randn(k, q, generator=gen, device=a.device, dtype=a.dtype)
    for _ in range(power_iters):
        y = a @ (a.t() @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q
    u, s, vt = torch.linalg.svd((basis.t() @ a).double(), full_matrices=False)
    return (basis.double() @ u[:, :rank]).float(), s[:rank].float(), vt[:rank].float()


def _truncated_svd(a: torch.Tensor, rank: int):
    n, k = a.shape
    if min(n, k) > 256 and rank <= min(n, k) // 4:
        return _randomized_svd(a, rank)
    # float64: LAPACK's float32 divide-and-conquer SVD can take 20x longer on these matrices.
    u, s, vt = torch.linalg.svd(a.double(), full_matrices=False)
    return u[:, :rank].float(), s[:rank].float(), vt[:rank].float()


def whitening_factor(hessian: torch.Tensor, damp: float = DAMP) -> Optional[torch.Tensor]:
    """Lower Cholesky factor C of H + λI (λ = damp·mean diag H), so that ‖E·C‖² = tr(E·H·Eᵀ)
    up to the ridge. None when H carries no signal (all-zero activations) or cannot be factored."""
    h = hessian.double()
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        c, info = torch.linalg.cholesky_ex(h + (damp * 10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            return c
    return None


def lowrank_from_error(
    e: torch.Tensor, rank: int, hessian: Optional[torch.Tensor] = None, damp: float = DAMP,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (L_down (r, K), L_up (N, r)) approximating the (N, K) error E.

    Data-free: the truncated SVD E ≈ U_r Σ_r V_rᵀ. With H = XᵀX/M: minimise the output error
    ‖(E − L)·C‖ instead, C = chol(H + λI): take the SVD of E·C, and unwhiten the down factor,
    L_down = Σ^½ V_rᵀ C⁻¹. Each component is then balanced so both factors share its scale,
    which matters once they are stored in fp16.
    """
    n, k = e.shape
    rank = min(rank, n, k)
    e = e.float()
    c = whitening_factor(hessian, damp) if hessian is not None else None
    if c is None:
        u, s, vt = _truncated_svd(e, rank)
    else:
        u, s, vt = _truncated_svd((e.double() @ c).float(), rank)
        # vt·C⁻¹ by a triangular solve: X·C = vt.
        vt = torch.linalg.solve_triangular(c, vt.double(), upper=False, left=False).float()
    up, down = u * s.sqrt(), s.sqrt().unsqueeze(1) * vt
    balance = (up.norm(dim=0) / down.norm(dim=1).clamp_min(1e-30)).sqrt()
    balance = torch.where(torch.isfinite(balance) & (balance > 0), balance, torch.ones_like(balance))
    return down * balance.unsqueeze(1), up / balance
