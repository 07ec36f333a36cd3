"""Layer-wise bit allocation: choose one recipe per layer under a bpw budget over the allocated layers.

    fit, held = collect(model, batches[::2]), collect(model, batches[1::2])
    configs = allocate_bits(model, [QuantConfig(bits=2, group_size=64), QuantConfig(bits=3),
                                    QuantConfig(bits=4)], avg_bpw=3.3,
                            calib_data=fit, holdout=held,
                            sensitivity=output_sensitivity(model, batches[:2]),
                            calib_options={"rounding": "gptq"})
    quantize_per_layer(model, configs, calib_data=merge_stats(fit, held),
                       calib_options={"rounding": "gptq"})

Layers differ in how much their quantization error hurts: on a UNet, some layers' errors are
amplified on the way to the output and others are damped, and GPTQ removes much more error where
the layer's inputs are strongly correlated. One uniform recipe spends the same bits on all of
them. Here every layer is calibrated with every candidate, each result is priced (real bpw,
everything counted: docs/FORMAT.md §10) and scored, and the budget goes where it removes the
most error per bit.

The score of a layer's candidate (lower is better), by what is given:
- sensitivity (output_sensitivity) and calib_data: Σ_n S[n]·(E·H·Eᵀ)[n, n], the predicted
  squared error of the model's output (E the weight error, H = XᵀX/M). Errors of different layers
  are then in the same units and add up.
- calib_data alone: the layer's relative output error tr(E·H·Eᵀ) / tr(W·H·Wᵀ), every layer
  counted alike;
- neither: the relative weight error ‖E‖² / ‖W‖².

H is calib_data's unless `holdout` statistics are given: then candidates are fitted on calib_data
and scored on holdout. That matters with GPTQ rounding, which fits the codes to the calibration
inputs: a layer whose inputs span few directions (a UNet's time-embedding layers see one row per
timestep) scores 15-100x lower on its own calibration data than at other timesteps (tiny UNet,
docs/CALIBRATION.md), and is given the cheapest width. Hold out other inputs at other
timesteps, and quantize with both sets merged (merge_stats).

The choice is a multiple-choice knapsack, solved by dynamic programming over the budget
(solve_knapsack): exact up to rounding each layer's cost up to 1/65536 of the budget left after
every layer's cheapest candidate. (A greedy along each layer's convex hull can lose badly when
layers differ 100x in size, as a UNet's do: the one upgrade it cannot afford may be the one
that matters.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import reference
from ..config import QuantConfig
from ..format import PackedWeight
from .budget import _layers, check_covers
from .core import calibrate
from .errors import BudgetError, CalibrationError
from .stats import as_stats, gptq_fallback, row_energy

log = logging.getLogger("bitfuse.calibrate")


def _scores(w: torch.Tensor, e: torch.Tensor, metric, sens: Optional[torch.Tensor]) -> Dict[str, float]:
    """The candidate's score under every objective its inputs allow (OBJECTIVES). metric: None
    (no statistics) or the scoring statistics' (H or None, diag H), converted once per layer."""
    out = {"weight_rel": float(e.square().sum() / w.square().sum().clamp_min(1e-30))}
    if metric is None:
        return out
    row_err, row_ref = row_energy(e, *metric), row_energy(w, *metric)
    out["output_rel"] = float(row_err.sum() / row_ref.sum().clamp_min(1e-30))
    if sens is not None:
        out["sensitivity"] = float((sens.to(row_err) * row_err).sum())
    return out


DP_UNITS = 1 << 16  # the upgrade budget's resolution in the knapsack below


