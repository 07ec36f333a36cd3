"""PackedWeight: every part of a quantized linear layer, as tensors plus JSON-able metadata.

The bit layouts themselves live in pack.py (and docs/FORMAT.md); this module only holds the
parts, checks that they are consistent with each other, and counts their bits.

Row space vs output space:
  * "packed rows" are output channels reordered so that each bit class is contiguous. Tensors
    indexed by packed row: qweight, scales, zeros, res_index, lr_up. `perm[i]` is the original
    output channel of packed row i (None when the order is the identity).
  * Output-space tensors use the original channel order: bias, and the sparse CSR arrays
    (rows = original output channels, columns = original input columns).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import pack
from .config import QuantConfig

FORMAT_VERSION = 2  # 2: slot order inside 32-column runs (FORMAT.md §3.1); 1 read as an error

# name -> (dtype, is it required). Order fixes the op signature (ops.py) and the checkpoint.
TENSOR_SPECS: Dict[str, Tuple[torch.dtype, bool]] = {
    "qweight": (torch.int32, True),
    # One of two scale forms (FORMAT.md §5): fp16 pairs, or compact codes + row factors.
    "scales": (torch.float16, False),
    "zeros": (torch.float16, False),
    "scale_codes": (torch.uint8, False),
    "zero_codes": (torch.uint8, False),
    "scale_rows": (torch.float16, False),
    "perm": (torch.int32, False),
    "res_index": (torch.int32, False),
    "res_plane": (torch.int32, False),
    "res_alpha": (torch.float16, False),
    "lr_down": (torch.float16, False),
    "lr_up": (torch.float16, False),
    "lr_scale": (torch.float32, False),
    "sp_indptr": (torch.int32, False),
    "sp_indices": (torch.int32, False),
    "sp_values": (torch.float16, False),
    "bias": (torch.float32, False),
}
TENSOR_NAMES = tuple(TENSOR_SPECS)

# Groups of optional tensors that exist together or not at all.
_BRANCHES = {
    "fp16 scale": ("scales", "zeros"),
    "compact scale": ("scale_codes", "zero_codes", "scale_rows"),
    "residual": ("res_index", "res_plane", "res_alpha"),
    "lowrank": ("lr_down", "lr_up", "lr_scale"),
    "sparse": ("sp_indptr", "sp_indices", "sp_values"),
}


class FormatError(ValueError):
    """A PackedWeight (or checkpoint entry) whose parts are missing or inconsistent."""


def lora_strength(scale: float, alpha: float, rank: int) -> float:
    """The lr_scale value of each component of a LoRA adapter: scale · alpha / rank. One helper,
    so that writing (QuantLinear.add_lora / set_lora_scale) and checking (validate) agree."""
    return float(scale) * float(alpha) / int(rank)


def _lora_entry(e) -> dict:
    """One adapter-table entry from checkpoint JSON, with its types checked."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
        raise FormatError(f"malformed adapter table entry {e!r}: needs a non-empty string 'name'")
    try:
        out = {"name": e["name"], "offset": int(e["offset"]), "rank": int(e["rank"]),
               "alpha": float(e["alpha"]), "scale": float(e["scale"])}
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"malformed adapter table entry {e!r}: {err!r}") from None
    if not all(math.isfinite(out[k]) for k in ("alpha", "scale")):
        raise FormatError(f"adapter '{out['name']}' has a non-finite alpha or scale")
    return out


