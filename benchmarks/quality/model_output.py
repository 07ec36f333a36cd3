"""The quality benchmark's model-output suites: a UNet's layers quantized at once, its output compared.

The per-layer suites of bench_quality.py sum each layer's output error on its own; here every
quantized layer is in place at once and the error is the UNet's own output (the predicted noise)
on held-out inputs at held-out timesteps, relative to the float UNet's: what a pipeline sees.
Two kinds of suite: linear layers only (the convs, 72% of the weights of both UNets, stay float;
bpw is over the linear layers), and convs too (convs=True: every recipe quantizes the convs as
well, calibrated on their patch statistics, collect(convs=True); bpw is over every quantized
layer, the whole UNet but the few layers too small to quantize).

Calibration: 16 batches of 2 random latents + contexts. Statistics (…diffusers.collect): the
even batches at 4 timesteps spread over [0, 1000) ("fit"), the odd ones at the 3 timesteps
between those ("holdout"); every recipe is quantized with both merged. Output sensitivity
(…diffusers.sensitivity): the first two fit batches at the fit timesteps. Evaluation: two
other batches at timesteps 900, 400, 100, which no step above saw. The layers are those quantize_
takes (every nn.Linear, with convs=True every nn.Conv2d too, at least one group wide and 16
outputs). Quantized weights are substituted into a float
copy of the UNet (what the reference backend computes).

Recipes: RTN and HQQ (if installed) baselines; uniform bitfuse recipes with GPTQ rounding; and
layer-wise allocations (bitfuse.calibrate.price_layers / LayerPrices.allocate) that choose W2 g64,
W3 g128 or W4 g128 per layer under a bpw budget, scored by output sensitivity (fitted on "fit",
scored on "holdout", as allocate_bits(holdout=…) does) or, for comparison, scored on the data
they were fitted to, or by each layer's relative output error.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List

import torch

from bitfuse import QuantConfig, reference
from bitfuse.calibrate import calibrate, price_layers

CANDIDATES = [QuantConfig(bits=2, group_size=64), QuantConfig(bits=3, group_size=128),
              QuantConfig(bits=4, group_size=128)]
CANDIDATE_NAMES = ["W2 g64", "W3 g128", "W4 g128"]
BUDGETS = (3.0, 3.3, 3.6)
CALIB_BATCHES = 16
CALIB_TIMESTEPS = 4
EVAL_TIMESTEPS = (900, 400, 100)


def _relative_error(unet, weights: Dict[str, torch.Tensor], held, ref) -> float:
    q = copy.deepcopy(unet)
    mods = dict(q.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            mods[name].weight.copy_(w.reshape(mods[name].weight.shape))
        outs = [q(*b).sample for b in held]
    return sum(float((a - b).square().sum()) for a, b in zip(outs, ref)) / sum(float(b.square().sum()) for b in ref)


def evaluate_model(width: int = 64, cross_dim: int = 128, sample_size: int = 16, seq: int = 8,
                   hqq_quantizer=None, hqq_dequantize=None, convs: bool = False,
                   compact: bool = False) -> List[dict]:
    """Rows {"recipe", "bpw", "output_rel_err"} for one UNet (tiny_unet's arguments). convs=True
    quantizes the convs too (every recipe; statistics over their patches, collect(convs=True)),
    so bpw is over the whole UNet's quantized layers. compact=True gives the bitfuse recipes
    (search + gptq, allocated) compact scales (FORMAT.md §5.1); the RTN and HQQ baselines keep
    their fp16 scales and offsets."""
    from bitfuse.calibrate import merge_stats
    from bitfuse.integrations.diffusers import (_at_timestep, collect, holdout_timesteps, sensitivity,
                                                tiny_unet, unet_inputs)

    unet = tiny_unet(width=width, cross_dim=cross_dim, sample_size=sample_size)
    batches = [unet_inputs(unet, batch=2, seq=seq, seed=10 + i) for i in range(CALIB_BATCHES)]
    fit = collect(unet, batches[::2], steps=CALIB_TIMESTEPS, convs=convs)
    holdout = collect(unet, batches[1::2], steps=holdout_timesteps(CALIB_TIMESTEPS), convs=convs)
    stats = merge_stats(fit, holdout)
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    sens = sensitivity(unet, batches[::2][:2], steps=CALIB_TIMESTEPS, probes=4,
                       filter_fn=lambda m, n: isinstance(m, kinds))
    candidates = [dataclasses.replace(c, convs=convs, compact_scales=compact) for c in CANDIDATES]
    baselines = [dataclasses.replace(c, convs=convs) for c in CANDIDATES]
    evals = [_at_timestep(unet_inputs(unet, batch=2, seq=seq, seed=s), t, None, None)
             for s in (2, 3) for t in EVAL_TIMESTEPS]
    with torch.no_grad():
        ref = [unet(*b).sample for b in evals]

    gptq = {"rounding": "gptq"}
    # the weights every recipe ends with: fitted on all the calibration data
    prices = price_layers(unet, candidates, calib_data=stats, sensitivity=sens, calib_options=gptq,
                          keep_packed=True, progress=False)
    # the choices: fitted on "fit", scored on "holdout"
    held_prices = price_layers(unet, candidates, calib_data=fit, holdout=holdout, sensitivity=sens,
                               calib_options=gptq, progress=False)
    mods = dict(unet.named_modules())
    names = list(prices.bits)
    numel = sum(prices.weights.values())
    rows = []

    def add(recipe, weights, bits):
        rows.append({"recipe": recipe, "bpw": bits / numel,
                     "output_rel_err": _relative_error(unet, weights, evals, ref)})

    def weight(n):  # a conv's as the (out, C·kh·kw) linear weight it is packed as
        return mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1)

    def add_choice(recipe, chosen):
        idx = {n: candidates.index(c) for n, c in chosen.items()}
        add(recipe, {n: reference.dequantize(prices.packed[n][i]) for n, i in idx.items()},
            sum(prices.bits[n][i] for n, i in idx.items()))

    for cfg, base, label in zip(candidates, baselines, CANDIDATE_NAMES):
        packed = {n: calibrate(weight(n), base, method="rtn") for n in names}
        add(f"RTN {label}", {n: reference.dequantize(p) for n, p in packed.items()},
            sum(p.bpw * prices.weights[n] for n, p in packed.items()))
        if hqq_quantizer is not None and base.bits >= 3:
            hq = {n: hqq_dequantize(hqq_quantizer, weight(n).float(), base.bits, base.group_size)
                  for n in names}
            add(f"HQQ {label}", {n: w for n, (w, _) in hq.items()},
                sum(b * prices.weights[n] for n, (_, b) in hq.items()))
        add_choice(f"search {label} + gptq", {n: cfg for n in names})
    for budget in BUDGETS:
        add_choice(f"allocated ≤{budget} (sensitivity, holdout) + gptq", held_prices.allocate(budget))
    top = BUDGETS[1]
    add_choice(f"allocated ≤{top} (sensitivity, no holdout) + gptq", prices.allocate(top))
    add_choice(f"allocated ≤{top} (layer rel. error, holdout) + gptq",
               held_prices.allocate(top, objective="output_rel"))
    return rows
