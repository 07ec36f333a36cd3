"""calibrate(): an nn.Linear weight + QuantConfig -> PackedWeight, producing every branch.

Order of the steps, and why:
  1. outliers are chosen first and taken out, so they do not stretch the dense ranges;
  2. channels are ranked by kurtosis and split into bit classes (rows permuted per class);
  3. each class is quantized with RTN min/max per group;
  4. the binary residual is fitted to what RTN left (closed-form α);
  5. the sparse values are set so dense + sparse reproduce W exactly at the outlier positions;
  6. the low-rank branch is the truncated SVD of whatever error remains.
Issue #5 replaces steps with better (activation-aware, searched) ones behind the same interface.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from .. import pack
from ..config import QuantConfig
from ..format import PackedWeight
from ..targets import resolve_target
from .lowrank import lowrank_from_error
from .mixed import assign_classes, kurtosis
from .outliers import select_outliers
from .residual import fit_residual, residual_values
from .rtn import FP16_MAX, rtn_quantize

log = logging.getLogger("bitfuse.calibrate")


class CalibrationError(ValueError):
    """A weight or calibration input that cannot be quantized as asked."""


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CalibrationError(f"weight must be a 2-D tensor (out, in), got {type(weight).__name__} "
                               f"{tuple(getattr(weight, 'shape', ()))}")
    if not weight.dtype.is_floating_point:
        raise CalibrationError(f"weight must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise CalibrationError(f"weight is empty, shape {tuple(weight.shape)}")
    w = weight.detach().float()
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise CalibrationError(
            f"weight holds {int(bad.sum())} NaN/Inf value(s) (first at {tuple(torch.nonzero(bad)[0].tolist())}); "
            "refusing to quantize a non-finite weight"
        )
    amax = float(w.abs().max())
    if amax > FP16_MAX:
        raise CalibrationError(
            f"weight magnitude {amax:.4g} exceeds the fp16 range ({FP16_MAX}) of bitfuse scales"
        )
    return w


def activation_norms(activations: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-input-channel RMS of calibration activations (..., K) -> (K,) fp32."""
    if not isinstance(activations, torch.Tensor):
        raise CalibrationError(f"activations must be a tensor, got {type(activations).__name__}")
    if activations.dim() < 1 or activations.shape[-1] != in_features:
        raise CalibrationError(
            f"activations must have last dim in_features={in_features}, got shape {tuple(activations.shape)}"
        )
    a = activations.detach().reshape(-1, in_features).float()
    if a.shape[0] == 0:
        raise CalibrationError("activations hold no rows")
    if not bool(torch.isfinite(a).all()):
        raise CalibrationError("activations hold NaN/Inf values")
    return a.square().mean(dim=0).sqrt()


