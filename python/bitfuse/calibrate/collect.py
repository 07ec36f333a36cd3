"""Activation capture: run calibration batches through a model and keep, per nn.Linear (and, on
request, per nn.Conv2d), only the statistics calibration needs (XᵀX and per-channel sums of
squares), never the activations.

A conv's "inputs" are its patches: F.unfold's (C·kh·kw) vectors, in the order of
weight.reshape(O, −1), which is the K order QuantConv2d packs (nn/conv.py). Its XᵀX is
(C·kh·kw)² float64: 4.2 GB for one 2560-channel 3×3 conv of SD1.5, so a byte budget
(max_full_bytes) decides which layers keep the full matrix and which only its diagonal."""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stats import ActivationStats

log = logging.getLogger("bitfuse.calibrate")

FilterFn = Callable[[nn.Module, str], bool]
PATCH_BYTES = 256 * 2**20  # unfolded conv patches held at once (a whole batch when it fits)


class ModelCall(NamedTuple):
    """A recorded model call: positional and keyword arguments together."""
    args: tuple
    kwargs: dict


def detached_copy(v):
    """A copy of a batch (tensors, tuples/lists, dicts, ModelCalls) with every tensor detached
    and cloned: safe to keep after the call, and usable with autograd even if it was made under
    torch.inference_mode."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, ModelCall):
        return ModelCall(detached_copy(v.args), detached_copy(v.kwargs))
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # other named tuples
        return type(v)(*(detached_copy(x) for x in v))
    if isinstance(v, (tuple, list)):
        return type(v)(detached_copy(x) for x in v)
    if isinstance(v, dict):
        return {k: detached_copy(x) for k, x in v.items()}
    return v


def run_batch(model: nn.Module, batch):
    """Call the model the way the batch says: a ModelCall as recorded, a dict as keyword
    arguments, a tuple/list as positional arguments, anything else as the one argument."""
    if isinstance(batch, ModelCall):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def stats_width(layer: nn.Module) -> int:
    """The width of a layer's statistics: in_features, or C·kh·kw for a conv's patches."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) -> (B, L, C·kh·kw): the patches the conv multiplies by
    weight.reshape(O, −1), in that K order."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2)


def xtx_bytes(width: int) -> int:
    """Bytes of one layer's XᵀX (float64, width²)."""
    return 8 * width * width


def full_layers(widths: Dict[str, int], max_full_bytes: Optional[int]) -> set:
    """The layers that keep the full XᵀX (8·K² bytes, float64) within max_full_bytes (None: all):
    narrowest first, so the budget covers as many layers as it can; the others keep only the
    diagonal (their rounding falls back to nearest under rounding="gptq")."""
    if max_full_bytes is None:
        return set(widths)
    if max_full_bytes < 0:
        raise ValueError(f"max_full_bytes must be >= 0 or None, got {max_full_bytes}")
    keep, spent = set(), 0
    for fqn, k in sorted(widths.items(), key=lambda kv: (kv[1], kv[0])):
        if spent + xtx_bytes(k) > max_full_bytes:
            break
        keep.add(fqn)
        spent += xtx_bytes(k)
    return keep


class StatsRecorder:
    """Forward pre-hooks on a model's nn.Linear layers (and nn.Conv2d layers QuantConv2d can take,
    with convs=True) that accumulate ActivationStats; a context manager so the hooks are always
    removed. full=True keeps XᵀX for every layer, or for those max_full_bytes covers
    (full_layers); the rest keep the diagonal."""

    def __init__(self, model: nn.Module, full: bool = True, filter_fn: Optional[FilterFn] = None,
                 device=None, convs: bool = False, max_full_bytes: Optional[int] = None):
        from ..nn.conv import conv_unsupported_reason  # lazy: nn imports calibrate

        self.model, self.device = model, device
        self.stats: Dict[str, ActivationStats] = {}

        def wanted(m, fqn):
            if isinstance(m, nn.Conv2d):
                if not convs or conv_unsupported_reason(m):
                    return False
            elif not isinstance(m, nn.Linear):
                return False
            return filter_fn is None or filter_fn(m, fqn)

        self._layers = [(fqn, m) for fqn, m in model.named_modules() if wanted(m, fqn)]
        widths = {fqn: stats_width(m) for fqn, m in self._layers}
        self._full = full_layers(widths, max_full_bytes) if full else set()
        if full and len(self._full) < len(widths):
            log.info("bitfuse: max_full_bytes=%s keeps XᵀX for %d of %d layers; the widest keep only "
                     "the diagonal, e.g. %s", max_full_bytes, len(self._full), len(widths),
                     sorted(set(widths) - self._full, key=lambda f: -widths[f])[:3])
        self._handles = []

    def _hook(self, fqn: str, layer: nn.Module):
        width = stats_width(layer)
        is_conv = isinstance(layer, nn.Conv2d)

        def pre_hook(module, args):
            x = args[0]
            st = self.stats.get(fqn)
            if st is None:
                dev = self.device if self.device is not None else x.device
                st = self.stats[fqn] = ActivationStats(width, full=fqn in self._full, device=dev)
            if is_conv:
                # the patches are kh·kw times the input's size: unfold as many samples at a time
                # as PATCH_BYTES holds (at least one)
                xb = x if x.dim() == 4 else x.unsqueeze(0)
                per_sample = max(1, xb[0].numel() * layer.kernel_size[0] * layer.kernel_size[1] * 4)
                step = max(1, PATCH_BYTES // per_sample)
                for i in range(0, xb.shape[0], step):
                    st.update(conv_patches(layer, xb[i:i + step]))
            else:
                st.update(x)
        return pre_hook

    def __enter__(self) -> "StatsRecorder":
        self._handles = [m.register_forward_pre_hook(self._hook(fqn, m)) for fqn, m in self._layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        unseen = [fqn for fqn, _ in self._layers if fqn not in self.stats]
        if unseen:
            log.info("bitfuse: %d layer(s) saw no calibration input, e.g. %s", len(unseen), unseen[:3])


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, *, full: bool = True,
            filter_fn: Optional[FilterFn] = None, device=None, convs: bool = False,
            max_full_bytes: Optional[int] = None) -> Dict[str, ActivationStats]:
    """Run `batches` through `model` and return {layer fqn: ActivationStats}.

    Each batch is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    Layers: every nn.Linear, and with convs=True every nn.Conv2d QuantConv2d can take (their
    statistics are over patches, C·kh·kw wide). full=False keeps only per-channel sums of
    squares (K numbers per layer instead of K²); max_full_bytes bounds the XᵀX kept (8·K² bytes
    a layer; narrowest layers first, the rest keep the diagonal). The result is what
    quantize_(model, config, calib_data=...) takes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"collect expects an nn.Module, got {type(model).__name__}")
    with StatsRecorder(model, full=full, filter_fn=filter_fn, device=device, convs=convs,
                       max_full_bytes=max_full_bytes) as rec:
        for batch in batches:
            run_batch(model, batch)
    return rec.stats
