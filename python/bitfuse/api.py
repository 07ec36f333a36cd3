"""quantize_: swap a model's nn.Linear layers for QuantLinear in place (torchao's shape of API)."""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional

import torch.nn as nn

from .config import QuantConfig
from .nn import QuantLinear

log = logging.getLogger("bitfuse")

FilterFn = Callable[[nn.Module, str], bool]


def too_small_reason(linear: nn.Linear, config: QuantConfig) -> Optional[str]:
    """Why a layer is not worth quantizing, or None if it is.

    A layer narrower than one group would be mostly padding; one with fewer than 16 outputs
    cannot fill a kernel tile and its weight is too small for the memory saved to matter.
    """
    if linear.in_features < config.group_size:
        return f"in_features={linear.in_features} < group_size={config.group_size}"
    if linear.out_features < 16:
        return f"out_features={linear.out_features} < 16"
    return None


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Optional[FilterFn] = None,
    calib_data: Optional[Mapping[str, "object"]] = None,
) -> nn.Module:
    """Replace every nn.Linear of `model` (that `filter_fn(module, fqn)` accepts) in place.

    calib_data, if given, maps a layer's fully qualified name to its calibration activations
    (a tensor whose last dim is the layer's in_features). Layers too small to gain are skipped
    with a log line. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bitfuse.QuantConfig, got {type(config).__name__}")
    calib_data = dict(calib_data or {})
    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = set(calib_data) - {fqn for fqn, _ in linears}
    if unknown:
        raise ValueError(f"calib_data names layers that are not nn.Linear in this model: {sorted(unknown)[:5]}")
    done = skipped = 0
    for fqn, lin in linears:
        if filter_fn is not None and not filter_fn(lin, fqn):
            continue
        why = too_small_reason(lin, config)
        if why:
            log.info("bitfuse: skipping %s (%s): too small to gain", fqn, why)
            skipped += 1
            continue
        q = QuantLinear.from_linear(lin, config, activations=calib_data.get(fqn))
        _set_child(model, fqn, q.to(lin.weight.device))
        done += 1
    log.info("bitfuse: quantized %d linear layers, skipped %d", done, skipped)
    return model
