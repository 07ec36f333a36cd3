"""Sparse outliers (SqueezeLLM's dense-and-sparse split): a few weights are taken out of the
dense part and kept exactly in a sparse fp16 branch.

Which weights? Taking weight (i, j) out removes two errors:
  * its own quantization error, H_jj·(w_ij − Q(w_ij))² of output error (SqueezeLLM's
    sensitivity, with H = XᵀX/M: the weight's column is weighted by its input's mean square);
  * when it is the largest or smallest of its group, the stretch it puts on the group's range,
    which every other weight of the group pays for. That gain depends on the activations of the
    whole group, not on w_ij's own column.

Rules (`rule=`):
  "magnitude"   top |w| (data-free proxy for the range gain);
  "act_norm"    top |w|·RMS(x_j) (the rule issue #5 first asked for; measured worse than
                "magnitude" in most cases, because the range gain does not scale with RMS(x_j));
  "sensitivity" top H_jj·(w_ij − Q(w_ij))² (SqueezeLLM's per-weight term alone; Q = the dense
                quantizer, range search included; blind to the range gain);
  "measured"    by measured error reduction: every group prices dropping its j most extreme
                entries (j in LADDER) by requantizing without them and comparing its
                (activation-weighted) error, own errors of the dropped entries included; the
                weights are then handed out greedily by error removed per weight. Both effects
                above are measured, not guessed.
The default is "measured" when activations are given and "magnitude" data-free (where
"measured" is also available; benchmarks/results/cpu/quality_options.md has the numbers).
"""

from __future__ import annotations

from typing import Optional

import torch

from .rtn import group_view
from .search import quantize

RULES = ("auto", "magnitude", "act_norm", "sensitivity", "measured")
# How many of its most extreme entries a group may give up under the "measured" rule; each level
# costs one requantization of the layer. (Planted outlier channels hold ~4 spikes per group of
# 128; several must go together before the range shrinks.)
LADDER = (1, 2, 3, 4, 6, 8)


def resolve_rule(rule: str, has_activations: bool) -> str:
    if rule not in RULES:
        raise ValueError(f"outlier_rule must be one of {RULES}, got {rule!r}")
    if rule == "auto":
        return "measured" if has_activations else "magnitude"
    return rule


