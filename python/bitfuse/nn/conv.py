"""QuantConv2d: an nn.Conv2d whose weight is a PackedWeight, run through the linear kernels.

A conv weight (O, C, kh, kw) is the linear weight (O, C·kh·kw): the order of F.unfold's patch
vector (channel-major, then kernel rows, then kernel columns) is exactly the order of
`weight.reshape(O, -1)`, so the packed format, calibration and kernels are the linear ones.
  * 1×1 convs (stride s, no padding) are a linear over channels of the (strided) pixels: no
    im2col, just a channels-last view.
  * k×k convs, by the backend of the "conv" op (dispatch.AUTO_ORDER; Triton first on a GPU):
    - triton: the implicit GEMM (kernels/conv2d.py, op bitfuse::conv2d): patches are gathered
      inside the kernel from the NCHW or channels-last input, never materialised;
    - otherwise (the torch reference, the oracle; the CUDA backend): im2col (F.unfold) and the
      linear op, whose GEMM is then the CUDA or torch one.
Only groups=1 and zero padding are handled; quantize_ leaves other convs as they are and says so.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..calibrate import calibrate
from ..dispatch import select_backend
from ..config import QuantConfig
from ..format import PackedWeight
from .linear import SUPPORTED_INPUT_DTYPES, QuantLinear


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def conv_unsupported_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why a conv cannot be a QuantConv2d, or None."""
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convs are not supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (give explicit padding)"
    return None


class QuantConv2d(QuantLinear):
    """y = conv2d(x, Ŵ, bias) with Ŵ packed as the (out, in·kh·kw) linear weight."""

    def __init__(self, packed: PackedWeight, in_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1):
        super().__init__(packed)
        self.in_channels = int(in_channels)
        self.out_channels = packed.out_features
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        kh, kw = self.kernel_size
        if self.in_channels * kh * kw != packed.in_features:
            raise ValueError(
                f"QuantConv2d: in_channels·kh·kw = {self.in_channels}·{kh}·{kw} must equal the packed "
                f"in_features {packed.in_features}"
            )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: QuantConfig, activations=None,
                  **calib_options) -> "QuantConv2d":
        """Quantize an nn.Conv2d. `activations`, if given, are unfolded patches (…, C·kh·kw) or
        their ActivationStats; calib_options go to calibrate()."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        why = conv_unsupported_reason(conv)
        if why:
            raise ValueError(f"QuantConv2d cannot take this conv: {why}")
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        bias = conv.bias.detach() if conv.bias is not None else None
        packed = calibrate(w, config, activations=activations, bias=bias, **calib_options)
        return cls(packed, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @classmethod
    def from_meta(cls, meta: dict, device="cpu") -> "QuantConv2d":
        c = meta["conv"]
        return cls(PackedWeight.from_meta(meta, device=device), c["in_channels"], c["kernel_size"],
                   c["stride"], c["padding"], c["dilation"])

    def conv_meta(self) -> dict:
        return {"in_channels": self.in_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation)}

    def _lora_factor_shapes(self, down: torch.Tensor, up: torch.Tensor):
        # A conv LoRA is a down conv (r, C, kh, kw) with this conv's kernel, then a 1×1 up conv
        # (O, r, 1, 1); (r, C·kh·kw) is its linear form in F.unfold's order, the packed K order.
        if down.dim() == 4 and tuple(down.shape[1:]) == (self.in_channels, *self.kernel_size):
            down = down.reshape(down.shape[0], -1)
        return super()._lora_factor_shapes(down, up)

    def _lora_shape_hint(self) -> str:
        kh, kw = self.kernel_size
        return (f" (for this conv also down (r, {self.in_channels}, {kh}, {kw}) and up "
                f"({self.out_channels}, r, 1, 1))")

    def dequantize_conv(self) -> torch.Tensor:
        """The dense (out, in, kh, kw) fp32 weight, all branches included."""
        return self.dequantize().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == self.in_channels:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # unbatched (C, H, W), as nn.Conv2d takes
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"QuantConv2d({self.in_channels} -> {self.out_channels}) expects (B, {self.in_channels}, H, W) "
                f"or ({self.in_channels}, H, W), "
                f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dtype not in SUPPORTED_INPUT_DTYPES:
            raise TypeError(f"QuantConv2d input must be float32, float16 or bfloat16, got {x.dtype}")
        if x.device != self.qweight.device:
            raise ValueError(f"QuantConv2d input is on {x.device} but the layer is on {self.qweight.device}")
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"QuantConv2d: input {h}x{w} is smaller than the kernel allows")
        if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
            xs = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
            y = super().forward(xs.permute(0, 2, 3, 1))          # (B, Ho, Wo, O), channels last
            return y.permute(0, 3, 1, 2)
        # Under torch.compile the op picks its backend itself (select_backend reads the
        # environment and bitfuse._C, which dynamo cannot trace; the op is opaque to it). Eagerly,
        # the torch backend takes im2col below, whose linear uses the cached dense weight.
        if torch.compiler.is_compiling() or select_backend(x.device, "conv") == "triton":
            # The op's (B, Ho, Wo, O) output is returned as NCHW with channels-last strides, as
            # the 1×1 path does (no transpose copy).
            y = ops.conv2d(x, *ops.op_args(self._view()), list(self.kernel_size), list(self.stride),
                           list(self.padding), list(self.dilation))
            return y.permute(0, 3, 1, 2)
        cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
        y = super().forward(cols.transpose(1, 2))                # (B, Ho·Wo, O)
        return y.transpose(1, 2).reshape(b, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, " + super().extra_repr())
