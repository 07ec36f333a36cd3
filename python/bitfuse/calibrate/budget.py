"""A global low-rank budget: split a total number of low-rank parameters across layers.

    ranks = allocate_ranks(model, config, avg_rank=16)        # {fqn: rank}
    quantize_with_ranks(model, config, ranks)                  # quantize_ with a rank per layer

Each layer's remaining error after dense quantization, E = W − Q(W), is probed with a few
power iterations of torch.svd_lowrank: its top singular values σ₁ ≥ σ₂ ≥ … say how much error
energy (σⱼ²) the j-th rank of a low-rank branch would remove. A rank costs (out + in) fp16
parameters (its down and up vectors). Ranks are then handed out greedily, one block of
`multiple` ranks at a time, to the layer whose next block removes the most error energy per
parameter; that is the optimal split of a budget for these (concave) gains, and it gives more
rank to the layers whose quantization error is larger and more concentrated.

With calibration statistics (calib_data), the probe measures the error in the output metric
instead: the spectrum of the whitened error E·chol(XᵀX/M + λI), whose σⱼ² is the output error the
j-th rank removes, so ranks follow the error the layer's inputs actually excite.

The probe uses a cheap dense quantization (`method`, default "rtn"), so it is a proxy:
calibrate() fits the branch to the error of its own, final dense part.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .. import pack
from ..config import QuantConfig
from .errors import BudgetError, CalibrationError
from .lowrank import whitening_factor
from .search import quantize
from .stats import ActivationStats, as_stats


def quantizable_layers(model: nn.Module, config, filter_fn=None) -> Dict[str, nn.Module]:
    """{fqn: module} of the layers quantize_ would quantize with `config` (or with every config
    of a sequence of them), in registration order."""
    from ..api import too_small_reason  # lazy: api imports calibrate
    from ..nn import conv_unsupported_reason

    configs = [config] if isinstance(config, QuantConfig) else list(config)
    kinds = (nn.Linear, nn.Conv2d) if all(c.convs for c in configs) else (nn.Linear,)
    out = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, kinds) or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        if any(too_small_reason(m, c) for c in configs):
            continue
        if isinstance(m, nn.Conv2d) and conv_unsupported_reason(m):
            continue
        out[fqn] = m
    return out


def _layers(model_or_layers, config, filter_fn) -> Dict[str, torch.Tensor]:
    """{name: (out, in) fp32 weight} of the layers quantize_ would quantize with `config` (or
    with every config of a sequence of them: the weights are copied once)."""
    if isinstance(model_or_layers, nn.Module):
        return {fqn: m.weight.detach().float().reshape(m.weight.shape[0], -1)
                for fqn, m in quantizable_layers(model_or_layers, config, filter_fn).items()}
    if isinstance(model_or_layers, Mapping):
        out = {}
        for name, w in model_or_layers.items():
            if isinstance(w, nn.Module):
                w = w.weight
            if not isinstance(w, torch.Tensor) or w.dim() < 2:
                raise CalibrationError(f"layer {name!r}: expected a weight tensor or a module with .weight")
            out[name] = w.detach().float().reshape(w.shape[0], -1)
        return out
    raise TypeError("allocate_ranks expects an nn.Module or a mapping {name: weight or module}, "
                    f"got {type(model_or_layers).__name__}")


def check_covers(what: str, data: Optional[Mapping], layers: Mapping) -> None:
    """A per-layer input (calib_data, sensitivity, …) must cover every layer being allocated, or
    be None: scores with and without it are in different units and cannot be ranked together."""
    if data is None:
        return
    missing = sorted(set(layers) - set(data))
    if missing:
        raise ValueError(f"{what} has nothing for {len(missing)} of the {len(layers)} layers being "
                         f"allocated (e.g. {missing[:3]}); give them all, or none, or leave those "
                         "layers out with filter_fn")


def error_spectrum(weight: torch.Tensor, config: QuantConfig, probe_rank: int, *,
                   method: str = "rtn", niter: int = 2, seed: int = 0,
                   activations: Union[None, torch.Tensor, ActivationStats] = None) -> torch.Tensor:
    """Top `probe_rank` singular values of W − Q(W) (Q: dense quantization at config.bits and
    the layer's group size, config.layer_group_size), by torch.svd_lowrank with `niter` power iterations and a fixed seed.

    With activations (a (…, K) tensor or ActivationStats), the spectrum is that of the whitened
    error (W − Q(W))·C, C = chol(H + λI) with H = XᵀX/M shrunk towards mean(diag H)·I by
    K/(M + K) (M calibration rows), so σⱼ² is the output error the j-th rank removes; with only
    the diagonal kept (full=False), C = diag(RMS(x)) shrunk alike. Q ("search") then weighs its
    range search by E[x²] as calibrate does."""
    w = weight.detach().float()
    n, k = w.shape
    stats = as_stats(activations, k, device=w.device)
    g = config.layer_group_size(k)
    kp = pack.padded_k(k, g)
    wp = torch.zeros(n, kp)
    wp[:, :k] = w
    valid = torch.zeros(n, kp, dtype=torch.bool)
    valid[:, :k] = True
    col_weight = None
    if stats is not None:
        col_weight = torch.ones(kp)
        col_weight[:k] = stats.mean_square() + 1e-4 * float(stats.mean_square().mean()) + 1e-30
    e = (w - quantize(wp, valid, config.bits, g, method, col_weight)[3][:, :k])
    if stats is not None:
        # Few calibration rows pin down few directions of XᵀX (2 rows for a time embedding at
        # batch 2): shrink towards mean(diag)·I by K/(M + K), so a layer is not judged on
        # directions its calibration sample never saw. (Measured on the tiny UNet, whose time
        # embeddings see 2 rows: without it the aware allocation was 11% worse than data-free
        # on held-out inputs, with it 10% better; quality_options.md.)
        shrink = k / (stats.count + k)
        ms = stats.mean_square()
        h = stats.hessian()
        if h is not None:
            h = (1 - shrink) * h + shrink * float(ms.mean()) * torch.eye(k, device=h.device)
            c = whitening_factor(h)
        else:
            c = None
        if c is not None:
            e = (e.double() @ c).float()
        else:
            e = e * ((1 - shrink) * ms + shrink * float(ms.mean())).sqrt().unsqueeze(0)
    q = max(1, min(probe_rank, n, k))
    if not bool(e.abs().max() > 0):
        return torch.zeros(q)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if q >= min(n, k) // 2:
            s = torch.linalg.svdvals(e.double()).float()[:q]
        else:
            s = torch.svd_lowrank(e, q=min(q + 8, n, k), niter=niter)[1][:q]
    return s


def allocate_ranks(
    model_or_layers: Union[nn.Module, Mapping[str, Union[torch.Tensor, nn.Module]]],
    config: Optional[QuantConfig] = None,
    *,
    avg_rank: Optional[float] = None,
    total_rank_params: Optional[int] = None,
    max_rank: Optional[int] = None,
    multiple: int = 1,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    method: str = "rtn",
    niter: int = 2,
    seed: int = 0,
    calib_data: Optional[Mapping[str, Union[torch.Tensor, ActivationStats]]] = None,
) -> Dict[str, int]:
    """Per-layer low-rank ranks under a global budget: {layer name: rank} (0 for layers that get
    none). Give exactly one of

    total_rank_params: the number of low-rank parameters in all, Σ rank·(out + in); or
    avg_rank: the budget of giving every layer this rank, avg_rank·Σ(out + in).

    config: the dense recipe whose error is probed (bits, group_size, convs; default
        QuantConfig()). model_or_layers: a model (its layers that quantize_ would quantize, after
        filter_fn) or a mapping {name: weight tensor or module}.
    max_rank: cap per layer (default 4·avg_rank, or 64 with total_rank_params; always ≤
        min(out, in)). multiple: ranks are handed out in blocks of this many (kernels like
        multiples of 16). The result spends at most the budget.
    calib_data: {layer name: activations or ActivationStats} (what quantize_ takes, e.g. from
        bitfuse.calibrate.collect). Then each layer's error is probed in the output metric
        (error_spectrum's whitened spectrum), so ranks go where they remove the most output
        error rather than weight error. It must cover every layer being allocated: output and
        weight errors are in different units and cannot be ranked against each other.
    Apply it with quantize_with_ranks(model, config, ranks) (with the same calib_data, so the
    branch itself is fitted activation-aware too).
    """
    config = config or QuantConfig()
    if (avg_rank is None) == (total_rank_params is None):
        raise ValueError("give exactly one of avg_rank and total_rank_params")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    layers = _layers(model_or_layers, config, filter_fn)
    if not layers:
        return {}
    check_covers("calib_data", calib_data, layers)
    widths = {name: w.shape[0] + w.shape[1] for name, w in layers.items()}
    if avg_rank is not None:
        if not avg_rank >= 0:
            raise ValueError(f"avg_rank must be >= 0, got {avg_rank!r}")
        budget = int(avg_rank * sum(widths.values()))
    else:
        if not (isinstance(total_rank_params, int) and total_rank_params >= 0):
            raise ValueError(f"total_rank_params must be an int >= 0, got {total_rank_params!r}")
        budget = total_rank_params
    if max_rank is None:
        max_rank = max(multiple, int(round(4 * avg_rank))) if avg_rank is not None else 64
    if budget < min(multiple * c for c in widths.values()) and budget > 0:
        raise BudgetError(f"a rank budget of {budget} parameters cannot buy one block of {multiple} "
                          f"rank(s) in any layer; the cheapest costs {min(widths.values()) * multiple}")

    ranks = {name: 0 for name in layers}
    caps = {}
    heap = []
    gains = {}
    for name, w in layers.items():
        caps[name] = (min(max_rank, *w.shape) // multiple) * multiple
        if caps[name] == 0 or budget == 0:
            continue
        s = error_spectrum(w, config, caps[name], method=method, niter=niter, seed=seed,
                           activations=None if calib_data is None else calib_data[name])
        energy = s.double().square()
        # gain of each block of `multiple` ranks, in order
        n_blocks = caps[name] // multiple
        g = torch.zeros(n_blocks, dtype=torch.float64)
        g[: (energy.numel() + multiple - 1) // multiple].index_add_(
            0, torch.arange(energy.numel()) // multiple, energy)
        gains[name] = g.tolist()
        cost = widths[name] * multiple
        if gains[name][0] > 0:
            heapq.heappush(heap, (-gains[name][0] / cost, name))
    spent = 0
    while heap:
        neg, name = heapq.heappop(heap)
        cost = widths[name] * multiple
        if spent + cost > budget:
            continue  # this layer's blocks no longer fit; cheaper layers may
        spent += cost
        ranks[name] += multiple
        nxt = ranks[name] // multiple
        if ranks[name] < caps[name] and gains[name][nxt] > 0:
            heapq.heappush(heap, (-gains[name][nxt] / cost, name))
    return ranks


def rank_params(ranks: Mapping[str, int], model_or_layers, config: Optional[QuantConfig] = None) -> int:
    """Σ rank·(out + in) of an allocation: the low-rank parameters it costs."""
    layers = _layers(model_or_layers, config or QuantConfig(convs=True), None)
    return sum(r * (layers[n].shape[0] + layers[n].shape[1]) for n, r in ranks.items() if r)


def quantize_with_ranks(model: nn.Module, config: QuantConfig, ranks: Mapping[str, int], *,
                        filter_fn=None, calib_data=None, report=None, **kwargs) -> nn.Module:
    """quantize_ with a per-layer rank (config.rank for layers not in `ranks`): quantize_per_layer
    with config's rank replaced. Other keyword arguments (calib_options, progress) go to quantize_;
    report may be a list or a path (written once, at the end)."""
    from .allocate import quantize_per_layer  # allocate imports this module

    kinds = (nn.Linear, nn.Conv2d) if config.convs else (nn.Linear,)
    names = {fqn for fqn, m in model.named_modules() if isinstance(m, kinds)}
    unknown = sorted(set(ranks) - names)
    if unknown:
        raise ValueError(f"ranks names layers that are not quantizable layers of this model: {unknown[:5]}")
    configs = {fqn: dataclasses.replace(config, rank=int(r)) for fqn, r in ranks.items()}
    return quantize_per_layer(model, configs, config, filter_fn=filter_fn, calib_data=calib_data,
                              report=report, **kwargs)
