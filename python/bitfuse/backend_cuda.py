"""The `cuda` backend: bitfuse._C kernels called with raw pointers (no libtorch link).

For now the extension has one kernel, the dense dequantize (codes + residual, inverse
permutation fused into the store). `linear` runs it and then cuBLAS through torch, adding the
low-rank and sparse branches with torch ops: a correct dequant-then-matmul path until the fused
GEMV/GEMM kernels of issue #4 land. Unverified on a GPU: see docs/STATUS.md.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import extension
from .format import PackedWeight

_OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _check(pw: PackedWeight, device: torch.device) -> None:
    for name, t in pw.tensors.items():
        if t.device != device:
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' must be contiguous")
        if t.data_ptr() % 4:
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' must be 4-byte aligned")


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Codes + residual as an (N, K) weight in original order, on the GPU."""
    q = pw.qweight
    if q.device.type != "cuda":
        raise ValueError(f"bitfuse cuda backend needs CUDA tensors, got {q.device}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"bitfuse cuda backend: output dtype must be fp32/fp16/bf16, got {dtype}")
    _check(pw, q.device)
    out = torch.empty(pw.out_features, pw.in_features, dtype=dtype, device=q.device)
    extension().dequantize_cuda(
        _ptr(q), _ptr(pw.scales), _ptr(pw.zeros), _ptr(pw.perm), _ptr(pw.res_index),
        _ptr(pw.res_plane), _ptr(pw.res_alpha), _ptr(out), list(pw.class_bits),
        list(pw.class_rows), pw.out_features, pw.in_features, pw.k_pad, pw.group_size,
        _OUT_DTYPES[dtype], torch.cuda.current_stream(q.device).cuda_stream,
    )
    return out


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = dequantize_dense(pw, torch.float32)
    if pw.lr_down is not None:
        w = w + reference.lowrank_weight(pw)
    if pw.sp_values is not None:
        w = w + reference.sparse_weight(pw)
    return w.to(dtype)


def linear(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    if x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda backend: x is on {x.device}, weights on {pw.qweight.device}")
    w = dequantize_dense(pw, x.dtype)
    y = (x @ w.t()).float()
    x32 = x.float()
    if pw.lr_down is not None:
        y = y + reference.lowrank_apply(x32, pw)
    if pw.sp_values is not None:
        y = y + reference.sparse_apply(x32, pw)
    if pw.bias is not None:
        y = y + pw.bias
    return y.to(x.dtype)
