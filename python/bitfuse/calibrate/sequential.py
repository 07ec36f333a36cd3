"""Quantize in passes: activation-aware calibration of every layer within a memory bound.

collect() keeps one XᵀX per layer, 8·K² bytes in float64. For the convs of an 860M-parameter UNet
(SD1.5: patches up to 2560·9 = 23040 wide) that is 50 GiB, so one collection cannot hold them
all on a 24 GB machine, and collect(max_full_bytes=…) keeps only the diagonal for the widest
ones, which GPTQ cannot use. quantize_in_passes instead cuts the layers, in model order, into
groups whose XᵀX fit the bound, and for each group collects its statistics (one pass over the
batches), quantizes it, and frees them before the next group.

The order is the order the layers first run in (a dry pass over the first batch records it;
module registration order differs: a diffusers UNet registers its up blocks before its mid
block, and each block's attentions before its resnets). Later groups are collected with the
earlier ones already quantized, so each layer is fitted to the inputs it will see in the
quantized model (GPTQ's own sequential order for LLMs). A layer wider than the bound alone keeps
only the diagonal (rounded to nearest under rounding="gptq", as quantize_ does for layers
without XᵀX) and rides along in whichever pass is open.
"""

from __future__ import annotations

import logging
from typing import Any, List, Mapping, Optional, Sequence

import torch.nn as nn

from ..config import QuantConfig
from .budget import quantizable_layers
from .collect import collect, stats_width, xtx_bytes

log = logging.getLogger("bitfuse.calibrate")


def plan_passes(widths: Mapping[str, int], max_full_bytes: int) -> List[List[str]]:
    """Layers (in the given order) cut into consecutive groups whose XᵀX (8·K² bytes each) fit
    max_full_bytes. A layer that alone exceeds it keeps only the diagonal (K numbers), so it
    joins whichever group is open at no cost instead of taking a pass of its own."""
    if max_full_bytes < 0:
        raise ValueError(f"max_full_bytes must be >= 0, got {max_full_bytes}")
    groups: List[List[str]] = []
    current: List[str] = []
    spent = 0
    for fqn, k in widths.items():
        need = xtx_bytes(k)
        if need > max_full_bytes:
            need = 0
        if current and spent + need > max_full_bytes:
            groups.append(current)
            current, spent = [], 0
        current.append(fqn)
        spent += need
    if current:
        groups.append(current)
    return groups


def run_order(model: nn.Module, layers: Mapping[str, object], batches, collect_fn) -> List[str]:
    """`layers` in the order they first run on the first batch (collect_fn runs it, recording
    nothing); layers it never reaches follow in registration order."""
    mods = dict(model.named_modules())
    seen: List[str] = []

    def hook(fqn):
        def pre(module, args):
            if fqn not in seen_set:
                seen_set.add(fqn)
                seen.append(fqn)
        return pre

    seen_set: set = set()
    handles = [mods[fqn].register_forward_pre_hook(hook(fqn)) for fqn in layers]
    try:
        first = next(iter(batches), None)
        if first is not None:
            collect_fn(model, [first], filter_fn=lambda m, n: False, convs=False, max_full_bytes=None)
    finally:
        for h in handles:
            h.remove()
    return seen + [fqn for fqn in layers if fqn not in seen_set]


def quantize_in_passes(model: nn.Module, config: QuantConfig, batches: Sequence, *,
                       max_full_bytes: int, filter_fn=None, calib_options: Optional[Mapping[str, Any]] = None,
                       progress: Optional[bool] = None, report: Optional[list] = None,
                       collect_fn=None) -> nn.Module:
    """quantize_(model, config, calib_data=…) with the statistics collected in passes of at most
    max_full_bytes of XᵀX (module docstring). `batches` is run once per pass (a list, not a
    generator). collect_fn(model, batches, filter_fn=…, convs=…, max_full_bytes=…) collects a
    group's statistics (default: bitfuse.calibrate.collect; a diffusion model passes
    bitfuse.integrations.diffusers.collect with its timesteps). report: a list extended with
    quantize_'s per-layer rows. Returns the model."""
    from ..api import quantize_  # lazy: api imports calibrate

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_in_passes expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bitfuse.QuantConfig, got {type(config).__name__}")
    if iter(batches) is batches:
        raise TypeError("quantize_in_passes runs the batches once per pass: give a list (or another "
                        f"re-iterable), not a {type(batches).__name__}")
    widths = {fqn: stats_width(m) for fqn, m in quantizable_layers(model, config, filter_fn).items()}
    collect_fn = collect_fn or collect
    order = run_order(model, widths, batches, collect_fn)
    groups = plan_passes({fqn: widths[fqn] for fqn in order}, max_full_bytes)
    if len(groups) > 1:
        log.info("bitfuse: %d layers in %d calibration passes of at most %.2f GiB of XᵀX",
                 len(widths), len(groups), max_full_bytes / 2**30)
    for group in groups:
        members = set(group)

        def keep(m, fqn, members=members):
            return fqn in members

        # a layer alone over the bound keeps only the diagonal (collect's max_full_bytes)
        stats = collect_fn(model, batches, filter_fn=keep, convs=config.convs, max_full_bytes=max_full_bytes)
        opts = dict(calib_options or {})
        if not stats and opts.get("rounding") == "gptq":
            # no layer of the group saw an input: quantize_ would refuse gptq without any data
            log.warning("bitfuse: no calibration input reached %s; rounded to nearest", group[:3])
            opts["rounding"] = "nearest"
        quantize_(model, config, filter_fn=keep, calib_data=stats, calib_options=opts,
                  progress=progress, report=report)
        del stats
    return model
