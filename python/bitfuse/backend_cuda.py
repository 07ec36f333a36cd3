"""The `cuda` backend: bitfuse._C kernels called with raw pointers (no libtorch link).

Kernels: the dense dequantize (codes + residual, inverse permutation fused into the store) and
the fused GEMV for M <= 8 (csrc/cuda/gemv.cu: codes of every bit class, residual, low-rank up,
sparse and bias in one launch, stored through perm). `linear` runs the GEMV for M <= 8 and
dequantize + cuBLAS (branches in torch) for larger M, until the tensor-core GEMM of issue #4
lands. Unverified on a GPU: see docs/STATUS.md.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import extension
from .format import PackedWeight

_OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_MAX_M = 8       # gemv.h kMaxM
_GEMV_ROW_BLOCK = 16  # gemv.h kRowsPerBlock: bit-class boundaries must be multiples of it


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


def gemv_unsupported(x: torch.Tensor, pw: PackedWeight):
    """None if the fused GEMV can run (x, pw) as they are, else the reason it cannot."""
    if x.dim() != 2:
        return f"x must be 2-D (M, K), got shape {tuple(x.shape)}"
    if not 1 <= x.shape[0] <= GEMV_MAX_M:
        return f"the GEMV takes 1..{GEMV_MAX_M} rows of x, got M={x.shape[0]}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the GEMV takes fp16 or bf16 activations, got {x.dtype}"
    first = 0
    for rows in list(pw.class_rows)[:-1]:
        first += rows
        if first % _GEMV_ROW_BLOCK:
            return (f"bit-class boundaries must be multiples of {_GEMV_ROW_BLOCK} rows "
                    f"(FORMAT.md §4), got class_rows {list(pw.class_rows)}")
    return None


def gemv(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """The fused layer for M <= 8 rows of x (fp16/bf16) in one CUDA launch (csrc/cuda/gemv.cu).

    The low-rank down-projection t = x·L_downᵀ·diag(lr_scale) (M, r) and the sparse product
    (M, N) are computed here in fp32 with torch and handed to the kernel, which adds t·L_upᵀ,
    them and the bias in its epilogue and stores through the permutation. 128-bit loads are used
    where the data is 16-byte aligned; the kernel falls back to narrower loads elsewhere, so any
    contiguous input works.
    """
    why = gemv_unsupported(x, pw)
    if why:
        raise ValueError(f"bitfuse cuda gemv: {why}")
    if x.device.type != "cuda" or x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda gemv: x is on {x.device}, weights on {pw.qweight.device}; "
                         "both must be on the same CUDA device")
    _check(pw, x.device)
    x = x.contiguous()
    m, k = x.shape
    n = pw.out_features
    if k != pw.in_features:
        raise ValueError(f"bitfuse cuda gemv: x has K={k}, the layer {pw.in_features}")
    x32 = None
    t = lr_up = extra = None
    r = 0
    if pw.lr_down is not None:
        x32 = x.float()
        t = ((x32 @ pw.lr_down.float().t()) * pw.lr_scale.float()).contiguous()
        lr_up = pw.lr_up.to(torch.float16).contiguous()
        r = t.shape[1]
    if pw.sp_values is not None:
        x32 = x.float() if x32 is None else x32
        extra = reference.sparse_apply(x32, pw).contiguous()
    bias = None if pw.bias is None else pw.bias.float().contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    extension().gemv_cuda(
        _ptr(x), _ptr(out), _ptr(pw.qweight), _ptr(pw.scales), _ptr(pw.zeros), _ptr(pw.perm),
        _ptr(pw.res_index), _ptr(pw.res_plane), _ptr(pw.res_alpha), _ptr(t), _ptr(lr_up),
        _ptr(extra), _ptr(bias), list(pw.class_bits), list(pw.class_rows), m, n, k, pw.k_pad,
        pw.group_size, r, _OUT_DTYPES[x.dtype], torch.cuda.current_stream(x.device).cuda_stream,
    )
    return out


def linear(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """GEMV for M <= 8 (fp16/bf16 x), else CUDA dequantize + cuBLAS with the branches in torch."""
    if x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda backend: x is on {x.device}, weights on {pw.qweight.device}")
    if gemv_unsupported(x, pw) is None:
        return gemv(x, pw)
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