def calibrate(
    weight: torch.Tensor,
    config: QuantConfig,
    activations: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> PackedWeight:
    """Quantize one (out, in) weight into a PackedWeight with every branch `config` asks for."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bitfuse.QuantConfig, got {type(config).__name__}")
    w = _check_weight(weight)
    n, k = w.shape
    g = config.group_size
    kp = pack.padded_k(k, g)
    act_norm = activation_norms(activations, k).to(w.device) if activations is not None else None
    if bias is not None:
        if bias.shape != (n,):
            raise CalibrationError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if not bool(torch.isfinite(bias).all()):
            raise CalibrationError("bias holds NaN/Inf values")

    # 1. outliers out of the dense part.
    out_mask = select_outliers(w, config.outliers, act_norm)
    wp = torch.zeros(n, kp, device=w.device)
    wp[:, :k] = w
    valid = torch.zeros(n, kp, dtype=torch.bool, device=w.device)
    valid[:, :k] = ~out_mask

    # 2. bit classes, 3. RTN per class.
    row_align = pack.row_align_for(n)
    class_bits, class_rows, perm = assign_classes(
        kurtosis(wp, valid), config.bits, config.mixed_bits, config.effective_avg_bits, row_align
    )
    if perm is not None and config.effective_avg_bits >= config.bits:
        # Uniform `bits` fits the budget too: keep the split only if it lowers the error.
        mixed = _quantize_classes(wp[perm.long()], valid[perm.long()], class_bits, class_rows, g)
        uniform = _quantize_classes(wp, valid, [config.bits], [n], g)
        err_mixed = ((mixed[3] - wp[perm.long()]).square() * valid[perm.long()]).sum()
        err_uniform = ((uniform[3] - wp).square() * valid).sum()
        if err_mixed >= err_uniform:
            # MPQ-DM keeps the split only if it helps; here judged on the weight error.
            log.info("mixed classes did not lower the weight error (%.4g >= %.4g); using %d bits",
                     float(err_mixed), float(err_uniform), config.bits)
            class_bits, class_rows, perm = [config.bits], [n], None
    order = perm.long() if perm is not None else None
    wq = wp[order] if order is not None else wp
    vq = valid[order] if order is not None else valid
    codes, scales, zeros, what = _quantize_classes(wq, vq, class_bits, class_rows, g)

    tensors = {"qweight": pack.pack_classes(codes, class_bits), "scales": scales, "zeros": zeros}
    if perm is not None:
        tensors["perm"] = perm

    # 4. binary residual on what RTN left.
    if config.residual:
        signs, alpha, gain = fit_residual(wq - what, vq, g)
        if config.residual is True:
            rows = torch.arange(n, device=w.device)
        else:
            count = max(1, int(math.ceil(float(config.residual) * n)))
            rows = torch.sort(torch.topk(gain, count).indices).values
        res_index = torch.full((n,), -1, dtype=torch.int32, device=w.device)
        res_index[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=w.device)
        tensors.update(res_index=res_index, res_plane=pack.pack_signs(signs[rows]), res_alpha=alpha[rows])
        what[rows] += residual_values(signs[rows], alpha[rows], g)

    # Back to the original channel order for the branches that live there.
    what_out = torch.empty_like(what)
    if order is not None:
        what_out[order] = what
    else:
        what_out = what
    what_out = what_out[:, :k]

    # 5. sparse values: exact corrections at the outlier positions.
    approx = what_out
    if bool(out_mask.any()):
        rows_i, cols_i = torch.nonzero(out_mask, as_tuple=True)  # row-major: columns sorted per row
        values = (w - what_out)[rows_i, cols_i].to(torch.float16)
        indptr = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
        indptr[1:] = torch.cumsum(torch.bincount(rows_i, minlength=n), 0)
        tensors.update(sp_indptr=indptr.to(torch.int32), sp_indices=cols_i.to(torch.int32), sp_values=values)
        approx = what_out.clone()
        approx[rows_i, cols_i] += values.float()

    # 6. low-rank branch from the remaining error.
    if config.rank > 0:
        rank = min(config.rank, n, k)
        if rank < config.rank:
            log.info("rank %d exceeds min(out, in) = %d for a %dx%d layer; using %d",
                     config.rank, rank, n, k, rank)
        down, up = lowrank_from_error(w - approx, rank)
        up = up[order] if order is not None else up
        tensors.update(lr_down=down.to(torch.float16), lr_up=up.to(torch.float16).contiguous(),
                       lr_scale=torch.ones(rank, dtype=torch.float32, device=w.device))

    if bias is not None:
        tensors["bias"] = bias.detach().float().to(w.device)

    pw = PackedWeight(
        out_features=n, in_features=k, group_size=g, class_bits=class_bits, class_rows=class_rows,
        row_align=row_align, config=config.to_dict(), target=resolve_target(config.target),
        tensors={name: t.contiguous() for name, t in tensors.items()},
    )
    return pw.validate()


def _quantize_classes(w, valid, class_bits, class_rows, group_size):
    """RTN per bit class over rows already in packed order. Returns per-class code tensors and
    the concatenated scales, zeros and ŵ."""
    codes, scales, zeros, whats = [], [], [], []
    start = 0
    for b, r in zip(class_bits, class_rows):
        q, s, z, wh = rtn_quantize(w[start:start + r], valid[start:start + r], b, group_size)
        codes.append(q), scales.append(s), zeros.append(z), whats.append(wh)
        start += r
    return codes, torch.cat(scales), torch.cat(zeros), torch.cat(whats)