def solve_knapsack(bits: Sequence[Sequence[float]], scores: Sequence[Sequence[float]],
                   budget: float) -> List[int]:
    """One candidate index per layer minimising Σ score subject to Σ bits ≤ budget (the
    multiple-choice knapsack), by dynamic programming over the upgrade budget: budget − Σ of
    every layer's cheapest candidate, cut into DP_UNITS units. Each upgrade's cost is rounded up
    to whole units, so the result always fits the real budget; the rounding can forgo at most
    one unit (1/65536 of the upgrade budget) per layer, and a last pass spends what it left on
    the best single-layer switches that fit. Raises BudgetError (with the reachable minimum)
    when the cheapest candidates already exceed the budget."""
    base = [min(range(len(b)), key=lambda i: (b[i], s[i])) for b, s in zip(bits, scores)]
    floor = sum(b[i] for b, i in zip(bits, base))
    if floor > budget * (1 + 1e-12):
        raise BudgetError(floor)
    slack = budget - floor
    if slack <= 0:
        # only candidates as cheap as the cheapest: the best of those per layer
        return [min((i for i in range(len(b)) if b[i] <= b[j]), key=lambda i: s[i])
                for b, s, j in zip(bits, scores, base)]
    unit = slack / DP_UNITS
    best = np.zeros(DP_UNITS + 1)  # best[u]: least total score of the layers so far within u units
    choices, costs = [], []
    for b, s, j in zip(bits, scores, base):
        cost = [max(0, math.ceil((bi - b[j]) / unit - 1e-9)) for bi in b]
        new = np.full(DP_UNITS + 1, np.inf)
        pick = np.zeros(DP_UNITS + 1, dtype=np.int16)
        for i, (c, si) in enumerate(zip(cost, s)):
            if c > DP_UNITS:
                continue
            cand = np.full(DP_UNITS + 1, np.inf)
            cand[c:] = best[: DP_UNITS + 1 - c] + si
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        best = new
        choices.append(pick)
        costs.append(cost)
    out, u = [], DP_UNITS
    for pick, cost in zip(reversed(choices), reversed(costs)):
        i = int(pick[u])
        out.append(i)
        u -= cost[i]
    out.reverse()
    # What the rounding left: take the best single-layer switch that fits the real budget, while
    # there is one (an exact fit, e.g., that the rounded costs just missed).
    spent = sum(b[i] for b, i in zip(bits, out))
    while True:
        gain, move = 0.0, None
        for layer, (b, s) in enumerate(zip(bits, scores)):
            cur = out[layer]
            for i in range(len(b)):
                if s[cur] - s[i] > gain and spent - b[cur] + b[i] <= budget * (1 + 1e-12):
                    gain, move = s[cur] - s[i], (layer, i)
        if move is None:
            return out
        layer, i = move
        spent += bits[layer][i] - bits[layer][out[layer]]
        out[layer] = i


def _check_avg_bpw(avg_bpw) -> None:
    if isinstance(avg_bpw, bool) or not isinstance(avg_bpw, numbers.Real) or not avg_bpw > 0 \
            or not math.isfinite(avg_bpw):
        raise ValueError(f"avg_bpw must be a positive number, got {avg_bpw!r}")


OBJECTIVES = {
    "sensitivity": "predicted model-output squared error, Σ_n S[n]·(E·H·Eᵀ)[n, n]",
    "output_rel": "relative output error tr(E·H·Eᵀ) / tr(W·H·Wᵀ)",
    "weight_rel": "relative weight error ‖E‖² / ‖W‖²",
}


