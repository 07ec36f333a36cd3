"""The sparse outlier branch of QuantLinear on HBP: S·x for every row of a layer's x.

    extra = outliers.apply(pw, x)   # fp32 (M, N), output channels in original order

S is the PackedWeight's CSR (sp_indptr, sp_indices, sp_values fp16; rows = original output
channels, so the product is in original order, as reference.sparse_apply defines it and as the
fused kernels' `extra` epilogue expects). The checkpoint keeps the CSR; the HBP form is built
from it once per (tensor, device), at first use or by prepare(), and cached. After that a call
does no host sync and no data-dependent allocation (CUDA-graph safe): the CUDA HBP kernel reads
x (M, K) in place through strides (fp16 or bf16, fp32 accumulation) and writes the fp32 (M, N)
result. Anywhere else (CPU, fp32 x, no CUDA in bitfuse._C) it is reference.sparse_apply.
"""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import torch

from .. import _C, reference
from ..format import PackedWeight
from .hbp import HBPMatrix

# id(sp_values) -> (weak ref to that tensor, ids of the indptr/indices it was built from,
# HBPMatrix on its device). Keyed by id, not by the tensor (a tensor's == is elementwise), and
# dropped when the tensor dies.
_CACHE: dict = {}
_X_DTYPES = (torch.float16, torch.bfloat16)


def uses_hbp(pw: PackedWeight, x: torch.Tensor) -> bool:
    """Whether apply() runs the CUDA HBP kernel for this (layer, x)."""
    return (pw.sp_values is not None and x.device.type == "cuda" and x.dtype in _X_DTYPES
            and x.dim() == 2 and _C.cuda_built() and pw.sp_values.device == x.device)


def prepare(pw: PackedWeight) -> Optional[HBPMatrix]:
    """Build (once) and return the HBP form of pw's outliers on pw's device; None without a
    sparse branch. Copies the CSR to the host on the first call only (a sync: call it at load
    time, or let the first forward do it, before any CUDA-graph capture)."""
    vals = pw.sp_values
    if vals is None:
        return None
    # The versions too: load_state_dict copies new outliers into the same tensors. (Inference
    # tensors have no version counter: an in-place reload of those is not seen.)
    csr = (vals, pw.sp_indptr, pw.sp_indices)
    key = (id(pw.sp_indptr), id(pw.sp_indices)) + tuple(
        None if t.is_inference() else t._version for t in csr)
    hit = _CACHE.get(id(vals))
    if hit is not None and hit[0]() is vals and hit[1] == key:
        return hit[2]
    h = HBPMatrix.from_csr(pw.sp_indptr.cpu().numpy(), pw.sp_indices.cpu().numpy(),
                           vals.detach().cpu().numpy(), (pw.out_features, pw.in_features),
                           dtype=np.float16, device=vals.device)
    if vals.device.type == "cuda":
        h.device_arrays()  # upload now, not inside a later (maybe captured) forward
    if hit is None or hit[0]() is not vals:
        weakref.finalize(vals, _CACHE.pop, id(vals), None)
    _CACHE[id(vals)] = (weakref.ref(vals), key, h)
    return h


def apply(pw: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """S·xᵀ as an fp32 (M, N) tensor for x (M, K): the sparse outlier branch of the layer."""
    if pw.sp_values is None:
        raise ValueError("outliers.apply: this layer has no sparse branch")
    if not uses_hbp(pw, x):
        return reference.sparse_apply(x.float(), pw)
    if x.shape[1] != pw.in_features:
        raise ValueError(f"outliers.apply: x has K={x.shape[1]}, the layer {pw.in_features}")
    h = prepare(pw)
    m, n = x.shape[0], pw.out_features
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m:
        # A[r, c]·x[j, c]: the kernel's x[c, j] sits at c·stride(1) + j·stride(0); y[j, r] at
        # r·1 + j·N.
        h.cuda_product(x, x.stride(1), x.stride(0), y, 1, n, m=m)
    return y
