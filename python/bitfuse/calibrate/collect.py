"""Activation capture: run calibration batches through a model and keep, per nn.Linear, only the
statistics calibration needs (XᵀX and per-channel sums of squares), never the activations."""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn

from .stats import ActivationStats

log = logging.getLogger("bitfuse.calibrate")

FilterFn = Callable[[nn.Module, str], bool]


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


class StatsRecorder:
    """Forward pre-hooks on a model's nn.Linear layers that accumulate ActivationStats; a context
    manager so the hooks are always removed."""

    def __init__(self, model: nn.Module, full: bool = True, filter_fn: Optional[FilterFn] = None,
                 device=None):
        self.model, self.full, self.device = model, full, device
        self.stats: Dict[str, ActivationStats] = {}
        self._layers = [(fqn, m) for fqn, m in model.named_modules()
                        if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, fqn))]
        self._handles = []

    def _hook(self, fqn: str, layer: nn.Linear):
        def pre_hook(module, args):
            x = args[0]
            st = self.stats.get(fqn)
            if st is None:
                dev = self.device if self.device is not None else x.device
                st = self.stats[fqn] = ActivationStats(layer.in_features, full=self.full, device=dev)
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
            log.info("bitfuse: %d linear layer(s) saw no calibration input, e.g. %s", len(unseen), unseen[:3])


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, *, full: bool = True,
            filter_fn: Optional[FilterFn] = None, device=None) -> Dict[str, ActivationStats]:
    """Run `batches` through `model` and return {linear fqn: ActivationStats}.

    Each batch is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    full=False keeps only per-channel sums of squares (K numbers per layer instead of K²).
    The result is what quantize_(model, config, calib_data=...) takes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"collect expects an nn.Module, got {type(model).__name__}")
    with StatsRecorder(model, full=full, filter_fn=filter_fn, device=device) as rec:
        for batch in batches:
            run_batch(model, batch)
    return rec.stats
