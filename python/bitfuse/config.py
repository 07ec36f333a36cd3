"""QuantConfig: what to build for one layer (or a whole model), as a plain dataclass.

Modelled on torchao's config dataclasses: a config is data, validated once at construction,
serialisable to JSON for the checkpoint metadata. Every validation error names the field and
the values it accepts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

ALLOWED_BITS = (2, 3, 4)
ALLOWED_GROUP_SIZES = (32, 64, 128)
ALLOWED_TARGETS = ("auto", "orin", "rtx30", "rtx40", "h100", "cpu")
MAX_OUTLIER_FRACTION = 0.05


class ConfigError(ValueError):
    """A QuantConfig field holds a value outside what bitfuse supports."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a linear layer.

    bits:        dense code width, one of 2, 3, 4.
    group_size:  input columns sharing one fp16 scale/offset, one of 32, 64, 128.
    residual:    binary residual plane: False, True (every channel), or a float in (0, 1],
                 the fraction of output channels that get it (those that gain most).
    mixed_bits:  None, or a tuple of code widths (e.g. (2, 3, 4)) for mixed-precision channels;
                 must contain `bits`, which is the width of the unremarkable middle.
    avg_bits:    budget for mixed_bits (default: bits): the bit-class split may add at most
                 avg_bits − bits real bpw over uniform `bits`, counting code bits (padding
                 included) and the 32-bit-per-row permutation (calibrate/mixed.py).
    rank:        low-rank branch rank (0 = no branch).
    outliers:    fraction of weights kept exactly in a sparse fp16 branch, 0 to 0.05.
    target:      hardware profile, one of "auto", "orin", "rtx30", "rtx40", "h100", "cpu".
    convs:       quantize_ also replaces nn.Conv2d layers (groups=1) with QuantConv2d.
    embeddings:  quantize_ also replaces nn.Embedding tables with QuantEmbedding (weights-only
                 calibration; a lookup dequantizes the table and gathers rows).
    fit_group:   a layer whose in_features is not a multiple of group_size uses the smaller group
                 (64 or 32) when that stores it in fewer bits (pack.fitted_group_size: less
                 padding, finer scales) without costing the kernels their 16-byte row loads;
                 False pads K to group_size everywhere. The layer's
                 PackedWeight.group_size is the one used; this config keeps the one asked for.
    compact_scales: store each group's scale and offset as 8-bit codes on per-row linear grids
                 (FORMAT.md §5.1: 16 bits a group + 48 a row instead of 32 a group), in layers
                 with at least 4 groups a row, where that is smaller. Codes are chosen against
                 the compact values. Off by default: what it costs the kernels (two byte loads
                 and a row's factors per group; the CUDA GEMM reads them unstaged) is unmeasured.
    """

    bits: int = 4
    group_size: int = 128
    residual: Union[bool, float] = False
    mixed_bits: Optional[Tuple[int, ...]] = None
    avg_bits: Optional[float] = None
    rank: int = 0
    outliers: float = 0.0
    target: str = "auto"
    convs: bool = False
    embeddings: bool = False
    fit_group: bool = True
    compact_scales: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in ALLOWED_BITS:
            raise ConfigError(f"QuantConfig.bits must be one of {ALLOWED_BITS}, got {self.bits!r}")
        if not _is_int(self.group_size) or self.group_size not in ALLOWED_GROUP_SIZES:
            raise ConfigError(
                f"QuantConfig.group_size must be one of {ALLOWED_GROUP_SIZES}, got {self.group_size!r}"
            )
        r = self.residual
        if not isinstance(r, bool):
            if not _is_real(r) or not math.isfinite(r) or not (0.0 < r <= 1.0):
                raise ConfigError(
                    "QuantConfig.residual must be False, True, or a float fraction of channels "
                    f"in (0, 1], got {r!r}"
                )
        mb = self.mixed_bits
        if mb is not None:
            if isinstance(mb, list):
                mb = tuple(mb)
                object.__setattr__(self, "mixed_bits", mb)
            if (
                not isinstance(mb, tuple)
                or len(mb) < 2
                or any(not _is_int(b) or b not in ALLOWED_BITS for b in mb)
                or len(set(mb)) != len(mb)
            ):
                raise ConfigError(
                    "QuantConfig.mixed_bits must be None or a tuple of at least two distinct "
                    f"widths from {ALLOWED_BITS}, e.g. (2, 3, 4); got {self.mixed_bits!r}"
                )
            mb = tuple(sorted(mb))
            object.__setattr__(self, "mixed_bits", mb)
            if self.bits not in mb:
                raise ConfigError(
                    f"QuantConfig.mixed_bits {mb} must contain bits={self.bits} (the middle class)"
                )
        if self.avg_bits is not None:
            a = self.avg_bits
            lo, hi = (min(mb), max(mb)) if mb is not None else (self.bits, self.bits)
            if not _is_real(a) or not math.isfinite(a) or not (lo <= a <= hi):
                raise ConfigError(
                    f"QuantConfig.avg_bits must be a number in [{lo}, {hi}] "
                    f"(the range of {'mixed_bits' if mb else 'bits'}), got {a!r}"
                )
            object.__setattr__(self, "avg_bits", float(a))
        if not _is_int(self.rank) or self.rank < 0:
            raise ConfigError(f"QuantConfig.rank must be an integer >= 0, got {self.rank!r}")
        o = self.outliers
        if not _is_real(o) or not math.isfinite(o) or not (0.0 <= o <= MAX_OUTLIER_FRACTION):
            raise ConfigError(
                f"QuantConfig.outliers must be a fraction in [0, {MAX_OUTLIER_FRACTION}], got {o!r}"
            )
        object.__setattr__(self, "outliers", float(o))
        for flag in ("convs", "embeddings", "fit_group", "compact_scales"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"QuantConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.target not in ALLOWED_TARGETS:
            raise ConfigError(
                f"QuantConfig.target must be one of {ALLOWED_TARGETS}, got {self.target!r}"
            )

    def layer_group_size(self, in_features: int) -> int:
        """The group size a layer with `in_features` inputs is quantized with (see fit_group)."""
        if not self.fit_group:
            return self.group_size
        from .pack import fitted_group_size  # pack imports this module

        return fitted_group_size(in_features, self.group_size, self.bits, self.mixed_bits or (),
                                 compact=self.compact_scales)

    @property
    def effective_avg_bits(self) -> float:
        return float(self.avg_bits) if self.avg_bits is not None else float(self.bits)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["mixed_bits"] is not None:
            d["mixed_bits"] = list(d["mixed_bits"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"QuantConfig got unknown fields {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        if d.get("mixed_bits") is not None:
            d["mixed_bits"] = tuple(d["mixed_bits"])
        return cls(**d)
