"""quantize_: swap a model's nn.Linear layers for QuantLinear in place (torchao's shape of API)."""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Union

import torch.nn as nn

from .calibrate import calibrate
from .calibrate.report import layer_report, write_report
from .calibrate.collect import stats_width
from .calibrate.stats import gptq_fallback
from .config import QuantConfig
from .nn import QuantConv2d, QuantEmbedding, QuantLinear, conv_unsupported_reason, embedding_unsupported_reason

log = logging.getLogger("bitfuse")

FilterFn = Callable[[nn.Module, str], bool]


def _in_out(layer: nn.Module):
    if isinstance(layer, nn.Embedding):  # a table is (rows, dim): K = dim, N = rows
        return layer.embedding_dim, layer.num_embeddings
    return stats_width(layer), layer.weight.shape[0]  # a conv's K is its patch width, C·kh·kw


def too_small_reason(layer: nn.Module, config: QuantConfig) -> Optional[str]:
    """Why a layer is not worth quantizing, or None if it is.

    A layer narrower than one group (the layer's own, config.layer_group_size) would be mostly
    padding; one with fewer than 16 outputs cannot fill a kernel tile and its weight is too small
    for the memory saved to matter. (For a conv, "inputs" are the C·kh·kw values of a patch.)
    """
    k, n = _in_out(layer)
    g = config.layer_group_size(k)
    if k < g:
        return f"in_features={k} < group_size={g}"
    if n < 16:
        return f"out_features={n} < 16"
    return None


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_calib_options(calib_options: Optional[Mapping[str, Any]]) -> dict:
    """calib_options as a dict, refused with the keys calibrate() takes if one is unknown."""
    calib_options = dict(calib_options or {})
    allowed = [p.name for p in inspect.signature(calibrate).parameters.values() if p.kind is p.KEYWORD_ONLY]
    bad = sorted(set(calib_options) - set(allowed))
    if bad:
        raise ValueError(f"calib_options has unknown keys {bad}; calibrate() takes {allowed}")
    return calib_options


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Optional[FilterFn] = None,
    calib_data: Optional[Mapping[str, "object"]] = None,
    *,
    calib_options: Optional[Mapping[str, Any]] = None,
    progress: Optional[bool] = None,
    report: Union[None, list, str, os.PathLike] = None,
) -> nn.Module:
    """Replace every nn.Linear of `model` (and nn.Conv2d with config.convs) that
    `filter_fn(module, fqn)` accepts, in place.

    calib_data, if given, maps a layer's fully qualified name to its calibration activations
    (a tensor whose last dim is the layer's in_features, or the ActivationStats that
    bitfuse.calibrate.collect() returns). Layers too small to gain are skipped with a log line.
    calib_options are keyword arguments for calibrate(): method ("search" | "rtn"),
    residual_rounds, lowrank_iters, outlier_rule ("auto" | "magnitude" | "act_norm" |
    "sensitivity" | "measured"), kurtosis_smoothing (None or SmoothQuant's α; needs
    activations) and rounding ("nearest" | "gptq": GPTQ error-feedback rounding on the same
    grid, same bpw; needs calib_data with the full XᵀX: layers calib_data does not cover are
    rounded to nearest with a warning, no calib_data at all is an error), gptq_order ("act",
    the default, or "natural": the sweep's column order); docs/CALIBRATION.md
    says what each was measured to do. progress: a tqdm bar over layers (None: only on a terminal). report: a list
    to append one dict per quantized layer to (bits, bpw, weight/output error, seconds), or a
    path to write them to as JSON. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bitfuse.QuantConfig, got {type(config).__name__}")
    calib_data = dict(calib_data or {})
    calib_options = check_calib_options(calib_options)
    kinds = (nn.Linear,) + ((nn.Conv2d,) if config.convs else ()) + ((nn.Embedding,) if config.embeddings else ())
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, kinds)]
    unknown = set(calib_data) - {fqn for fqn, _ in layers}
    if unknown:
        raise ValueError(f"calib_data names layers that are not quantizable layers of this model: {sorted(unknown)[:5]}")
    done = skipped = 0
    rows = []
    no_data = []  # layers rounded to nearest for want of activations under rounding="gptq"
    for fqn, layer in _progress(layers, progress):
        if filter_fn is not None and not filter_fn(layer, fqn):
            continue
        why = too_small_reason(layer, config)
        if why:
            log.info("bitfuse: skipping %s (%s): too small to gain", fqn, why)
            skipped += 1
            continue
        if isinstance(layer, (nn.Conv2d, nn.Embedding)):
            why = (conv_unsupported_reason if isinstance(layer, nn.Conv2d) else embedding_unsupported_reason)(layer)
            if why:
                log.info("bitfuse: skipping %s: %s", fqn, why)
                skipped += 1
                continue
        opts = calib_options
        if calib_data and not isinstance(layer, nn.Embedding):
            # GPTQ needs the layer's XᵀX; with calibration data for other layers (e.g. linears
            # collected, convs not, or a conv whose XᵀX collect's max_full_bytes left out), this
            # one is rounded to nearest and the run says so below.
            opts = gptq_fallback(calib_options, calib_data.get(fqn))
            if opts is not calib_options:
                no_data.append(fqn)
        start = time.perf_counter()
        if isinstance(layer, nn.Embedding):  # weights only: a lookup has no activations
            q = QuantEmbedding.from_embedding(layer, config, **opts)
        elif isinstance(layer, nn.Conv2d):
            q = QuantConv2d.from_conv(layer, config, activations=calib_data.get(fqn), **opts)
        else:
            q = QuantLinear.from_linear(layer, config, activations=calib_data.get(fqn), **opts)
        seconds = time.perf_counter() - start
        if report is not None:
            rows.append(layer_report(layer.weight.detach(), q.packed, calib_data.get(fqn), seconds, fqn))
        _set_child(model, fqn, q.to(layer.weight.device))
        done += 1
    log.info("bitfuse: quantized %d layers, skipped %d", done, skipped)
    if no_data:
        log.warning("bitfuse: rounding='gptq' needs a layer's XᵀX; %d layer(s) without it in "
                    "calib_data were rounded to nearest: %s%s", len(no_data), ", ".join(no_data[:5]),
                    " …" if len(no_data) > 5 else "")
    if isinstance(report, list):
        report.extend(rows)
    elif report is not None:
        write_report(rows, report, config)
    return model


def _progress(items, enabled: Optional[bool]):
    """A tqdm bar over the layers (tqdm decides for None: shown only on a terminal)."""
    if enabled is False:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="bitfuse quantize", unit="layer", disable=None if enabled is None else False)