@dataclass
class LayerPrices:
    """Every allocated layer calibrated with every candidate: its cost in bits and its score.

    allocate(avg_bpw) chooses without calibrating again, so sweeping budgets (or objectives:
    by_objective holds every one the inputs allow) is cheap. With keep_packed, packed[name][i]
    is the layer's PackedWeight for candidate i."""

    candidates: List[QuantConfig]
    weights: Dict[str, int]            # number of weights per layer
    bits: Dict[str, List[float]]       # total bits per candidate (bpw · weights)
    objective: str                     # the default objective: the first of OBJECTIVES available
    by_objective: Dict[str, Dict[str, List[float]]]  # objective -> layer -> score per candidate
    packed: Optional[Dict[str, List[PackedWeight]]] = None

    @property
    def scores(self) -> Dict[str, List[float]]:
        """Score per layer and candidate under the default objective (lower is better)."""
        return self.by_objective[self.objective]

    def min_bpw(self) -> float:
        """The cheapest allocation's bpw: every layer at its cheapest candidate."""
        return sum(min(b) for b in self.bits.values()) / max(1, sum(self.weights.values()))

    def allocate(self, avg_bpw: float, objective: Optional[str] = None) -> Dict[str, QuantConfig]:
        """{layer: candidate} spending at most avg_bpw on average, with the least total score
        under `objective` (default: self.objective); solve_knapsack says how. BudgetError names
        the reachable minimum."""
        _check_avg_bpw(avg_bpw)
        scores = self._objective(objective)
        total = sum(self.weights.values())
        names = list(self.bits)
        try:
            picks = solve_knapsack([self.bits[n] for n in names], [scores[n] for n in names],
                                   avg_bpw * total)
        except BudgetError as e:
            raise BudgetError(f"avg_bpw={avg_bpw} cannot be met: the cheapest candidate of every layer "
                              f"already costs {e.args[0] / total:.4f} bpw (the reachable minimum)") from None
        return {n: self.candidates[i] for n, i in zip(names, picks)}

    def _objective(self, objective: Optional[str]) -> Dict[str, List[float]]:
        objective = objective or self.objective
        if objective not in self.by_objective:
            raise ValueError(f"objective {objective!r} is not available here: these prices have "
                             f"{sorted(self.by_objective)} (sensitivity needs sensitivity= and calib_data=, "
                             "output_rel needs calib_data=)")
        return self.by_objective[objective]

    def _index(self, configs: Mapping[str, QuantConfig]) -> Dict[str, int]:
        out = {}
        for n, c in configs.items():
            if n in self.bits:
                if c not in self.candidates:
                    raise ValueError(f"configs[{n!r}] = {c} is not one of these prices' candidates "
                                     f"{self.candidates}")
                out[n] = self.candidates.index(c)
        return out

    def bpw(self, configs: Mapping[str, QuantConfig]) -> float:
        """The average bpw of an allocation over the layers it covers."""
        idx = self._index(configs)
        return sum(self.bits[n][i] for n, i in idx.items()) / max(1, sum(self.weights[n] for n in idx))

    def score(self, configs: Mapping[str, QuantConfig], objective: Optional[str] = None) -> float:
        """The allocation's total score (for "sensitivity": the predicted output error)."""
        scores = self._objective(objective)
        return sum(scores[n][i] for n, i in self._index(configs).items())

    def rows(self, configs: Optional[Mapping[str, QuantConfig]] = None) -> List[dict]:
        """One JSON-able dict per (layer, candidate): name, candidate, weights, bpw, score (the
        default objective's), one key per objective, and chosen (whether `configs` picked it)."""
        idx = self._index(configs or {})
        return [{"name": n, "candidate": i, "weights": self.weights[n], "bpw": b / self.weights[n],
                 "score": self.scores[n][i], **{o: v[n][i] for o, v in self.by_objective.items()},
                 "chosen": idx.get(n) == i}
                for n in self.bits for i, b in enumerate(self.bits[n])]


def _layer_stats(what: str, data: Optional[Mapping], name: str, w: torch.Tensor):
    """data[name] as ActivationStats on w's device, or None; errors name the layer."""
    if data is None:
        return None
    try:
        return as_stats(data[name], w.shape[1], device=w.device)
    except CalibrationError as e:
        raise CalibrationError(f"{what}[{name!r}]: {e}") from None


