"""Error-feedback rounding (GPTQ, Frantar et al. 2022) on a fixed grid: calibrate(rounding="gptq").

The grid is fixed before any code is chosen ("static groups"): every group keeps the scale and
offset the range search picked on the original weights (and, on rows with a residual plane, its
α), so the packed format is the one nearest rounding produces. Only the codes (and the plane's
signs) change.

Why rounding each weight to its nearest code is not the best one can do. With H = XᵀX/M the
output error of a weight error E is tr(E·H·Eᵀ) = Σ_rows e·H·eᵀ: rows are independent and share H,
so the same column sweep serves every row at once (vectorised over rows, mixed bit widths
included: each row clamps to its own 2^bits − 1). Columns are rounded in the sweep order:
GPTQ's act-order by default (decreasing H_jj; sweep_order), or left to right. The grid is fixed,
so any order keeps every column on its own group's scale and offset. Once column
j is rounded with error δ = w_j − ŵ_j, the columns not yet rounded (F = j+1 … K−1) can still
move to cancel it; the best move, for a quadratic error, is Optimal Brain Surgeon's

    w_F  −=  δ · [H_G⁻¹]_{j,F} / [H_G⁻¹]_{jj},         G = {j} ∪ F (the inverse over what is left).

GPTQ's observation: with H⁻¹ = UᵀU (U upper triangular, the Cholesky factor of H⁻¹ "from the
top"), row j of U is [H_G⁻¹]_{j,G} / sqrt([H_G⁻¹]_{jj}) for every j, so no inverse is ever
updated: with err = δ / U_jj the move is w_G −= err · U_{j,G}. Columns go in blocks of
BLOCK_SIZE; inside a block the move is applied to the block only, and the block's errors reach
the columns after it in one matrix product (lazy batch update: same result, far fewer passes over
the weights).

What the other branches need:
  * outliers (`exact`): their dense code does not matter, the sparse value makes the entry
    exact, so they are rounded with zero error and push nothing onward;
  * residual plane (`alpha`): a row with a plane has the finer grid q·s + z ± α; each entry takes
    the nearer of its two candidates (nearest code for w − α, and for w + α), and the sign is part
    of the rounding;
  * padding columns have no activations: the caller passes only the K real columns.

Dampening: H + λI, λ = PERCDAMP · mean(diag H) (GPTQ's 1%), raised ×10 up to three times if the
Cholesky factorisation still fails. Input channels that never fire (H_jj = 0) are decoupled (their
diagonal set to the mean), so they neither receive nor send any correction. Factorisations run in
float64, the sweep in float32; everything is deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger("bitfuse.calibrate")

PERCDAMP = 0.01
BLOCK_SIZE = 128
ROUNDINGS = ("nearest", "gptq")
SWEEP_ORDERS = ("act", "natural")


def sweep_order(hessian: torch.Tensor, order: str) -> Optional[torch.Tensor]:
    """The column order of the sweep: None for "natural" (left to right), or for "act" GPTQ's
    act-order: columns by decreasing H_jj, ties by index. Why: the first columns are rounded with
    the most columns left to absorb their error, so the columns whose error costs most (large
    H_jj) go first."""
    if order not in SWEEP_ORDERS:
        raise ValueError(f"gptq_order must be one of {SWEEP_ORDERS}, got {order!r}")
    if order == "natural":
        return None
    return torch.argsort(hessian.diagonal(), descending=True, stable=True)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP,
                           order: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, float64 (K, K), with H's rows and columns
    taken in `order` (sweep_order) when given; None when H carries no signal (all-zero
    activations) or cannot be factored even with 1000× the dampening."""
    h = hessian.detach().double().clone()
    if order is not None:
        h = h[order][:, order]
    diag = h.diagonal()
    mean_diag = float(diag.mean())
    if not mean_diag > 0:
        return None
    dead = diag <= 0
    if bool(dead.any()):
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = mean_diag
    # One factorisation, no explicit inverse: with J the order-reversing permutation and
    # J·H·J = L·Lᵀ (lower L), H⁻¹ = J·L⁻ᵀ·L⁻¹·J = UᵀU for the upper-triangular U = J·L⁻¹·J.
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = h.flip(0, 1)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(flipped + percdamp * 10 ** attempt * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    return None


@dataclass
class GPTQResult:
    codes: torch.Tensor            # (rows, K) uint8, in [0, qmax_row]
    signs: Optional[torch.Tensor]  # (rows, K) bool residual-plane signs, or None without alpha
    target: torch.Tensor           # (rows, K) fp32: the (updated) weight each entry was rounded against


def _nearest(t, s, z, pos, safe, qmax):
    """Nearest code of t on the grid q·s + z (the search's codes_for, one column): (q, q·s + z)."""
    q = torch.minimum(torch.round((t - z) / safe).clamp_min_(0), qmax)
    q = torch.where(pos, q, torch.zeros_like(q))
    return q, q * s + z


def gptq_round(
    w: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    qmax: torch.Tensor, group_size: int, *, alpha: Optional[torch.Tensor] = None,
    exact: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None,
    block_size: int = BLOCK_SIZE, _columns: Optional[torch.Tensor] = None,
) -> GPTQResult:
    """Round `w` (rows, K) column by column with error feedback through `factor` (the
    inverse_hessian_factor of the layer's H, taken in the same `order`).

    scales, zeros (rows, G) fp16 with G·group_size ≥ K: the fixed grid; qmax (rows,) each row's
    largest code; alpha (rows, G) or None: the residual plane's α (0 on rows without a plane);
    exact (rows, K) bool or None: entries reproduced exactly elsewhere (sparse outliers);
    order (K,) or None: the sweep's column order (sweep_order). Each column keeps its own
    group's grid whatever the order; the results come back in the original column order.
    """
    rows, k = w.shape
    if factor.shape != (k, k):
        raise ValueError(f"inverse-Hessian factor must be ({k}, {k}), got {tuple(factor.shape)}")
    if order is not None:
        res = gptq_round(w[:, order], factor, scales, zeros, qmax, group_size, alpha=alpha,
                         exact=None if exact is None else exact[:, order],
                         block_size=block_size, _columns=order)
        back = torch.argsort(order)
        return GPTQResult(res.codes[:, back], None if res.signs is None else res.signs[:, back],
                          res.target[:, back])
    # Column j of this sweep is original column _columns[j]: its grid is that column's group's.
    group_of = [c // group_size for c in (_columns.tolist() if _columns is not None else range(k))]
    u = factor.to(device=w.device, dtype=torch.float32)
    work = w.detach().float().clone()
    codes = torch.empty(rows, k, dtype=torch.uint8, device=w.device)
    signs = torch.empty(rows, k, dtype=torch.bool, device=w.device) if alpha is not None else None
    target = torch.empty(rows, k, device=w.device)
    qmax = qmax.to(device=w.device, dtype=torch.float32)
    s_all, z_all = scales.float(), zeros.float()
    a_all = alpha.float() if alpha is not None else None
    for b0 in range(0, k, block_size):
        b1 = min(k, b0 + block_size)
        block = work[:, b0:b1]            # a view: the in-block moves land in `work`
        err = torch.zeros(rows, b1 - b0, device=w.device)
        for c in range(b1 - b0):
            j = b0 + c
            gi = group_of[j]
            s, z = s_all[:, gi], z_all[:, gi]
            pos = s > 0
            safe = torch.where(pos, s, torch.ones_like(s))
            t = block[:, c].clone()
            target[:, j] = t
            if a_all is None:
                q, v = _nearest(t, s, z, pos, safe, qmax)
            else:
                a = a_all[:, gi]
                q_up, v_up = _nearest(t - a, s, z, pos, safe, qmax)
                q_dn, v_dn = _nearest(t + a, s, z, pos, safe, qmax)
                v_up, v_dn = v_up + a, v_dn - a
                up = (t - v_up).abs() <= (t - v_dn).abs()
                q, v = torch.where(up, q_up, q_dn), torch.where(up, v_up, v_dn)
                signs[:, j] = up
            codes[:, j] = q.to(torch.uint8)
            e = (t - v) / u[j, j]
            if exact is not None:
                e = torch.where(exact[:, j], torch.zeros_like(e), e)
            err[:, c] = e
            # Optimal Brain Surgeon's move, for the rest of this block.
            block[:, c:] -= e.unsqueeze(1) * u[j, j:b1].unsqueeze(0)
        if b1 < k:
            work[:, b1:] -= err @ u[b0:b1, b1:]
    return GPTQResult(codes, signs, target)
