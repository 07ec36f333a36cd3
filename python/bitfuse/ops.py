"""torch.library custom ops: torch.ops.bitfuse.linear, .dequantize and .conv2d.

The ops take the PackedWeight tensors (in format.TENSOR_NAMES order, optional ones as None) and
the host-side geometry as plain ints, so that no backend ever needs a device->host sync to learn
the layout. Each op has a fake (meta) implementation, so torch.compile traces through it.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from . import reference
from .dispatch import linear_op, select_backend
from .format import TENSOR_NAMES, TENSOR_SPECS, PackedWeight

Tensor = torch.Tensor


def _packed(tensors: Dict[str, Optional[Tensor]], class_bits, class_rows, n, k, g) -> PackedWeight:
    # A light view: no validation on the hot path (QuantLinear validated at construction).
    return PackedWeight(
        out_features=n, in_features=k, group_size=g, class_bits=list(class_bits),
        class_rows=list(class_rows), row_align=1, config={}, target="",
        tensors={name: t for name, t in tensors.items() if t is not None},
    )


def _from_args(args: tuple) -> PackedWeight:
    """Op arguments (as op_args() lays them out) -> PackedWeight view."""
    n_t = len(TENSOR_NAMES)
    return _packed(dict(zip(TENSOR_NAMES, args[:n_t])), *args[n_t:])


# The schema is generated from format.TENSOR_SPECS, so the ops cannot drift from the format:
# required tensors are `Tensor`, optional ones `Tensor?`, then the host-side geometry.
_TENSORS = ", ".join(f"Tensor{'' if required else '?'} {name}"
                     for name, (_, required) in TENSOR_SPECS.items())
_GEOMETRY = "int[] class_bits, int[] class_rows, int out_features, int in_features, int group_size"
_OUT_FEATURES = len(TENSOR_NAMES) + 2  # index of out_features in op_args()

torch.library.define("bitfuse::linear", f"(Tensor x, {_TENSORS}, {_GEOMETRY}) -> Tensor")
torch.library.define("bitfuse::dequantize", f"({_TENSORS}, {_GEOMETRY}) -> Tensor")


@torch.library.impl("bitfuse::linear", "default")
def _linear(x: Tensor, *args) -> Tensor:
    """y = x·Ŵᵀ + bias for a 2-D x (M, K), all branches of the PackedWeight included."""
    pw = _from_args(args)
    backend = select_backend(x.device, linear_op(x.shape[0]))
    if backend == "triton":
        from .kernels import fused_linear
        return fused_linear(x, pw)
    if backend == "cuda":
        from .backend_cuda import linear as cuda_linear
        return cuda_linear(x, pw)
    return reference.linear(x, pw)


@torch.library.register_fake("bitfuse::linear")
def _linear_fake(x: Tensor, *args) -> Tensor:
    return x.new_empty(x.shape[:-1] + (args[_OUT_FEATURES],))


@torch.library.impl("bitfuse::dequantize", "default")
def _dequantize(*args) -> Tensor:
    """The dense (N, K) fp32 equivalent weight, all branches included."""
    pw = _from_args(args)
    if select_backend(pw.qweight.device, "dequantize") == "cuda":
        from .backend_cuda import dequantize as cuda_dequantize
        return cuda_dequantize(pw, torch.float32)
    return reference.dequantize(pw)


@torch.library.register_fake("bitfuse::dequantize")
def _dequantize_fake(*args) -> Tensor:
    return args[0].new_empty((args[_OUT_FEATURES], args[_OUT_FEATURES + 1]), dtype=torch.float32)


# conv2d: x (B, C, H, W) -> channels-last (B, Ho, Wo, out_features); Ŵ is the (out, C·kh·kw)
# linear weight (nn/conv.py). The triton backend runs the implicit GEMM (kernels/conv2d.py); the
# others run im2col + their linear.
_CONV = "int[] kernel_size, int[] stride, int[] padding, int[] dilation"
_N_LINEAR_ARGS = len(TENSOR_NAMES) + 5  # tensors + geometry, as op_args() lays them out
torch.library.define("bitfuse::conv2d", f"(Tensor x, {_TENSORS}, {_GEOMETRY}, {_CONV}) -> Tensor")


def _conv_out(x: Tensor, ks, st, pd, dl):
    b, _, h, w = x.shape
    return (b, (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1,
            (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1)


@torch.library.impl("bitfuse::conv2d", "default")
def _conv2d(x: Tensor, *args) -> Tensor:
    lin, (ks, st, pd, dl) = args[:_N_LINEAR_ARGS], args[_N_LINEAR_ARGS:]
    b, ho, wo = _conv_out(x, ks, st, pd, dl)
    if select_backend(x.device, "conv") == "triton":
        from .kernels.conv_launch import conv2d_implicit
        return conv2d_implicit(x, _from_args(lin), ks, st, pd, dl)
    cols = torch.nn.functional.unfold(x, tuple(ks), dilation=tuple(dl), padding=tuple(pd), stride=tuple(st))
    return torch.ops.bitfuse.linear(cols.transpose(1, 2).reshape(b * ho * wo, -1), *lin).reshape(b, ho, wo, -1)


@torch.library.register_fake("bitfuse::conv2d")
def _conv2d_fake(x: Tensor, *args) -> Tensor:
    b, ho, wo = _conv_out(x, *args[_N_LINEAR_ARGS:])
    return x.new_empty((b, ho, wo, args[_OUT_FEATURES]))


linear = torch.ops.bitfuse.linear
dequantize = torch.ops.bitfuse.dequantize
conv2d = torch.ops.bitfuse.conv2d


def op_args(pw: PackedWeight) -> tuple:
    """The positional arguments after x for both ops, from a PackedWeight."""
    return tuple(pw.tensors.get(n) for n in TENSOR_NAMES) + (
        list(pw.class_bits), list(pw.class_rows), pw.out_features, pw.in_features, pw.group_size,
    )