def price_layers(model_or_layers, candidates: Sequence[QuantConfig], *,
                 calib_data: Optional[Mapping] = None, sensitivity: Optional[Mapping] = None,
                 holdout: Optional[Mapping] = None, calib_options: Optional[Mapping] = None, filter_fn=None,
                 progress: Optional[bool] = None, keep_packed: bool = False) -> LayerPrices:
    """Calibrate every layer with every candidate and price it (allocate_bits' first half; the
    arguments are allocate_bits'). keep_packed keeps the PackedWeights (memory: one packed
    copy of the model per candidate)."""
    from ..api import _progress, check_calib_options  # lazy: api imports calibrate

    candidates = list(candidates)
    if not candidates or not all(isinstance(c, QuantConfig) for c in candidates):
        raise TypeError("candidates must be a non-empty sequence of bitfuse.QuantConfig")
    opts = check_calib_options(calib_options)
    for attr in ("convs", "target"):
        if len({getattr(c, attr) for c in candidates}) > 1:
            raise ValueError(f"candidates must agree on QuantConfig.{attr}, got "
                             f"{[getattr(c, attr) for c in candidates]}")
    if sensitivity is not None and calib_data is None:
        raise ValueError("sensitivity weighs each output channel's error, which needs the layers' "
                         "activations: give calib_data too")
    layers = _layers(model_or_layers, candidates, filter_fn)
    if holdout is not None and calib_data is None:
        raise ValueError("holdout statistics score candidates fitted on calib_data: give calib_data too")
    for what, data in (("calib_data", calib_data), ("sensitivity", sensitivity), ("holdout", holdout)):
        check_covers(what, data, layers)
    if sensitivity is not None:
        for n, w in layers.items():
            s = sensitivity[n]
            if not isinstance(s, torch.Tensor) or s.shape != (w.shape[0],):
                raise ValueError(f"sensitivity[{n!r}] must be a ({w.shape[0]},) tensor, got "
                                 f"{getattr(s, 'shape', type(s).__name__)}")
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise ValueError(f"sensitivity[{n!r}] holds negative or non-finite values")
    available = [o for o, given in (("sensitivity", sensitivity), ("output_rel", calib_data),
                                    ("weight_rel", True)) if given is not None]

    prices = LayerPrices(candidates, {}, {}, available[0], {o: {} for o in available},
                         {} if keep_packed else None)
    nearest = []  # layers priced with nearest rounding: their stats lack XᵀX (gptq_fallback)
    for name in _progress(list(layers), progress):
        w = layers[name]
        stats = _layer_stats("calib_data", calib_data, name, w)
        scoring = stats if holdout is None else _layer_stats("holdout", holdout, name, w)
        metric = None if scoring is None else (scoring.hessian(), scoring.mean_square())
        sens = None if sensitivity is None else sensitivity[name]
        prices.weights[name] = w.numel()
        prices.bits[name] = []
        # without any calib_data, calibrate() itself refuses gptq (as quantize_ does)
        layer_opts = gptq_fallback(opts, stats) if calib_data is not None else opts
        if layer_opts is not opts:
            nearest.append(name)
        for cfg in candidates:
            pw = calibrate(w, cfg, activations=stats, **layer_opts)
            e = reference.dequantize(pw).to(w.device, torch.float32) - w
            prices.bits[name].append(pw.bpw * w.numel())
            for o, v in _scores(w, e, metric, sens).items():
                prices.by_objective[o].setdefault(name, []).append(v)
            if keep_packed:
                prices.packed.setdefault(name, []).append(pw)
    if nearest:
        log.warning("bitfuse: rounding='gptq' needs a layer's XᵀX; %d layer(s) whose calib_data kept "
                    "only the diagonal were priced with nearest rounding, e.g. %s", len(nearest), nearest[:3])
    return prices


