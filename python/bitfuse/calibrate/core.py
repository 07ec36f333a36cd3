"""calibrate(): an nn.Linear weight + QuantConfig -> PackedWeight, producing every branch.

Order of the steps, and why:
  1. outliers are chosen first (with activations: greedily, by the measured drop in the group's
     activation-weighted error; data-free: by |w|; outliers.py) and taken out, so they neither
     stretch the dense ranges nor count in its error;
  2. channels are ranked by kurtosis (optionally of the SmoothQuant-smoothed weight); every
     channel is quantized at each width of mixed_bits, its error measured (the output
     error tr(E·H·Eᵀ) when activations are given), and the bit-class split with the least error
     under the avg_bits budget is kept (mixed.py); rows are permuted per class;
  3. each group's range is searched (search.py; method="rtn" keeps plain min/max);
  4. the binary residual is fitted to what is left (closed-form α), alternating with the dense
     scale/offset for a few rounds, and kept on the channels that gain most;
  4b. with rounding="gptq", the codes (and plane signs) are chosen again on that fixed grid, column
     by column with GPTQ's error feedback through H⁻¹ (gptq.py); scales, offsets, α, the bit
     classes and the outliers stay as chosen above;
  5. the sparse values are set so dense + sparse reproduce W exactly at the outlier positions;
  6. the low-rank branch is the truncated SVD of the remaining error, whitened by chol(XᵀX + λI)
     when activations are given; optionally the dense part is requantized against W − L and the
     SVD redone (SVDQuant's alternation), keeping the best round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from .. import pack
from ..config import QuantConfig
from ..format import PackedWeight
from ..targets import resolve_target
from .errors import CalibrationError
from .gptq import ROUNDINGS, SWEEP_ORDERS, gptq_round, inverse_hessian_factor, sweep_order
from .lowrank import lowrank_from_error
from .mixed import choose_split, classes_for_split, kurtosis, smooth_for_ranking
from .outliers import resolve_rule, select_outliers
from .residual import fit_residual, refit_with_residual, residual_values
from .rtn import FP16_MAX, group_view
from .search import codes_for, quantize, refine_compact
from .stats import ActivationStats, as_stats, row_energy

log = logging.getLogger("bitfuse.calibrate")

METHODS = ("search", "rtn")
# Input channels with (almost) no activation still get a little weight, so the search never
# treats their weights as free.
COLUMN_WEIGHT_FLOOR = 1e-4


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


def activation_norms(activations, in_features: int) -> torch.Tensor:
    """Per-input-channel RMS of calibration activations (a (..., K) tensor or ActivationStats)."""
    return as_stats(activations, in_features).channel_norm()


@dataclass
class _Context:
    """What every step needs to know about the layer and its calibration data."""
    config: QuantConfig
    method: str
    n: int
    k: int
    k_pad: int
    hessian: Optional[torch.Tensor]      # (K, K) XᵀX/M, or None
    mean_square: Optional[torch.Tensor]  # (K,) diag(H), or None
    col_weight: Optional[torch.Tensor]   # (k_pad,) per-column weight of the group error, or None
    residual_rounds: int
    rounding: str = "nearest"
    gptq_factor: Optional[torch.Tensor] = None  # (K, K) upper chol((H + λI)⁻¹), rounding="gptq"
    gptq_order: Optional[torch.Tensor] = None   # (K,) the sweep's column order, None = natural

    def row_error(self, e: torch.Tensor) -> torch.Tensor:
        """(rows, K) weight error -> (rows,) output error (e·H·eᵀ), or its proxies without H."""
        return row_energy(e, self.hessian, self.mean_square)


@dataclass
class _DenseFit:
    tensors: Dict[str, torch.Tensor]
    approx: torch.Tensor   # (N, K) dense codes + residual + sparse values, original order


def _column_weight(mean_square: Optional[torch.Tensor], k_pad: int) -> Optional[torch.Tensor]:
    if mean_square is None:
        return None
    floor = COLUMN_WEIGHT_FLOOR * float(mean_square.mean()) + 1e-30
    cw = torch.ones(k_pad, device=mean_square.device)
    cw[: mean_square.numel()] = mean_square + floor
    return cw


def calibrate(
    weight: torch.Tensor,
    config: QuantConfig,
    activations: Union[None, torch.Tensor, ActivationStats] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    method: str = "search",
    residual_rounds: Optional[int] = None,
    lowrank_iters: int = 1,
    outlier_rule: str = "auto",
    kurtosis_smoothing: Optional[float] = None,
    rounding: str = "nearest",
    gptq_order: str = "act",
) -> PackedWeight:
    """Quantize one (out, in) weight into a PackedWeight with every branch `config` asks for.

    activations: None (data-free), a raw (…, K) tensor of the layer's inputs, or the
        ActivationStats that bitfuse.calibrate.collect() gathers.
    method: "search" (per-group range search, the default) or "rtn" (plain min/max per group).
    residual_rounds: rounds alternating the dense scale/offset and the residual plane (default 2
        with "search", 0 with "rtn").
    lowrank_iters: 1 = one SVD of the error; more = requantize against W − L and redo the SVD
        (SVDQuant style), keeping the best round.
    outlier_rule: how config.outliers are chosen (outliers.py): "auto" (default: "measured"
        with activations, "magnitude" without), "magnitude", "act_norm", "sensitivity",
        "measured".
    kurtosis_smoothing: None (rank channels for mixed_bits by the kurtosis of W's rows) or α in
        [0, 1]: rank them by the kurtosis of the SmoothQuant-smoothed W·diag(s),
        s_j = max|x_j|^α / max_i|w_ij|^(1−α) (mixed.smooth_for_ranking). Only the ranking
        changes; it needs activations and is ignored (with a log line) without them.
    rounding: "nearest" (each weight to its nearest code, the default) or "gptq": GPTQ's
        error-feedback rounding on the same grid (gptq.py): codes are chosen column by column and
        each column's rounding error is pushed onto the columns not yet rounded through H⁻¹, which
        lowers the output error tr(E·H·Eᵀ). Scales, offsets, bit classes, outliers and the
        residual's α are those nearest rounding would use ("static groups"), so the format is
        unchanged. Needs activations with the full XᵀX (a raw tensor, or ActivationStats with
        full=True).
    gptq_order: the column order of rounding="gptq"'s sweep: "act" (GPTQ's act-order, the
        default: columns by decreasing E[x_j²], so the costliest columns are rounded while the
        most columns are left to absorb their error) or "natural" (left to right).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bitfuse.QuantConfig, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if residual_rounds is None:
        residual_rounds = 2 if method == "search" else 0
    if not isinstance(residual_rounds, int) or residual_rounds < 0:
        raise ValueError(f"residual_rounds must be an int >= 0, got {residual_rounds!r}")
    if not isinstance(lowrank_iters, int) or lowrank_iters < 1:
        raise ValueError(f"lowrank_iters must be an int >= 1, got {lowrank_iters!r}")
    if kurtosis_smoothing is not None and (
            isinstance(kurtosis_smoothing, bool) or not isinstance(kurtosis_smoothing, (int, float))
            or not 0.0 <= float(kurtosis_smoothing) <= 1.0):
        raise ValueError(f"kurtosis_smoothing must be None or a number in [0, 1] (SmoothQuant's α), "
                         f"got {kurtosis_smoothing!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if gptq_order not in SWEEP_ORDERS:
        raise ValueError(f"gptq_order must be one of {SWEEP_ORDERS}, got {gptq_order!r}")
    w = _check_weight(weight)
    outlier_rule = resolve_rule(outlier_rule, activations is not None)
    n, k = w.shape
    g = config.layer_group_size(k)
    recipe = config
    if g != config.group_size:
        # Every step below works in the layer's own group size; the checkpoint keeps the recipe.
        config = dataclasses.replace(config, group_size=g)
    kp = pack.padded_k(k, g)
    stats = as_stats(activations, k, device=w.device)
    if bias is not None:
        if bias.shape != (n,):
            raise CalibrationError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if not bool(torch.isfinite(bias).all()):
            raise CalibrationError("bias holds NaN/Inf values")
    mean_square = stats.mean_square() if stats is not None else None
    hessian = stats.hessian() if stats is not None else None
    ctx = _Context(
        config=config, method=method, n=n, k=k, k_pad=kp, hessian=hessian,
        mean_square=mean_square, col_weight=_column_weight(mean_square, kp),
        residual_rounds=residual_rounds, rounding=rounding,
    )
    if rounding == "gptq":
        if hessian is None:
            raise ValueError(
                "rounding='gptq' needs calibration activations with the full XᵀX: pass the layer's "
                "inputs (a (…, K) tensor) or ActivationStats(full=True); got "
                + ("no activations" if stats is None else "diagonal-only ActivationStats (full=False)"))
        ctx.gptq_order = sweep_order(hessian, gptq_order)
        ctx.gptq_factor = inverse_hessian_factor(hessian, order=ctx.gptq_order)
        if ctx.gptq_factor is None:
            log.info("rounding='gptq': the activations carry no signal (H = 0); rounding to nearest")

    # 1. outliers out of the dense part.
    out_mask = select_outliers(w, config.outliers, stats.channel_norm() if stats is not None else None,
                               rule=outlier_rule, bits=config.bits, group_size=g, method=method,
                               col_weight=ctx.col_weight)
    valid = torch.zeros(n, kp, dtype=torch.bool, device=w.device)
    valid[:, :k] = ~out_mask

    # 2. bit classes by measured error (each width quantized once, reused for the chosen split).
    row_align = pack.row_align_for(n)
    cache = {}
    if config.mixed_bits:
        wp = _pad(w, kp)
        if kurtosis_smoothing is not None and stats is not None:
            kurt = kurtosis(smooth_for_ranking(wp, valid, stats.channel_max(), float(kurtosis_smoothing)), valid)
        else:
            if kurtosis_smoothing is not None:
                log.info("kurtosis_smoothing needs activations; ranking by raw kurtosis")
            kurt = kurtosis(wp, valid)
        row_err = {}
        for b in config.mixed_bits:
            cache[b] = quantize(wp, valid, b, g, method, ctx.col_weight)
            row_err[b] = ctx.row_error(((cache[b][3] - wp) * valid)[:, :k])
        hi, n_hi, lo, n_lo, info = choose_split(
            kurt, row_err, k, kp, config.bits, config.mixed_bits, config.effective_avg_bits, row_align)
        class_bits, class_rows, perm = classes_for_split(kurt, config.bits, hi, n_hi, lo, n_lo)
        log.debug("split %s x %s: %s", class_bits, class_rows, info)
    else:
        class_bits, class_rows, perm = [config.bits], [n], None

    # 3-5. dense codes, residual plane and sparse values.
    fit = _fit_dense(w, valid, out_mask, class_bits, class_rows, perm, ctx, cache)
    tensors = fit.tensors

    # 6. low-rank branch from the remaining error.
    if config.rank > 0:
        rank = min(config.rank, n, k)
        if rank < config.rank:
            log.info("rank %d exceeds min(out, in) = %d for a %dx%d layer; using %d",
                     config.rank, rank, n, k, rank)
        fit, (down, up) = _fit_lowrank(w, valid, out_mask, class_bits, class_rows, perm, ctx,
                                       fit, rank, lowrank_iters)
        tensors = fit.tensors
        up = up[perm.long()] if perm is not None else up
        tensors.update(lr_down=down, lr_up=up.contiguous(),
                       lr_scale=torch.ones(rank, dtype=torch.float32, device=w.device))

    if bias is not None:
        tensors["bias"] = bias.detach().float().to(w.device)

    pw = PackedWeight(
        out_features=n, in_features=k, group_size=g, class_bits=class_bits, class_rows=class_rows,
        row_align=row_align, config=recipe.to_dict(), target=resolve_target(config.target),
        tensors={name: t.contiguous() for name, t in tensors.items()},
    )
    return pw.validate()


def _pad(w: torch.Tensor, kp: int) -> torch.Tensor:
    wp = torch.zeros(w.shape[0], kp, device=w.device)
    wp[:, : w.shape[1]] = w
    return wp


def _fit_dense(target, valid, out_mask, class_bits, class_rows, perm, ctx: _Context, cache=None) -> _DenseFit:
    """Codes, scales, residual plane and sparse values for `target` (N, K) under a fixed class
    plan. `cache` may hold {bits: quantize() of all rows} computed in original order."""
    n, k, kp, g, cfg = ctx.n, ctx.k, ctx.k_pad, ctx.config.group_size, ctx.config
    order = perm.long() if perm is not None else None
    wq = _pad(target, kp)
    vq = valid
    if order is not None:
        wq, vq = wq[order], vq[order]
    codes, scales, zeros, what = [], [], [], []
    start = 0
    for b, r in zip(class_bits, class_rows):
        if cache and b in cache:
            rows = order[start:start + r] if order is not None else slice(start, start + r)
            q, s, z, wh = (t[rows] for t in cache[b])
        else:
            q, s, z, wh = quantize(wq[start:start + r], vq[start:start + r], b, g, ctx.method, ctx.col_weight)
        codes.append(q), scales.append(s), zeros.append(z), what.append(wh)
        start += r
    scales, zeros, what = torch.cat(scales), torch.cat(zeros), torch.cat(what)

    tensors = {}
    res_rows = signs = alpha = None
    if cfg.residual:
        refit, signs, alpha, gain = _fit_residual_classes(wq, vq, class_bits, class_rows, codes,
                                                          scales, zeros, what, ctx)
        if cfg.residual is True:
            res_rows = torch.arange(n, device=wq.device)
        else:
            count = max(1, int(math.ceil(float(cfg.residual) * n)))
            res_rows = torch.sort(torch.topk(gain, count).indices).values
        if refit is not None:
            # The refitted dense part goes with its plane: only rows that get a plane adopt it.
            chosen = torch.zeros(n, dtype=torch.bool, device=wq.device)
            chosen[res_rows] = True
            r_codes, r_scales, r_zeros, r_what = refit
            start = 0
            for c, r in enumerate(class_rows):
                codes[c] = torch.where(chosen[start:start + r, None], r_codes[c], codes[c])
                start += r
            scales = torch.where(chosen[:, None], r_scales, scales)
            zeros = torch.where(chosen[:, None], r_zeros, zeros)
            what = torch.where(chosen[:, None], r_what, what)

    compact = None
    if pack.uses_compact_scales(kp // g, cfg.compact_scales):
        # The kernels will see the compact grid's values, so the codes are chosen against them.
        # Snap each group to the row's grids. With nearest rounding, then try the neighbouring
        # grid points (by the nearest-rounding error; measured: 0.94-1.00x the fp16 error where
        # the plain snap gave 1.00-1.13x). GPTQ re-chooses the codes on the grid, and that error
        # is not what the neighbours are scored by: measured, the refined grid did no better
        # under GPTQ (1.02-1.17x vs 0.98-1.19x), so GPTQ takes the plain snap.
        gptq = ctx.rounding == "gptq" and ctx.gptq_factor is not None
        sc, zc, rf = pack.compact_scales(scales, zeros)
        plane = torch.zeros_like(wq)
        if res_rows is not None:
            plane[res_rows] = residual_values(signs[res_rows], alpha[res_rows], g)
        start = 0
        for b, r in zip(class_bits, class_rows) if not gptq else ():
            sl = slice(start, start + r)
            sc[sl], zc[sl] = refine_compact(wq[sl] - plane[sl], vq[sl], b, g, sc[sl], zc[sl], rf[sl],
                                            ctx.col_weight)
            start += r
        compact = (sc, zc, rf)
        scales, zeros = pack.expand_scales(*compact)
        codes, what = _codes_on_grid(wq - plane, class_bits, class_rows, scales, zeros, g)
        if res_rows is not None and not gptq:
            # The plane was fitted to the fp16 dense part: refit it to the snapped one. Signs and α
            # in closed form are the best plane for these codes, so this never adds error.
            # (GPTQ re-chooses the signs itself on the same α.)
            new_signs, new_alpha, _ = fit_residual((wq - what)[res_rows], vq[res_rows], g, ctx.col_weight)
            signs, alpha = signs.clone(), alpha.clone()
            signs[res_rows], alpha[res_rows] = new_signs, new_alpha

    if ctx.rounding == "gptq" and ctx.gptq_factor is not None:
        codes, signs, what = _gptq_codes(wq, vq, class_bits, class_rows, codes, scales, zeros,
                                         res_rows, signs, alpha, ctx)

    if res_rows is not None:
        res_index = torch.full((n,), -1, dtype=torch.int32, device=wq.device)
        res_index[res_rows] = torch.arange(res_rows.numel(), dtype=torch.int32, device=wq.device)
        tensors.update(res_index=res_index, res_plane=pack.pack_signs(signs[res_rows]),
                       res_alpha=alpha[res_rows])
        what = what.clone()
        what[res_rows] += residual_values(signs[res_rows], alpha[res_rows], g)

    tensors["qweight"] = pack.pack_classes(codes, class_bits)
    if compact is not None:
        tensors.update(scale_codes=compact[0], zero_codes=compact[1], scale_rows=compact[2])
    else:
        tensors.update(scales=scales, zeros=zeros)
    if perm is not None:
        tensors["perm"] = perm

    # Back to the original channel order, where the sparse and low-rank branches live.
    if order is not None:
        what_out = torch.empty_like(what)
        what_out[order] = what
    else:
        what_out = what
    approx = what_out[:, :k]
    if bool(out_mask.any()):
        rows_i, cols_i = torch.nonzero(out_mask, as_tuple=True)  # row-major: columns sorted per row
        values = (target - approx)[rows_i, cols_i].to(torch.float16)
        indptr = torch.zeros(n + 1, dtype=torch.int64, device=wq.device)
        indptr[1:] = torch.cumsum(torch.bincount(rows_i, minlength=n), 0)
        tensors.update(sp_indptr=indptr.to(torch.int32), sp_indices=cols_i.to(torch.int32), sp_values=values)
        approx = approx.clone()
        approx[rows_i, cols_i] += values.float()
    return _DenseFit(tensors, approx)


def _codes_on_grid(target, class_bits, class_rows, scales, zeros, g):
    """Nearest codes of `target` (packed order) on a fixed grid, per class, and the dense ŵ."""
    codes, what, start = [], [], 0
    for b, r in zip(class_bits, class_rows):
        sl = slice(start, start + r)
        q = codes_for(group_view(target[sl], g), scales[sl], zeros[sl], b)
        codes.append(q.flatten(1).to(torch.uint8))
        what.append((q * scales[sl].float().unsqueeze(-1) + zeros[sl].float().unsqueeze(-1)).flatten(1))
        start += r
    return codes, torch.cat(what)


def _gptq_codes(wq, vq, class_bits, class_rows, codes, scales, zeros, res_rows, signs, alpha, ctx):
    """Re-choose the codes (and plane signs) of every row on its fixed grid with GPTQ's error
    feedback (gptq.py), all classes in one pass. Only the K real columns take part: padding keeps
    its codes. Outlier entries (not in vq) are exact: zero error, nothing pushed onward.
    Returns (codes per class, signs or None, dense ŵ without the plane) in packed order."""
    k, g = ctx.k, ctx.config.group_size
    qmax = torch.cat([torch.full((r,), float((1 << b) - 1), device=wq.device)
                      for b, r in zip(class_bits, class_rows)])
    plane_alpha = None
    if res_rows is not None:
        plane_alpha = torch.zeros_like(alpha)
        plane_alpha[res_rows] = alpha[res_rows]
    res = gptq_round(wq[:, :k], ctx.gptq_factor, scales, zeros, qmax, g, alpha=plane_alpha,
                     exact=~vq[:, :k], order=ctx.gptq_order)
    full = torch.cat(codes)
    full[:, :k] = res.codes
    if res.signs is not None:
        signs = signs.clone()
        signs[:, :k] = res.signs
    what = (group_view(full.float(), g) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).flatten(1)
    return list(torch.split(full, list(class_rows))), signs, what


def _fit_residual_classes(wq, vq, class_bits, class_rows, codes, scales, zeros, what, ctx):
    """The residual plane for every row: (refit or None, signs, alpha, gain per row).

    With residual_rounds > 0 the dense part is refitted together with the plane, class by class;
    `refit` is then (codes per class, scales, zeros, ŵ) of that joint fit, and gain is measured
    against the plain dense fit (the rows that get no plane keep the plain fit)."""
    g = ctx.config.group_size
    if ctx.residual_rounds == 0:
        return (None,) + tuple(fit_residual(wq - what, vq, g, ctx.col_weight))
    weight = vq.float() * (ctx.col_weight.unsqueeze(0) if ctx.col_weight is not None else 1.0)
    r_codes, r_scales, r_zeros, r_what, signs, alphas, gains = [], [], [], [], [], [], []
    start = 0
    for c, (b, r) in enumerate(zip(class_bits, class_rows)):
        sl = slice(start, start + r)
        base_err = ((wq[sl] - what[sl]).square() * weight[sl]).sum(dim=1)
        q, s, z, sign, alpha, err = refit_with_residual(
            wq[sl], vq[sl], b, g, codes[c], scales[sl], zeros[sl], ctx.col_weight, ctx.residual_rounds)
        r_codes.append(q), r_scales.append(s), r_zeros.append(z)
        r_what.append((group_view(q.float(), g) * s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).flatten(1))
        signs.append(sign), alphas.append(alpha), gains.append(base_err - err)
        start += r
    refit = (r_codes, torch.cat(r_scales), torch.cat(r_zeros), torch.cat(r_what))
    return refit, torch.cat(signs), torch.cat(alphas), torch.cat(gains)


def _fit_lowrank(w, valid, out_mask, class_bits, class_rows, perm, ctx: _Context, fit: _DenseFit,
                 rank: int, iters: int):
    """The low-rank factors (fp16, original order) for the error the dense fit leaves; with
    iters > 1, alternate: requantize W − L, redo the SVD, keep the round with the least error."""
    def factors(dense: _DenseFit):
        down, up = lowrank_from_error(w - dense.approx, rank, ctx.hessian)
        down, up = down.to(torch.float16), up.to(torch.float16)
        err = w - dense.approx - up.float() @ down.float()
        return (down, up), float(ctx.row_error(err).sum())

    best_factors, best_err = factors(fit)
    best_fit = fit
    for _ in range(iters - 1):
        low = best_factors[1].float() @ best_factors[0].float()
        cand = _fit_dense(w - low, valid, out_mask, class_bits, class_rows, perm, ctx)
        # sparse values were fitted to W − L; the approximation of W adds L back later.
        cand_f, cand_err = factors(cand)
        if cand_err < best_err:
            best_fit, best_factors, best_err = cand, cand_f, cand_err
    return best_fit, best_factors