def select_outliers(
    w: torch.Tensor, fraction: float, act_norm: Optional[torch.Tensor] = None, *,
    rule: str = "auto", bits: int = 3, group_size: int = 128, method: str = "search",
    col_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean (N, K) mask of round(fraction·N·K) weights to keep exactly (empty when 0).

    act_norm: per-input-channel RMS (K,) of the activations, or None (data-free).
    rule: see the module docstring; "auto" picks "measured" with activations, else "magnitude".
    bits, group_size, method, col_weight ((k_pad,) per-column error weight, e.g. E[x_j²]) define
    the dense quantizer that "measured" prices candidates with.
    """
    mask = torch.zeros_like(w, dtype=torch.bool)
    count = int(round(fraction * w.numel()))
    if count == 0:
        return mask
    rule = resolve_rule(rule, act_norm is not None)
    if rule == "measured":
        return _select_measured(w, count, bits, group_size, method, col_weight)
    if rule == "sensitivity":
        return _select_measured(w, count, bits, group_size, method, col_weight, ())
    score = w.abs()
    if rule == "act_norm":
        if act_norm is None:
            raise ValueError("outlier_rule='act_norm' needs calibration activations")
        score = score * act_norm.to(score).unsqueeze(0)
    idx = torch.topk(score.flatten(), count).indices
    mask.view(-1)[idx] = True
    return mask


def _errors(wp, keep, bits, g, method, col_weight, cwg):
    """Quantize the `keep` entries of wp (N, k_pad); per-entry weighted squared error (N, G, g)."""
    what = group_view(quantize(wp, keep, bits, g, method, col_weight)[3], g)
    return (group_view(wp, g) - what).square() * cwg * group_view(keep, g).float()


def _fill(mask: torch.Tensor, score: torch.Tensor, count: int) -> torch.Tensor:
    """Add the top-`score` entries not in mask until it holds `count` entries."""
    left = count - int(mask.sum())
    if left > 0:
        score = torch.where(mask, torch.full_like(score, -1.0), score)
        mask.view(-1)[torch.topk(score.flatten(), left).indices] = True
    return mask


def _select_measured(w, count, bits, g, method, col_weight, levels=LADDER):
    """Greedy by measured error reduction (see the module docstring); levels=() gives the
    "sensitivity" rule (each entry's own error under one dense quantization)."""
    n, k = w.shape
    kp = -(-k // g) * g
    wp = torch.zeros(n, kp, device=w.device)
    wp[:, :k] = w
    real = torch.zeros(n, kp, dtype=torch.bool, device=w.device)
    real[:, :k] = True
    cw = torch.ones(kp, device=w.device) if col_weight is None else col_weight.float()
    wg, cwg, rg = group_view(wp, g), group_view(cw.unsqueeze(0), g), group_view(real, g)
    per = _errors(wp, real, bits, g, method, col_weight, cwg)
    if not levels:
        return _fill(torch.zeros_like(w, dtype=torch.bool), per.reshape(n, kp)[:, :k], count)

    # Each group's entries, most extreme first (farthest from the group mean): dropping the
    # first j of them is what shrinks the group's range.
    cnt = rg.float().sum(-1, keepdim=True).clamp_min(1)
    mean = (wg * rg).sum(-1, keepdim=True) / cnt
    dist = torch.where(rg, (wg - mean).abs(), torch.full_like(wg, -1.0))
    order = torch.argsort(dist, dim=-1, descending=True, stable=True)
    levels = [j for j in levels if j < g]
    steps = torch.tensor([0] + levels, device=w.device)
    base = per.sum(-1)
    gain = [torch.zeros_like(base)]
    for j in levels:
        drop = torch.zeros_like(rg).scatter_(-1, order[..., :j], True) & rg
        after = _errors(wp, (rg & ~drop).reshape(n, kp), bits, g, method, col_weight, cwg).sum(-1)
        gain.append(base - after)
    gain = torch.stack(gain, -1)                                      # (rows, G, levels + 1)
    real_cnt = rg.sum(-1)                                             # a group cannot give more than it has
    allowed = steps.view(1, 1, -1) <= real_cnt.unsqueeze(-1)

    # Hand out `count` weights greedily by error removed per weight: each group moves from its
    # current level to the higher level with the best average gain per extra weight (this
    # copes with non-concave gains, e.g. a group with two equal spikes gains nothing from
    # dropping one); a pass moves at most half of what is left, then prices are recomputed.
    cur = torch.zeros_like(base, dtype=torch.long)
    left = count
    neg = torch.tensor(-float("inf"), device=w.device)
    while left > 0:
        g_cur = gain.gather(-1, cur.unsqueeze(-1))
        s_cur = steps[cur].unsqueeze(-1)
        extra = steps.view(1, 1, -1) - s_cur
        ok = allowed & (extra > 0) & (extra <= left)
        dens = torch.where(ok, (gain - g_cur) / extra.clamp_min(1), neg)
        best_d, best_l = dens.max(-1)
        flat_d = best_d.flatten()
        cand = torch.nonzero(flat_d > 0).flatten()
        if cand.numel() == 0:
            break
        cand = cand[torch.argsort(flat_d[cand], descending=True, stable=True)]
        cost = (steps[best_l.flatten()[cand]] - steps[cur.flatten()[cand]])
        cand = cand[torch.cumsum(cost, 0) <= max(int(cost[0]), left // 2)]  # cost[0] <= left
        cur.view(-1)[cand] = best_l.flatten()[cand]
        left = count - int(steps[cur].sum())
    keep_n = steps[cur]                                               # weights dropped per group
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(g, device=w.device).expand_as(order))
    chosen = (rank < keep_n.unsqueeze(-1)) & rg
    # Whatever the gains left unspent (no group gains any more): fill up by magnitude, so the
    # sparse branch holds the fraction the config asked for.
    return _fill(chosen.reshape(n, kp)[:, :k].clone(), w.abs(), count)
