"""Calibration activation statistics: what the calibrator needs from activations, and no more.

A layer's output error for a weight error E is tr(E·H·Eᵀ) with H = XᵀX / M (M rows of X), so H
(or its diagonal, the per-input-channel mean square) is all any step needs. Statistics are
accumulated batch by batch, in float64, so activations are never stored.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import CalibrationError

UPDATE_BLOCK_BYTES = 256 * 2**20  # the temporaries of one XᵀX update (fp32 product + its fp64 copy)


class ActivationStats:
    """Running XᵀX (optional), Σx² and max |x| per input channel of one layer's inputs.

    full=False keeps only the diagonal (K values instead of K²), for very wide layers; the steps
    that need the full matrix (activation-aware SVD, row errors) then fall back to the diagonal.
    """

    def __init__(self, in_features: int, full: bool = True, device="cpu"):
        if not isinstance(in_features, int) or in_features <= 0:
            raise CalibrationError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if full else None
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        # per-channel max |x|: SmoothQuant-style smoothing of the mixed-precision ranking uses it
        self.abs_max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "ActivationStats":
        """Add a batch (..., K) of inputs."""
        _check_last_dim(x, self.in_features)
        a = x.detach().reshape(-1, self.in_features)
        if a.shape[0] == 0:
            return self
        a = a.float()
        if not bool(torch.isfinite(a).all()):
            raise CalibrationError("activations hold NaN/Inf values")
        # fp32 product per batch (fast), fp64 running sums (no drift over many batches). In
        # column blocks of at most UPDATE_BLOCK_BYTES of temporaries, so a wide layer (a conv's
        # patches: K up to 23040) does not need a K² fp32 and a K² fp64 copy on top of XᵀX.
        dev = self.sq_sum.device
        if self.xtx is not None:
            k = self.in_features
            cols = max(1, UPDATE_BLOCK_BYTES // (12 * k))
            for j in range(0, k, cols):
                self.xtx[:, j:j + cols] += (a.t() @ a[:, j:j + cols]).to(dev, torch.float64)
        self.sq_sum += a.square().sum(dim=0).to(dev, torch.float64)
        self.abs_max = torch.maximum(self.abs_max, a.abs().amax(dim=0).to(dev))
        self.count += a.shape[0]
        return self

    @classmethod
    def from_tensor(cls, x: torch.Tensor, in_features: int, full: bool = True) -> "ActivationStats":
        return cls(in_features, full=full, device=x.device if isinstance(x, torch.Tensor) else "cpu").update(x)

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if other.in_features != self.in_features:
            raise CalibrationError(f"cannot merge stats of width {other.in_features} into {self.in_features}")
        if self.xtx is not None and other.xtx is not None:
            self.xtx += other.xtx.to(self.xtx.device)
        else:
            self.xtx = None
        self.sq_sum += other.sq_sum.to(self.sq_sum.device)
        self.abs_max = torch.maximum(self.abs_max, other.abs_max.to(self.abs_max.device))
        self.count += other.count
        return self

    # ---- what the calibrator reads --------------------------------------------------------
    def hessian(self) -> Optional[torch.Tensor]:
        """H = XᵀX / M (K, K) fp32, or None when only the diagonal was kept."""
        if self.xtx is None or self.count == 0:
            return None
        return self.xtx.float().div_(self.count)  # one K² fp32 temporary, not an fp64 one too

    def mean_square(self) -> torch.Tensor:
        """diag(H): per-input-channel mean square (K,) fp32."""
        return (self.sq_sum / max(self.count, 1)).float()

    def channel_norm(self) -> torch.Tensor:
        """Per-input-channel RMS (K,) fp32."""
        return self.mean_square().sqrt()

    def channel_max(self) -> torch.Tensor:
        """Per-input-channel max |x| (K,) fp32."""
        return self.abs_max.float()

    def state_dict(self) -> dict:
        return {"in_features": self.in_features, "xtx": self.xtx, "sq_sum": self.sq_sum,
                "abs_max": self.abs_max, "count": self.count}

    def __repr__(self) -> str:
        return (f"ActivationStats(in_features={self.in_features}, rows={self.count}, "
                f"full={self.xtx is not None})")


def row_energy(m: torch.Tensor, hessian: Optional[torch.Tensor],
               mean_square: Optional[torch.Tensor]) -> torch.Tensor:
    """(rows, K) -> (rows,) m·H·mᵀ per row (the output energy of a weight or weight error), with
    only diag(H) when the full H was not kept, or plain Σm² without statistics."""
    if hessian is not None:
        return ((m @ hessian) * m).sum(dim=1)
    if mean_square is not None:
        return (m.square() * mean_square).sum(dim=1)
    return m.square().sum(dim=1)


def has_full_xtx(activations) -> bool:
    """Whether a layer's calibration input carries the full XᵀX that rounding="gptq" needs: a
    raw activation tensor does, ActivationStats do when they kept it (full, within
    collect's max_full_bytes)."""
    if isinstance(activations, ActivationStats):
        return activations.xtx is not None
    return activations is not None


def gptq_fallback(calib_options: dict, activations) -> dict:
    """calib_options for one layer: rounding="gptq" becomes "nearest" when the layer's
    activations lack the full XᵀX (none given, or only the diagonal kept), since GPTQ's error
    feedback needs it; callers log the layers this happened to."""
    if calib_options.get("rounding") == "gptq" and not has_full_xtx(activations):
        return {**calib_options, "rounding": "nearest"}
    return calib_options


def _check_last_dim(x, k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"activations must be a tensor or ActivationStats, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise CalibrationError(f"activations must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise CalibrationError(
            f"activations must have last dim in_features={k}, got shape {tuple(x.shape)}"
        )


def as_stats(activations: Union[None, torch.Tensor, ActivationStats], in_features: int,
             device=None) -> Optional[ActivationStats]:
    """Accept a raw (…, K) tensor or ActivationStats; check it; return ActivationStats (or None)."""
    if activations is None:
        return None
    if isinstance(activations, ActivationStats):
        st = activations
        if st.in_features != in_features:
            raise CalibrationError(
                f"activation statistics are for in_features={st.in_features}, the layer has {in_features}"
            )
    else:
        _check_last_dim(activations, in_features)
        st = ActivationStats.from_tensor(activations, in_features)
    if st.count == 0:
        raise CalibrationError("activations hold no rows")
    if not bool(torch.isfinite(st.sq_sum).all()) or (st.xtx is not None and not bool(torch.isfinite(st.xtx).all())):
        raise CalibrationError("activation statistics hold NaN/Inf values")
    if device is not None and st.sq_sum.device != torch.device(device):
        moved = ActivationStats(in_features, full=st.xtx is not None, device=device)
        moved.merge(st)
        st = moved
    return st


def merge_stats(*parts):
    """{fqn: ActivationStats} of several collections ({fqn: ActivationStats or (…, K) activations})
    merged into new objects (the inputs are left as they are): the statistics of all their
    inputs together. Layers missing from any part are left out."""
    if not parts:
        return {}
    names = set(parts[0]).intersection(*parts[1:])
    out = {}
    for name in parts[0]:
        if name not in names:
            continue
        first = parts[0][name]
        k = first.in_features if isinstance(first, ActivationStats) else getattr(first, "shape", (0,))[-1]
        stats = [as_stats(p[name], k) for p in parts]
        merged = ActivationStats(k, full=all(st.xtx is not None for st in stats), device=stats[0].sq_sum.device)
        for st in stats:
            merged.merge(st)
        out[name] = merged
    return out
