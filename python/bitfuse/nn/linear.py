"""QuantLinear: a drop-in nn.Linear whose buffers are a PackedWeight."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops, reference
from ..dispatch import linear_op, select_backend
from ..calibrate import calibrate
from ..config import QuantConfig
from ..format import TENSOR_NAMES, PackedWeight

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The torch reference caches each layer's dense fp32 weight so a CPU forward is one matmul.
# BITFUSE_REF_CACHE=0 (or set_reference_cache(False)) turns it off; layers whose dense weight
# would exceed BITFUSE_REF_CACHE_MAX_MB (default 1024 MB) are never cached.
_cache_enabled = os.environ.get("BITFUSE_REF_CACHE", "1") != "0"


def set_reference_cache(enabled: bool) -> None:
    """Turn the torch reference's dense-weight cache on or off (process-wide)."""
    global _cache_enabled
    _cache_enabled = bool(enabled)


def _cache_limit_bytes() -> int:
    return int(float(os.environ.get("BITFUSE_REF_CACHE_MAX_MB", "1024")) * 2**20)


class QuantLinear(nn.Module):
    """y = x·Ŵᵀ + bias with Ŵ held packed (codes, residual, classes, low-rank, sparse).

    Build one with `QuantLinear.from_linear(linear, config)`. Every PackedWeight tensor is a
    buffer, so `.to(device)`, `state_dict()` and `load_state_dict()` work as for nn.Linear.
    """

    def __init__(self, packed: PackedWeight):
        super().__init__()
        packed.validate(check_values=False)
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.class_bits = list(packed.class_bits)
        self.class_rows = list(packed.class_rows)
        self.row_align = packed.row_align
        self.config = dict(packed.config)
        self.target = packed.target
        for name in TENSOR_NAMES:
            self.register_buffer(name, packed.tensors.get(name))
        self._cache = None
        self._cache_key = None

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: QuantConfig, activations=None, **calib_options
    ) -> "QuantLinear":
        """Quantize an nn.Linear (its weight, and bias if any) with `config`. activations: a raw
        (…, in_features) tensor or ActivationStats; calib_options go to calibrate()."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(calibrate(linear.weight.detach(), config, activations=activations, bias=bias,
                             **calib_options))

    @classmethod
    def from_meta(cls, meta: dict, device="cpu") -> "QuantLinear":
        """A QuantLinear with correctly shaped, zero-filled buffers (for loading a checkpoint)."""
        return cls(PackedWeight.from_meta(meta, device=device))

    @property
    def packed(self) -> PackedWeight:
        """The buffers viewed as a PackedWeight (no copy)."""
        return PackedWeight(
            out_features=self.out_features, in_features=self.in_features,
            group_size=self.group_size, class_bits=self.class_bits, class_rows=self.class_rows,
            row_align=self.row_align, config=self.config, target=self.target,
            tensors={n: getattr(self, n) for n in TENSOR_NAMES if getattr(self, n) is not None},
        )

    # ---- what users ask of it ----------------------------------------------------------------
    @property
    def bpw(self) -> float:
        """Effective bits per weight, everything counted (see docs/FORMAT.md §10)."""
        return float(self.packed.bpw)

    @property
    def bits(self) -> float:
        """Mean code width over output channels."""
        return sum(b * r for b, r in zip(self.class_bits, self.class_rows)) / self.out_features

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) fp32 weight equivalent to this layer, all branches included."""
        return ops.dequantize(*ops.op_args(self.packed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantLinear input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear({self.in_features} -> {self.out_features}) expects an input whose "
                f"last dim is {self.in_features}, got shape {tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_INPUT_DTYPES:
            raise TypeError(f"QuantLinear input must be float32, float16 or bfloat16, got {x.dtype}")
        if x.device != self.qweight.device:
            raise ValueError(f"QuantLinear input is on {x.device} but the layer is on {self.qweight.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # Under torch.compile the op picks its backend itself: select_backend reads the environment
        # and bitfuse._C, which dynamo cannot trace, and the op is opaque to dynamo anyway.
        compiling = torch.compiler.is_compiling()
        backend = None if compiling else select_backend(x.device, linear_op(x2.shape[0]))
        w = self._cached_weight() if backend == "torch" else None
        if w is not None:
            y = F.linear(x2.float(), w, None if self.bias is None else self.bias.float()).to(x.dtype)
        else:
            y = ops.linear(x2, *ops.op_args(self.packed))
        return y.reshape(*lead, self.out_features)

    def _cached_weight(self) -> Optional[torch.Tensor]:
        if not _cache_enabled or torch.compiler.is_compiling():
            return None
        if self.out_features * self.in_features * 4 > _cache_limit_bytes():
            return None
        # Keyed on each buffer's storage and version counter: an in-place update (for example
        # load_state_dict) or a move to another device invalidates the cache.
        key = tuple((t.data_ptr(), t._version) for t in self.buffers())
        if self._cache is None or key != self._cache_key:
            with torch.no_grad():
                self._cache = reference.dequantize(self.packed).contiguous()
            self._cache_key = key
        return self._cache

    def _apply(self, fn, recurse=True):
        # model.half() / model.to(torch.bfloat16) must not convert the packed format (fp16 scales
        # to bf16 would round them; the int32 words and fp32 bias/lr_scale have fixed dtypes):
        # let `fn` pick the device, keep every buffer's dtype.
        for name, t in self._buffers.items():
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        self._cache, self._cache_key = None, None
        return self

    def extra_repr(self) -> str:
        classes = ", ".join(f"{b}b×{r}" for b, r in zip(self.class_bits, self.class_rows))
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"group_size={self.group_size}", f"classes=[{classes}]"]
        if self.res_plane is not None:
            parts.append(f"residual_rows={self.res_plane.shape[0]}")
        if self.lr_down is not None:
            parts.append(f"rank={self.lr_down.shape[0]}")
        if self.sp_values is not None:
            parts.append(f"outliers={self.sp_values.numel()}")
        parts.append(f"bias={self.bias is not None}, bpw={self.bpw:.3f}")
        return ", ".join(parts)
