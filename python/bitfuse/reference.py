"""The torch reference: the oracle every kernel is tested against, and the CPU execution path.

Everything here is plain torch in fp32, written for clarity. It reads the layouts only through
pack.py, so it cannot drift from the format definition.
"""

from __future__ import annotations

import torch

from . import pack
from .format import PackedWeight


def _expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, G) per-group values -> (rows, G * group_size), one per column."""
    return t.float().repeat_interleave(group_size, dim=1)


def dequantize_rows(pw: PackedWeight, residual: bool = True) -> torch.Tensor:
    """Dense codes (+ binary residual) in packed-row order: (N, k_pad) fp32."""
    kp, g = pw.k_pad, pw.group_size
    codes = pack.unpack_classes(pw.qweight, pw.class_bits, pw.class_rows, kp)
    q = torch.cat(codes, dim=0).float()
    scales, zeros = pw.group_params()  # fp16 pairs or compact codes (FORMAT.md §5)
    w = q * _expand_groups(scales, g) + _expand_groups(zeros, g)
    if residual and pw.res_plane is not None:
        ri = pw.res_index.long()
        rows = torch.nonzero(ri >= 0).flatten()
        signs = pack.unpack_signs(pw.res_plane, kp).float() * 2.0 - 1.0
        alpha = _expand_groups(pw.res_alpha, g)
        w[rows] += (alpha * signs)[ri[rows]]
    return w


def to_output_order(rows: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Scatter packed rows back to the original output-channel order."""
    if pw.perm is None:
        return rows
    out = torch.empty_like(rows)
    out[pw.perm.long()] = rows
    return out


def dense_weight(pw: PackedWeight, residual: bool = True) -> torch.Tensor:
    """Ŵ_b (+ R̂) as an (N, K) fp32 matrix in original order."""
    return to_output_order(dequantize_rows(pw, residual), pw)[:, : pw.in_features]


def lowrank_weight(pw: PackedWeight) -> torch.Tensor:
    """L_up · diag(lr_scale) · L_down as (N, K) fp32, original order (zeros without a branch)."""
    n, k = pw.out_features, pw.in_features
    if pw.lr_down is None:
        return torch.zeros(n, k, device=pw.qweight.device)
    up = to_output_order(pw.lr_up.float(), pw)
    return (up * pw.lr_scale.float()) @ pw.lr_down.float()


def sparse_coo(pw: PackedWeight):
    """The outliers as (rows, cols, values fp32), row indices expanded from the CSR pointers."""
    ip = pw.sp_indptr.long()
    # output_size from the (host-known) nnz: no device->host sync, so CUDA-graph safe.
    rows = torch.repeat_interleave(torch.arange(pw.out_features, device=ip.device), ip[1:] - ip[:-1],
                                   output_size=pw.nnz)
    return rows, pw.sp_indices.long(), pw.sp_values.float()


def sparse_weight(pw: PackedWeight) -> torch.Tensor:
    """The outliers as a dense (N, K) fp32 matrix (zeros without a sparse branch)."""
    w = torch.zeros(pw.out_features, pw.in_features, device=pw.qweight.device)
    if pw.sp_values is not None:
        rows, cols, vals = sparse_coo(pw)
        w.index_put_((rows, cols), vals, accumulate=True)
    return w


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """The dense equivalent of the whole layer, all branches included: (N, K) fp32."""
    w = dense_weight(pw)
    if pw.lr_down is not None:
        w = w + lowrank_weight(pw)
    if pw.sp_values is not None:
        w = w + sparse_weight(pw)
    return w


def lowrank_apply(x32: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(x · L_downᵀ · diag(lr_scale)) · L_upᵀ, in original output order: (M, N) fp32."""
    up = to_output_order(pw.lr_up.float(), pw)
    return ((x32 @ pw.lr_down.float().t()) * pw.lr_scale.float()) @ up.t()


def sparse_apply(x32: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """S · x for every row of x: (M, N) fp32."""
    rows, cols, vals = sparse_coo(pw)
    y = torch.zeros(x32.shape[0], pw.out_features, device=x32.device)
    return y.index_add_(1, rows, x32[:, cols] * vals)


def linear(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """The fused layer of docs/FORMAT.md §1 for a 2-D x (M, K), computed in fp32, cast to x.dtype.

    Branches are applied as the kernels apply them (factored low-rank, sparse product), not by
    materialising the full dense weight, so the reference also checks the branch algebra.
    """
    x32 = x.float()
    y = x32 @ dense_weight(pw).t()
    if pw.lr_down is not None:
        y = y + lowrank_apply(x32, pw)
    if pw.sp_values is not None:
        y = y + sparse_apply(x32, pw)
    if pw.bias is not None:
        y = y + pw.bias.float()
    return y.to(x.dtype)
