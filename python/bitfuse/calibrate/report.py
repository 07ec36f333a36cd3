"""Per-layer calibration report: what a layer costs and how far its quantized weight is off."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..format import PackedWeight
from .stats import ActivationStats, as_stats, row_energy


@torch.no_grad()
def layer_report(weight: torch.Tensor, packed: PackedWeight, activations=None,
                 seconds: Optional[float] = None, name: Optional[str] = None) -> dict:
    """A JSON-able dict: shape, classes, mean code bits, bpw, weight error and (with activations,
    raw or ActivationStats) output error, both as MSE and relative to the weight's own energy.

    output_mse is tr(E·H·Eᵀ)/N with H = XᵀX/M: the mean squared output error per output channel
    and calibration row (the diagonal of H only, if the stats kept no more)."""
    w = weight.detach().float().reshape(packed.out_features, -1)
    e = reference.dequantize(packed).to(w.device) - w
    n = w.shape[0]
    bits = sum(b * r for b, r in zip(packed.class_bits, packed.class_rows)) / n
    rep = {
        "name": name, "out_features": n, "in_features": packed.in_features,
        "group_size": packed.group_size,  # the layer's own (QuantConfig.fit_group may lower it)
        "class_bits": list(packed.class_bits), "class_rows": list(packed.class_rows),
        "bits": bits, "bpw": packed.bpw, "rank": packed.rank, "nnz": packed.nnz,
        "residual_rows": packed.n_residual_rows, "target": packed.target,
        "scales": "compact" if packed.compact_scales else "fp16",  # FORMAT.md §5 / §5.1
        "weight_mse": float(e.square().mean()),
        "weight_rel_err": float(e.square().sum() / w.square().sum().clamp_min(1e-30)),
    }
    st: Optional[ActivationStats] = as_stats(activations, packed.in_features, device=w.device)
    if st is not None:
        h, ms = st.hessian(), st.mean_square()
        out_err, out_ref = row_energy(e, h, ms).sum(), row_energy(w, h, ms).sum()
        rep["output_mse"] = float(out_err / n)
        rep["output_rel_err"] = float(out_err / out_ref.clamp_min(1e-30))
    if seconds is not None:
        rep["seconds"] = float(seconds)
    return rep


def write_report(rows: list, path, config=None) -> None:
    """Write per-layer report rows as JSON ({"config": …, "layers": […]}), through a temporary
    file and a rename so an interrupted run never leaves a half-written report."""
    import json
    import os

    path = os.fspath(path)
    doc = {"config": config.to_dict() if config is not None else None, "layers": rows}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