@dataclass
class PackedWeight:
    """One quantized layer. See docs/FORMAT.md for the meaning of every field."""

    out_features: int
    in_features: int
    group_size: int
    class_bits: List[int]
    class_rows: List[int]
    row_align: int
    config: dict
    target: str
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # LoRA adapters held in the low-rank branch (FORMAT.md §7): [{"name", "offset", "rank",
    # "alpha", "scale"}, ...] in component order. Empty: every component is the calibrated branch.
    lora: List[dict] = field(default_factory=list)

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def k_pad(self) -> int:
        return pack.padded_k(self.in_features, self.group_size)

    @property
    def n_groups(self) -> int:
        return self.k_pad // self.group_size

    @property
    def rank(self) -> int:
        t = self.tensors.get("lr_down")
        return 0 if t is None else int(t.shape[0])

    @property
    def nnz(self) -> int:
        t = self.tensors.get("sp_values")
        return 0 if t is None else int(t.numel())

    @property
    def n_residual_rows(self) -> int:
        t = self.tensors.get("res_plane")
        return 0 if t is None else int(t.shape[0])

    @property
    def compact_scales(self) -> bool:
        """Whether the scales are stored compact (FORMAT.md §5.1) rather than as fp16 pairs."""
        return "scale_codes" in self.tensors

    def group_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) as fp32 (N, G), whichever form stores them: the values every kernel
        dequantizes with."""
        t = self.tensors
        if "scale_codes" in t:
            return pack.expand_scales(t["scale_codes"], t["zero_codes"], t["scale_rows"])
        return t["scales"].float(), t["zeros"].float()

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors.get(name)

    def __getattr__(self, name: str):
        # pw.qweight etc. for convenience; dataclass fields are found before this is called.
        tensors = self.__dict__.get("tensors", {})
        if name in TENSOR_SPECS:
            return tensors.get(name)
        raise AttributeError(name)

    # ---- size accounting ---------------------------------------------------------------------
    def stored_bits(self) -> int:
        """Bits of every tensor inference reads, except the bias (a dense layer has it too)."""
        return sum(t.numel() * t.element_size() * 8 for n, t in self.tensors.items() if n != "bias")

    @property
    def bpw(self) -> float:
        """Effective bits per original weight, counting codes, scales/offsets, the residual plane
        and alpha, the permutation, low-rank factors, and sparse values and indices."""
        return self.stored_bits() / float(self.out_features * self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ---- metadata ----------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format_version": self.format_version,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "group_size": self.group_size,
            "k_pad": self.k_pad,
            "class_bits": list(self.class_bits),
            "class_rows": list(self.class_rows),
            "row_align": self.row_align,
            "config": dict(self.config),
            "target": self.target,
            "rank": self.rank,
            "nnz": self.nnz,
            "n_residual_rows": self.n_residual_rows,
            "tensors": sorted(self.tensors),
            "bpw": self.bpw,
            # Optional key, written only when adapters are present: a layer without adapters
            # gets exactly the metadata earlier versions wrote, and a reader that ignores the key
            # still computes the right output (the strengths are in lr_scale).
            **({"lora": [dict(e) for e in self.lora]} if self.lora else {}),
        }

    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """The shape each tensor must have, from the metadata alone (used to allocate on load)."""
        n, k, kp, g = self.out_features, self.in_features, self.k_pad, self.n_groups
        words = pack.class_word_offsets(self.class_bits, self.class_rows, kp)[-1]
        r, rr, nnz = self.rank, self.n_residual_rows, self.nnz
        return {
            "qweight": (words,),
            "scales": (n, g),
            "zeros": (n, g),
            "scale_codes": (n, g),
            "zero_codes": (n, g),
            "scale_rows": (n, pack.COMPACT_ROW_FACTORS),
            "perm": (n,),
            "res_index": (n,),
            "res_plane": (rr, kp // 32),
            "res_alpha": (rr, g),
            "lr_down": (r, k),
            "lr_up": (n, r),
            "lr_scale": (r,),
            "sp_indptr": (n + 1,),
            "sp_indices": (nnz,),
            "sp_values": (nnz,),
            "bias": (n,),
        }

    @classmethod
    def from_meta(cls, meta: dict, device="cpu") -> "PackedWeight":
        """An empty PackedWeight with correctly shaped tensors, to be filled from a checkpoint."""
        try:
            version = int(meta["format_version"])
            if version != FORMAT_VERSION:
                raise FormatError(
                    f"checkpoint layer has format_version {version}; this bitfuse reads version "
                    f"{FORMAT_VERSION} only"
                )
            pw = cls(
                out_features=int(meta["out_features"]),
                in_features=int(meta["in_features"]),
                group_size=int(meta["group_size"]),
                class_bits=[int(b) for b in meta["class_bits"]],
                class_rows=[int(r) for r in meta["class_rows"]],
                row_align=int(meta["row_align"]),
                config=dict(meta["config"]),
                target=str(meta["target"]),
            )
            present = list(meta["tensors"])
            rank, nnz, rr = int(meta["rank"]), int(meta["nnz"]), int(meta["n_residual_rows"])
            pw.lora = [_lora_entry(e) for e in meta.get("lora", [])]
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"checkpoint layer metadata is incomplete or malformed: {e!r}") from e
        unknown = set(present) - set(TENSOR_SPECS)
        if unknown:
            raise FormatError(f"checkpoint layer lists unknown tensors {sorted(unknown)}")
        # Placeholders that carry the counts expected_shapes() needs.
        pw.tensors = {}
        if "lr_down" in present:
            pw.tensors["lr_down"] = torch.empty(rank, 0)
        if "sp_values" in present:
            pw.tensors["sp_values"] = torch.empty(nnz)
        if "res_plane" in present:
            pw.tensors["res_plane"] = torch.empty(rr, 0)
        shapes = pw.expected_shapes()
        pw.tensors = {
            n: torch.zeros(shapes[n], dtype=TENSOR_SPECS[n][0], device=device) for n in present
        }
        pw.validate(check_values=False)
        return pw

    # ---- validation --------------------------------------------------------------------------
    def validate(self, check_values: bool = True) -> "PackedWeight":
        """Raise FormatError naming the first inconsistency; return self when all is well."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if n <= 0 or k <= 0:
            raise FormatError(f"shape must be positive, got out={n} in={k}")
        if g not in (32, 64, 128):
            raise FormatError(f"group_size must be 32, 64 or 128, got {g}")
        if len(self.class_bits) != len(self.class_rows) or not self.class_bits:
            raise FormatError("class_bits and class_rows must be non-empty and of equal length")
        if any(b not in (2, 3, 4) for b in self.class_bits):
            raise FormatError(f"class bits must be 2, 3 or 4, got {self.class_bits}")
        if sum(self.class_rows) != n or any(r < 0 for r in self.class_rows):
            raise FormatError(f"class_rows {self.class_rows} must be >= 0 and sum to out_features={n}")
        if any(r % self.row_align for r in self.class_rows[:-1]):
            raise FormatError(
                f"every bit class but the last must have a multiple of row_align={self.row_align} "
                f"rows, got {self.class_rows}"
            )
        for name, (dtype, required) in TENSOR_SPECS.items():
            if required and name not in self.tensors:
                raise FormatError(f"PackedWeight is missing required tensor '{name}'")
        for name in self.tensors:
            if name not in TENSOR_SPECS:
                raise FormatError(f"PackedWeight has unknown tensor '{name}'")
        for branch, names in _BRANCHES.items():
            have = [x in self.tensors for x in names]
            if any(have) and not all(have):
                raise FormatError(f"{branch} branch needs all of {names}, got only "
                                  f"{[x for x, h in zip(names, have) if h]}")
        forms = ("scales" in self.tensors) + ("scale_codes" in self.tensors)
        if forms != 1:
            raise FormatError("PackedWeight needs exactly one scale form: fp16 'scales' + 'zeros', or "
                              "compact 'scale_codes' + 'zero_codes' + 'scale_rows' (FORMAT.md §5); got "
                              + ("both" if forms else "neither"))
        if len(self.class_bits) > 1 and "perm" not in self.tensors:
            raise FormatError("a layer with several bit classes needs 'perm'")
        self._validate_lora_table()
        shapes = self.expected_shapes()
        dev = self.tensors["qweight"].device
        for name, t in self.tensors.items():
            dtype = TENSOR_SPECS[name][0]
            if t.dtype != dtype:
                raise FormatError(f"tensor '{name}' must be {dtype}, got {t.dtype}")
            if tuple(t.shape) != shapes[name]:
                raise FormatError(f"tensor '{name}' must have shape {shapes[name]}, got {tuple(t.shape)}")
            if t.device != dev:
                raise FormatError(f"tensor '{name}' is on {t.device}, qweight on {dev}")
        if check_values:
            self._validate_values()
        return self

    def _validate_lora_table(self) -> None:
        """The adapter table must tile the tail of the low-rank components: adapters in order,
        back to back, the last ending at rank; the calibrated branch is what comes before."""
        if not self.lora:
            return
        if "lr_down" not in self.tensors:
            raise FormatError(f"the adapter table lists {[e.get('name') for e in self.lora]} but the "
                              f"layer has no low-rank tensors (lr_down, lr_up, lr_scale)")
        r = self.rank
        names = [e["name"] for e in self.lora]
        if len(set(names)) != len(names):
            raise FormatError(f"the adapter table repeats a name: {names}")
        end = r - sum(e["rank"] for e in self.lora)
        if end < 0:
            raise FormatError(f"the adapters {names} hold {sum(e['rank'] for e in self.lora)} "
                              f"components, the low-rank branch has rank {r}")
        for e in self.lora:
            if e["rank"] < 1 or e["offset"] != end:
                raise FormatError(
                    f"adapter '{e['name']}' has offset {e['offset']} and rank {e['rank']}; adapters "
                    f"must follow each other back to back after the calibrated components and end at "
                    f"rank {r} (expected offset {end}, rank >= 1)")
            end += e["rank"]

    def _validate_values(self) -> None:
        n, k = self.out_features, self.in_features
        t = self.tensors
        for name in ("scales", "zeros", "scale_rows", "res_alpha", "lr_down", "lr_up", "lr_scale", "sp_values", "bias"):
            if name in t and not bool(torch.isfinite(t[name]).all()):
                raise FormatError(f"tensor '{name}' holds NaN or Inf")
        if "scale_rows" in t and bool((t["scale_rows"][:, [0, 2]] < 0).any()):
            raise FormatError("tensor 'scale_rows' must have steps (columns 0 and 2) >= 0")
        for e in self.lora:
            # The invariant that makes the table trustworthy: an adapter's strength lives in its
            # lr_scale entries, scale·alpha/rank each (in fp32).
            o, r = e["offset"], e["rank"]
            got = t["lr_scale"][o:o + r]
            want = torch.full((r,), lora_strength(e["scale"], e["alpha"], r), dtype=torch.float32,
                              device=got.device)
            if not torch.equal(got, want):
                raise FormatError(
                    f"adapter '{e['name']}': lr_scale[{o}:{o + r}] = {got.tolist()} disagrees with the "
                    f"adapter table (scale {e['scale']} · alpha {e['alpha']} / rank {r} = "
                    f"{float(want[0])})")
        if "perm" in t:
            p = t["perm"].long()
            if not torch.equal(torch.sort(p).values, torch.arange(n, device=p.device)):
                raise FormatError("'perm' must be a permutation of range(out_features)")
        if "res_index" in t:
            ri = t["res_index"].long()
            used = ri[ri >= 0]
            rr = self.n_residual_rows
            if bool((ri < -1).any()) or not torch.equal(torch.sort(used).values, torch.arange(rr, device=ri.device)):
                raise FormatError(
                    f"'res_index' must map packed rows to residual rows 0..{rr - 1} once each, or -1"
                )
        if "sp_indptr" in t:
            ip, idx = t["sp_indptr"].long(), t["sp_indices"].long()
            if int(ip[0]) != 0 or int(ip[-1]) != self.nnz or bool((ip[1:] < ip[:-1]).any()):
                raise FormatError("'sp_indptr' must start at 0, be non-decreasing and end at nnz")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
                raise FormatError(f"'sp_indices' must lie in [0, {k})")

    # ---- movement ----------------------------------------------------------------------------
    def to(self, device) -> "PackedWeight":
        return dataclasses.replace(self, tensors={n: t.to(device) for n, t in self.tensors.items()},
                                   lora=[dict(e) for e in self.lora])

    @property
    def quant_config(self) -> QuantConfig:
        # A config recorded before fit_group existed was applied without it.
        return QuantConfig.from_dict({"fit_group": False, **self.config})
