"""QuantLinear: a drop-in nn.Linear whose buffers are a PackedWeight."""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops, reference
from ..dispatch import linear_op, select_backend
from ..calibrate import calibrate
from ..config import QuantConfig
from ..format import TENSOR_NAMES, PackedWeight, lora_strength

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclasses.dataclass(frozen=True)
class LoraInfo:
    """One LoRA adapter of a layer: components [offset, offset + rank) of the low-rank branch,
    ΔW = scale · (alpha / rank) · up @ down."""

    name: str
    offset: int
    rank: int
    alpha: float
    scale: float

    @property
    def strength(self) -> float:
        """The value of each of its lr_scale entries: scale · alpha / rank."""
        return lora_strength(self.scale, self.alpha, self.rank)

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
        self._loras = OrderedDict((e["name"], LoraInfo(**e)) for e in packed.lora)
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
        """The buffers viewed as a PackedWeight (no copy), with the adapter table."""
        pw = self._view()
        pw.lora = [dataclasses.asdict(a) for a in self._loras.values()]
        return pw

    def _view(self) -> PackedWeight:
        # The compute paths read the tensors only. Leaving the adapter table out matters under
        # torch.compile: reading it would make dynamo guard on each adapter's scale, and every
        # set_lora_scale would then recompile.
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
        return float(self._view().bpw)

    @property
    def bits(self) -> float:
        """Mean code width over output channels."""
        return sum(b * r for b, r in zip(self.class_bits, self.class_rows)) / self.out_features

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) fp32 weight equivalent to this layer, all branches included."""
        return ops.dequantize(*ops.op_args(self._view()))

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
            y = ops.linear(x2, *ops.op_args(self._view()))
        return y.reshape(*lead, self.out_features)

    # ---- LoRA adapters (docs/FORMAT.md §7) -----------------------------------------------------
    # An adapter is appended to the low-rank branch along r; its strength is in lr_scale, so
    # adding, rescaling or removing one never touches the codes, and every backend runs it as
    # part of the branch it already computes.

    @property
    def loras(self) -> "OrderedDict[str, LoraInfo]":
        """The adapters, in component order: name -> LoraInfo(name, offset, rank, alpha, scale).
        Components before the first adapter are the calibrated low-rank branch."""
        return OrderedDict(self._loras)

    def _lora_factor_shapes(self, down: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(down (r, in_features), up (out_features, r)) from the shapes a LoRA checkpoint uses.
        A (…, 1, 1) conv form is accepted too: 1×1-conv LoRAs also target layers that a model
        implements as a linear."""
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down = down.reshape(down.shape[0], -1)
        if up.dim() == 4 and up.shape[2:] == (1, 1):
            up = up.reshape(up.shape[0], -1)
        return down, up

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.in_features} -> {self.out_features})"

    def _prepare_lora(self, name: str, down, up, alpha=None, scale=1.0, where: Optional[str] = None):
        """Check an adapter against this layer and return its stored form (down fp16 (r, K),
        up fp16 (N, r) in packed-row order, LoraInfo), changing nothing. ValueError on any
        problem, naming the layer (`where`, else its shape) and the adapter."""
        at = f"LoRA '{name}' on {where or self._describe()}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"LoRA adapter name must be a non-empty string, got {name!r}")
        if name in self._loras:
            raise ValueError(f"{at}: the layer already has an adapter named '{name}' "
                             f"(remove_lora it first, or pick another name)")
        if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
            raise TypeError(f"{at}: down and up must be tensors, got {type(down).__name__}, {type(up).__name__}")
        down0, up0 = tuple(down.shape), tuple(up.shape)
        down, up = self._lora_factor_shapes(down.detach(), up.detach())
        k, n = self.in_features, self.out_features
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != k or up.shape[0] != n \
                or up.shape[1] != down.shape[0] or down.shape[0] < 1:
            raise ValueError(f"{at}: shape mismatch: down {down0} and up {up0} do not make an "
                             f"({n}, {k}) update; expected down (r, {k}) and up ({n}, r)"
                             + self._lora_shape_hint())
        r = int(down.shape[0])
        alpha = float(r if alpha is None else (alpha.item() if isinstance(alpha, torch.Tensor) else alpha))
        scale = float(scale)
        # Checked in float64: the factors are stored fp16, and a bf16/fp32 value outside fp16's
        # range would silently become inf (and NaN after a multiply by 0).
        for what, t in (("down", down), ("up", up)):
            t64 = t.to(torch.float64)
            if not bool(torch.isfinite(t64).all()):
                raise ValueError(f"{at}: '{what}' holds NaN or Inf")
            peak = float(t64.abs().max())
            if peak > FP16_MAX:
                raise ValueError(f"{at}: '{what}' has |value| {peak:.6g} beyond fp16 range "
                                 f"({FP16_MAX:g}); LoRA factors are stored in fp16")
        info = LoraInfo(name=name, offset=self._lr_rank(), rank=r, alpha=alpha, scale=scale)
        strength = info.strength
        if not bool(torch.isfinite(torch.tensor(strength, dtype=torch.float32))):
            raise ValueError(f"{at}: scale {scale} · alpha {alpha} / rank {r} gives a non-finite fp32 "
                             f"strength")
        dev = self.qweight.device
        down16 = down.to(device=dev, dtype=torch.float16).contiguous()
        up16 = up.to(device=dev, dtype=torch.float16)
        if self.perm is not None:
            up16 = up16[self.perm.long()]  # lr_up is indexed by packed row: row i is channel perm[i]
        return down16, up16.contiguous(), info

    def _lora_shape_hint(self) -> str:
        return ""

    def _lr_rank(self) -> int:
        """Components in the low-rank branch: the calibrated ones plus every adapter's."""
        return 0 if self.lr_down is None else int(self.lr_down.shape[0])

    @torch.inference_mode(False)
    def _append_lora(self, down16: torch.Tensor, up16: torch.Tensor, info: LoraInfo) -> None:
        # Outside inference mode even when called inside it: an inference-mode buffer could not
        # be rescaled in place later (set_lora_scale) outside it.
        down16, up16 = down16.clone(), up16.clone()  # never the caller's tensor itself
        scale = torch.full((info.rank,), info.strength, dtype=torch.float32, device=down16.device)
        if self.lr_down is None:
            self.lr_down, self.lr_up, self.lr_scale = down16, up16, scale
        else:
            self.lr_down = torch.cat([self.lr_down, down16], 0)
            self.lr_up = torch.cat([self.lr_up, up16], 1).contiguous()
            self.lr_scale = torch.cat([self.lr_scale, scale], 0)
        self._loras[info.name] = info
        self._cache, self._cache_key = None, None

    def add_lora(self, name: str, down: torch.Tensor, up: torch.Tensor, *, alpha=None,
                 scale: float = 1.0) -> LoraInfo:
        """Add a LoRA adapter: ΔW = scale · (alpha / r) · up @ down, with down (r, in_features)
        and up (out_features, r) (alpha None: alpha = r, a factor of 1).

        Its r components are appended to the low-rank branch after the calibrated ones and any
        earlier adapters; the factors are stored in fp16 (NaN, Inf or values beyond fp16 range
        are a ValueError), the strength scale·alpha/r in lr_scale. The buffers are replaced by
        larger ones, so a captured CUDA graph or a compiled model must be re-captured or
        recompiled after this call (set_lora_scale does not need that). Returns its LoraInfo."""
        down16, up16, info = self._prepare_lora(name, down, up, alpha, scale)
        self._append_lora(down16, up16, info)
        return info

    @torch.no_grad()
    def set_lora_scale(self, name: str, scale: float) -> LoraInfo:
        """Set an adapter's strength, writing only its lr_scale entries, in place: no new tensor
        and no shape change, so a captured CUDA graph (which reads lr_scale at replay) and a
        torch.compile'd model (buffers are graph inputs) keep working without re-capture or
        recompilation. scale 0 turns the adapter off without removing it."""
        info, new = self._get_lora(name), self._rescaled(name, scale)
        self.lr_scale[info.offset:info.offset + info.rank].fill_(new.strength)
        self._loras[name] = new
        return new

    def _rescaled(self, name: str, scale) -> LoraInfo:
        """The adapter's LoraInfo at a new scale, checked (KeyError / ValueError), not applied."""
        new = dataclasses.replace(self._get_lora(name), scale=float(scale))
        if not bool(torch.isfinite(torch.tensor(new.strength, dtype=torch.float32))):
            raise ValueError(f"LoRA '{name}' on {self._describe()}: scale {scale} gives a non-finite "
                             f"fp32 strength (scale · alpha / rank)")
        return new

    @torch.inference_mode(False)
    def remove_lora(self, name: str) -> None:
        """Drop an adapter's components (later adapters move down). When nothing remains, the
        low-rank tensors are dropped: the layer is then exactly what it was before any adapter.
        Like add_lora, this replaces buffers (re-capture CUDA graphs, recompile)."""
        info = self._get_lora(name)
        o, r, total = info.offset, info.rank, self._lr_rank()
        self._cache, self._cache_key = None, None
        if total == r:
            self.lr_down = self.lr_up = self.lr_scale = None
        else:
            idx = torch.arange(total, device=self.lr_down.device)
            keep = idx[(idx < o) | (idx >= o + r)]
            self.lr_down = self.lr_down.index_select(0, keep).contiguous()
            self.lr_up = self.lr_up.index_select(1, keep).contiguous()
            self.lr_scale = self.lr_scale.index_select(0, keep).contiguous()
        del self._loras[name]
        for k, a in list(self._loras.items()):
            if a.offset > o:
                self._loras[k] = dataclasses.replace(a, offset=a.offset - r)

    def __getstate__(self):
        # deepcopy / pickle: never carry the dense-weight cache (its key names this module's
        # buffers, and a copy's fresh buffers could match it; nor should torch.save write it).
        state = self.__dict__.copy()
        state["_cache"], state["_cache_key"] = None, None
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The adapter table (names, ranks, alphas) is this module's, not the state dict's: check
        # the incoming lr_scale against it before anything is copied, so a refused load leaves
        # the layer as it was; after the copy, read each adapter's scale back.
        loaded = state_dict.get(prefix + "lr_scale")
        if self._loras and loaded is not None and self.lr_scale is not None \
                and tuple(loaded.shape) == tuple(self.lr_scale.shape):
            problem = self._lora_table_problem(loaded)
            if problem:
                error_msgs.append(
                    f"{prefix or 'QuantLinear'}: the state dict's low-rank tensors do not fit the LoRA "
                    f"adapters {list(self._loras)} of {self._describe()}: {problem}. remove_lora them "
                    f"before loading, or use bitfuse.load_quantized, which carries the adapter table")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._cache, self._cache_key = None, None
        if self._loras and self.lr_scale is not None:
            self._read_back_lora_scales()

    def _lora_table_problem(self, lr_scale: torch.Tensor) -> Optional[str]:
        for name, a in self._loras.items():
            entries = lr_scale[a.offset:a.offset + a.rank].float()
            if not bool((entries == entries[0]).all()):
                return f"adapter '{name}': lr_scale[{a.offset}:{a.offset + a.rank}] is not one strength"
        return None

    def _read_back_lora_scales(self) -> None:
        for name, a in list(self._loras.items()):
            strength = float(self.lr_scale[a.offset].float())
            if strength == float(torch.tensor(a.strength, dtype=torch.float32)) or a.alpha == 0:
                continue  # the table's scale already gives this fp32 strength: keep it exact
            self._loras[name] = dataclasses.replace(a, scale=strength * a.rank / a.alpha)

    def _get_lora(self, name: str) -> LoraInfo:
        if name not in self._loras:
            raise KeyError(f"{self._describe()} has no LoRA adapter '{name}'; it has {list(self._loras)}")
        return self._loras[name]

    def _cached_weight(self) -> Optional[torch.Tensor]:
        if not _cache_enabled or torch.compiler.is_compiling():
            return None
        if self.out_features * self.in_features * 4 > _cache_limit_bytes():
            return None
        bufs = tuple(self.buffers())
        if any(t.is_inference() for t in bufs):
            return None  # inference tensors have no version counter to key on: no cache
        # Keyed on the buffer tensors themselves and their version counters: an in-place update
        # (load_state_dict, set_lora_scale) bumps a version; a replaced buffer (add/remove_lora,
        # a move) is another object. Holding the objects, not their addresses, matters: a freed
        # buffer's memory is often handed to its replacement, and an address key would match.
        versions = tuple(t._version for t in bufs)
        if self._cache is None or self._cache_key is None or versions != self._cache_key[1] \
                or len(bufs) != len(self._cache_key[0]) \
                or any(a is not b for a, b in zip(bufs, self._cache_key[0])):
            # A normal tensor even when this forward runs under inference_mode: a later forward
            # with autograd could not use an inference tensor.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = reference.dequantize(self._view()).contiguous()
            self._cache_key = (bufs, versions)
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
        if self.scale_codes is not None:
            parts.append("compact_scales")
        if self.res_plane is not None:
            parts.append(f"residual_rows={self.res_plane.shape[0]}")
        if self.lr_down is not None:
            parts.append(f"rank={self.lr_down.shape[0]}")
        if self._loras:
            parts.append(f"loras={list(self._loras)}")
        if self.sp_values is not None:
            parts.append(f"outliers={self.sp_values.numel()}")
        parts.append(f"bias={self.bias is not None}, bpw={self.bpw:.3f}")
        return ", ".join(parts)
