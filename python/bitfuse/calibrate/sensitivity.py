"""Output sensitivity: how much a squared error in one layer's output moves the model's output.

A small error δ added to layer l's output y_l changes the model output by about J·δ (J = ∂y/∂y_l),
so its cost is ‖J·δ‖² = δᵀ·JᵀJ·δ. Keeping only the diagonal of JᵀJ, summed over the positions
(tokens, pixels, batch rows) of one model call, gives one number per output channel n:

    S_l[n] = Σ_t (JᵀJ)[(t, n), (t, n)],   and   ‖J·δ‖² ≈ Σ_n S_l[n] · mean_t δ[t, n]².

mean_t δ[t, n]² is what calibration already measures for a weight error E: (E·H·Eᵀ)[n, n] with
H = XᵀX / M. The diagonal comes from Hutchinson's estimator: for r ~ N(0, I) over the model
output, g = Jᵀr = ∂(r·y)/∂y_l has E[g²] = diag(JᵀJ). One forward and `probes` backward passes per
batch give every layer's g at once: a zero tensor that requires grad is added to each layer's
output (so no parameter gradient is computed or stored), and autograd.grad returns the gradients
with respect to those zeros.

This is the Fisher-diagonal weighting BRECQ and HAWQ use, measured on the model's own output
instead of a loss: it is what allocate_bits needs to compare layers whose errors live in
different units. docs/CALIBRATION.md records how well it predicted the end-to-end error.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .collect import detached_copy, run_batch

log = logging.getLogger("bitfuse.calibrate")

FilterFn = Callable[[nn.Module, str], bool]


def main_output(out) -> torch.Tensor:
    """The tensor a model call returns: itself, `.sample` (diffusers outputs), or the first
    element of a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a model output of type {type(out).__name__}; "
                    "return a tensor, a tuple starting with one, or an object with .sample")


class _OutputProbes:
    """Forward hooks that add a zero tensor requiring grad to each chosen layer's output."""

    def __init__(self, layers: Dict[str, nn.Module]):
        self.layers = layers
        self.zeros: Dict[str, list] = {}
        self._handles: list = []

    def _hook(self, fqn: str):
        def hook(module, args, out):
            z = torch.zeros_like(out, requires_grad=True)
            self.zeros.setdefault(fqn, []).append(z)
            return out + z
        return hook

    def __enter__(self) -> "_OutputProbes":
        self._handles = [m.register_forward_hook(self._hook(fqn)) for fqn, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _channel_dim(layer: nn.Module, ndim: int) -> int:
    # Conv2d: (N, C, H, W), or (C, H, W) unbatched; Linear: the last dim
    return ndim - 3 if isinstance(layer, nn.Conv2d) else ndim - 1


def output_sensitivity(model: nn.Module, batches: Iterable, *, probes: int = 4, seed: int = 0,
                       filter_fn: Optional[FilterFn] = None,
                       kinds: Tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> Dict[str, torch.Tensor]:
    """{layer fqn: (out_channels,) float32 S} for every layer of `kinds` that `filter_fn` accepts.

    S[n] estimates Σ over one call's positions of the diagonal of JᵀJ (module docstring): the
    model-output squared error per unit of mean squared error in output channel n. Each batch (a
    tensor, a tuple of positional arguments or a dict of keyword arguments, as collect() takes)
    runs forward once and backward `probes` times with Gaussian output directions (seeded); the
    result is the mean over batches and probes. The model's parameters get no gradient. Layers
    a batch does not reach get S = 0. Put the model in eval mode first: with dropout active the
    result is neither seeded nor the deployed model's (a warning says so).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"output_sensitivity expects an nn.Module, got {type(model).__name__}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("output_sensitivity needs autograd: call it outside torch.inference_mode()")
    if model.training:
        log.warning("bitfuse: output_sensitivity on a model in training mode (dropout active); "
                    "call model.eval() first")
    layers = {fqn: m for fqn, m in model.named_modules()
              if isinstance(m, kinds) and (filter_fn is None or filter_fn(m, fqn))}
    sums = {fqn: torch.zeros(m.weight.shape[0], dtype=torch.float64) for fqn, m in layers.items()}
    gen = torch.Generator().manual_seed(seed)
    calls = 0
    with torch.enable_grad(), _OutputProbes(layers) as hooks:
        for batch in batches:
            hooks.zeros.clear()
            # a copy: inference tensors (made under inference_mode) cannot enter autograd
            y = main_output(run_batch(model, detached_copy(batch)))
            names = [fqn for fqn, zs in hooks.zeros.items() for _ in zs]
            zeros = [z for zs in hooks.zeros.values() for z in zs]
            if not zeros:
                calls += 1
                continue
            if not y.requires_grad:
                raise ValueError("the model's output does not depend on any probed layer's output "
                                 "(is it detached, or computed under no_grad inside the model?)")
            for p in range(probes):
                r = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
                grads = torch.autograd.grad((y * r).sum(), zeros, retain_graph=p < probes - 1,
                                            allow_unused=True)
                for fqn, g in zip(names, grads):
                    if g is None:
                        continue
                    cdim = _channel_dim(layers[fqn], g.dim())
                    other = [d for d in range(g.dim()) if d != cdim]
                    sums[fqn] += g.double().square().sum(dim=other).cpu()
            calls += 1
            del y, zeros
    if calls == 0:
        raise ValueError("output_sensitivity got no batches")
    return {fqn: (s / (calls * probes)).float() for fqn, s in sums.items()}