def allocate_bits(model_or_layers, candidates: Sequence[QuantConfig], avg_bpw: float, *,
                  calib_data: Optional[Mapping] = None, sensitivity: Optional[Mapping] = None,
                  holdout: Optional[Mapping] = None, calib_options: Optional[Mapping] = None, filter_fn=None,
                  progress: Optional[bool] = None, report: Optional[list] = None) -> Dict[str, QuantConfig]:
    """{layer fqn: the candidate QuantConfig it gets}, spending at most `avg_bpw` bits per
    weight on average over the allocated layers (real bpw of each calibrated layer, weighted by
    its number of weights).

    model_or_layers: an nn.Module (the layers quantize_ would quantize with these candidates) or
        a mapping {name: weight or module}.
    candidates: QuantConfigs to choose from (same `convs` and `target`); a layer some candidate
        finds too small to quantize is left out.
    calib_data: {fqn: activations or ActivationStats} covering every allocated layer, or None.
    sensitivity: {fqn: (out_channels,) S} from output_sensitivity (needs calib_data), or None.
        The module docstring says what each combination scores.
    holdout: {fqn: activations or ActivationStats} of other inputs, covering every allocated
        layer: candidates are fitted on calib_data and scored on these (module docstring).
    calib_options: keyword arguments for calibrate() (e.g. rounding="gptq"), as quantize_ takes.
    report: a list to extend with LayerPrices.rows: one dict per (layer, candidate).

    Every layer is calibrated once per candidate (price_layers), so this costs len(candidates)
    calibrations per layer; quantize_per_layer then calibrates the chosen one again. To try
    several budgets, call price_layers once and LayerPrices.allocate per budget. Raises
    BudgetError (with the reachable minimum) when even the cheapest candidate of every layer
    exceeds avg_bpw.
    """
    _check_avg_bpw(avg_bpw)
    prices = price_layers(model_or_layers, candidates, calib_data=calib_data, sensitivity=sensitivity,
                          holdout=holdout,
                          calib_options=calib_options, filter_fn=filter_fn, progress=progress)
    chosen = prices.allocate(avg_bpw)
    if report is not None:
        report.extend(prices.rows(chosen))
    return chosen


def quantize_per_layer(model: nn.Module, configs: Mapping[str, QuantConfig],
                       default: Optional[QuantConfig] = None, *, filter_fn=None, calib_data=None,
                       report=None, **kwargs) -> nn.Module:
    """quantize_ with a QuantConfig per layer: one quantize_ pass per distinct config, over the
    layers that get it. Layers not in `configs` get `default` (None: they stay float). Other
    keyword arguments (calib_options, progress) go to quantize_; report may be a list or a path
    (written once, at the end)."""
    from ..api import quantize_  # lazy: api imports calibrate
    from .report import write_report

    for name, cfg in configs.items():
        if not isinstance(cfg, QuantConfig):
            raise TypeError(f"configs[{name!r}] must be a bitfuse.QuantConfig, got {type(cfg).__name__}")
    calib_data = dict(calib_data or {})
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    unknown = sorted(set(configs) - set(layers))
    if unknown:
        raise ValueError(f"configs names layers that are not nn.Linear/nn.Conv2d layers of this model: {unknown[:5]}")
    by_config: Dict[QuantConfig, set] = {}
    for fqn, m in layers.items():
        cfg = configs.get(fqn)
        if cfg is None and default is not None and (default.convs or isinstance(m, nn.Linear)):
            cfg = default
        if cfg is not None:
            by_config.setdefault(cfg, set()).add(fqn)
    rows: list = []
    options = dict(kwargs.pop("calib_options", None) or {})
    for cfg, members in by_config.items():
        def keep(m, fqn, members=members):
            return fqn in members and (filter_fn is None or filter_fn(m, fqn))

        share = {k: v for k, v in calib_data.items() if k in members}
        opts = options
        if calib_data and not share and options.get("rounding") == "gptq":
            # quantize_ rounds the layers calib_data does not cover to nearest, with a warning;
            # a group none of whose layers it covers (e.g. convs, collected without convs=True)
            # would look to quantize_ like a run without calibration data at all.
            log.warning("bitfuse: %d layer(s) without calibration statistics are rounded to nearest, "
                        "not GPTQ, e.g. %s", len(members), sorted(members)[:3])
            opts = dict(options, rounding="nearest")
        # convs=True only widens quantize_'s search; `keep` decides (a conv named in configs
        # is quantized whatever its config's convs flag says).
        quantize_(model, dataclasses.replace(cfg, convs=True), filter_fn=keep, calib_data=share,
                  calib_options=opts, report=rows if report is not None else None, **kwargs)
    if isinstance(report, list):
        report.extend(rows)
    elif report is not None:
        write_report(rows, report, default)
    return model
