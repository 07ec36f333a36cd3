"""torch.library custom ops: torch.ops.bitfuse.linear and torch.ops.bitfuse.dequantize.

The ops take the PackedWeight tensors (in format.TENSOR_NAMES order, optional ones as None) and
the host-side geometry as plain ints, so that no backend ever needs a device->host sync to learn
the layout. Each op has a fake (meta) implementation, so torch.compile traces through it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import reference
from .backends import select_backend
from .format import TENSOR_NAMES, PackedWeight

Tensor = torch.Tensor


def _packed(tensors: Dict[str, Optional[Tensor]], class_bits, class_rows, n, k, g) -> PackedWeight:
    # A light view: no validation on the hot path (QuantLinear validated at construction).
    return PackedWeight(
        out_features=n, in_features=k, group_size=g, class_bits=list(class_bits),
        class_rows=list(class_rows), row_align=1, config={}, target="",
        tensors={name: t for name, t in tensors.items() if t is not None},
    )


@torch.library.custom_op("bitfuse::linear", mutates_args=())
def linear(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, perm: Optional[Tensor],
    res_index: Optional[Tensor], res_plane: Optional[Tensor], res_alpha: Optional[Tensor],
    lr_down: Optional[Tensor], lr_up: Optional[Tensor], lr_scale: Optional[Tensor],
    sp_indptr: Optional[Tensor], sp_indices: Optional[Tensor], sp_values: Optional[Tensor],
    bias: Optional[Tensor], class_bits: List[int], class_rows: List[int],
    out_features: int, in_features: int, group_size: int,
) -> Tensor:
    """y = x·Ŵᵀ + bias for a 2-D x (M, K), all branches of the PackedWeight included."""
    args = locals()
    pw = _packed({n: args[n] for n in TENSOR_NAMES}, class_bits, class_rows,
                 out_features, in_features, group_size)
    backend = select_backend(x.device)
    if backend == "cuda":
        from .backend_cuda import linear as cuda_linear
        return cuda_linear(x, pw)
    return reference.linear(x, pw)


@linear.register_fake
def _linear_fake(x, qweight, scales, zeros, perm, res_index, res_plane, res_alpha, lr_down,
                 lr_up, lr_scale, sp_indptr, sp_indices, sp_values, bias, class_bits, class_rows,
                 out_features, in_features, group_size):
    return x.new_empty(x.shape[:-1] + (out_features,))


@torch.library.custom_op("bitfuse::dequantize", mutates_args=())
def dequantize(
    qweight: Tensor, scales: Tensor, zeros: Tensor, perm: Optional[Tensor],
    res_index: Optional[Tensor], res_plane: Optional[Tensor], res_alpha: Optional[Tensor],
    lr_down: Optional[Tensor], lr_up: Optional[Tensor], lr_scale: Optional[Tensor],
    sp_indptr: Optional[Tensor], sp_indices: Optional[Tensor], sp_values: Optional[Tensor],
    bias: Optional[Tensor], class_bits: List[int], class_rows: List[int],
    out_features: int, in_features: int, group_size: int,
) -> Tensor:
    """The dense (N, K) fp32 equivalent weight, all branches included."""
    args = locals()
    pw = _packed({n: args[n] for n in TENSOR_NAMES}, class_bits, class_rows,
                 out_features, in_features, group_size)
    if select_backend(qweight.device) == "cuda":
        from .backend_cuda import dequantize as cuda_dequantize
        return cuda_dequantize(pw, torch.float32)
    return reference.dequantize(pw)


@dequantize.register_fake
def _dequantize_fake(qweight, scales, zeros, perm, res_index, res_plane, res_alpha, lr_down,
                     lr_up, lr_scale, sp_indptr, sp_indices, sp_values, bias, class_bits,
                     class_rows, out_features, in_features, group_size):
    return qweight.new_empty((out_features, in_features), dtype=torch.float32)


def op_args(pw: PackedWeight) -> tuple:
    """The positional arguments after x for both ops, from a PackedWeight."""
    return tuple(pw.tensors.get(n) for n in TENSOR_NAMES) + (
        list(pw.class_bits), list(pw.class_rows), pw.out_features, pw.in_features, pw.group_size,
    )
