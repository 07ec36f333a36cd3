"""Quality at equal bits: output error vs effective bits per weight, RTN vs HQQ vs bitfuse recipes.

    python benchmarks/quality/bench_quality.py [--quick] [--out benchmarks/results/cpu]

Layers: heavy-tailed synthetic layers (Student-t weights with planted outlier channels) fed with
correlated activations that have outlier input channels (bitfuse.synthetic), and the linear
layers of a tiny diffusers UNet fed with its own captured activations; without --quick also a
UNet at SD1.5's widths (first two levels, 80M parameters, random weights). Calibration statistics
come from one sample of activations; the output error is measured on a held-out sample from the
same distribution: relative output error ‖(Ŵ−W)x‖² / ‖Wx‖², summed over layers.
HQQ (hqq.core.quantize.Quantizer, data-free) is added at 2/3/4 bits g64/g128 when the package is
installed; the script says "HQQ not installed" and runs without it otherwise. Recipes ending in
"+ gptq" round with GPTQ's error feedback (calibrate(rounding="gptq")) on the same grid.
Writes quality.json, quality.md and quality.png. CPU only; a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch

import bitfuse
from bitfuse import QuantConfig, reference
from bitfuse.calibrate import calibrate
from bitfuse.synthetic import correlated_activations, heavy_tailed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_output import evaluate_model  # noqa: E402

MODEL_SUITE = "{} (model output)"

# (name, config kwargs, calibrate kwargs, uses activations)
RTN = [(f"RTN W{b} g{g}", dict(bits=b, group_size=g), dict(method="rtn"), False)
       for b in (2, 3, 4) for g in (64, 128)]
BITFUSE = [
    ("search W3 g128 (data-free)", dict(bits=3, group_size=128), {}, False),
    ("search W3 g128", dict(bits=3, group_size=128), {}, True),
    ("mixed W3 g128", dict(bits=3, group_size=128, mixed_bits=(2, 3, 4)), {}, True),
    ("mixed+residual(25%) W3 g128", dict(bits=3, group_size=128, mixed_bits=(2, 3, 4), residual=0.25), {}, True),
    ("mixed+outliers W3 g128", dict(bits=3, group_size=128, mixed_bits=(2, 3, 4), outliers=0.001), {}, True),
    ("mixed+lowrank(r4) W3 g128", dict(bits=3, group_size=128, mixed_bits=(2, 3, 4), rank=4), {}, True),
    ("all W3 g128", dict(bits=3, group_size=128, mixed_bits=(2, 3, 4), residual=0.1, outliers=0.001, rank=4), {}, True),
    ("W2 g64 + residual(25%)", dict(bits=2, group_size=64, residual=0.25), {}, True),
    ("all W2 g64", dict(bits=2, group_size=64, mixed_bits=(2, 3), avg_bits=2.2, residual=0.25, rank=4), {}, True),
]
# The same grids with GPTQ's error-feedback rounding (calibrate(rounding="gptq"): same bpw, only
# the codes and residual signs change).
GPTQ = [(f"{name} + gptq", cfg, dict(kw, rounding="gptq"), True) for name, cfg, kw, uses_act in BITFUSE
        if name in ("search W3 g128", "mixed+outliers W3 g128", "all W3 g128", "W2 g64 + residual(25%)",
                    "all W2 g64")]
# Compact scales (FORMAT.md §5.1: 16 bits a group + 48 a row, in layers of >= 4 groups a row):
# the same grids in fewer bits, and the finer groups those bits buy.
COMPACT = [
    ("search W3 g128 + compact", dict(bits=3, group_size=128, compact_scales=True), {}, True),
    ("search W3 g64 + compact", dict(bits=3, group_size=64, compact_scales=True), {}, True),
    ("search W3 g64 + compact + gptq", dict(bits=3, group_size=64, compact_scales=True),
     dict(rounding="gptq"), True),
]


HQQ_VERSION = "0.2.8.post1"


def hqq_quantizer():
    """HQQ's core quantizer (hqq.core.quantize.Quantizer), or None when the package is absent.

    HQQ is not a bitfuse dependency, and not in the `bench` extra: its sdist pulls accelerate and
    transformers, and its setup.py shells out to build CUDA kernels unless DISABLE_CUDA=1. Install
    it by hand: DISABLE_CUDA=1 pip install hqq==0.2.8.post1."""
    try:
        from hqq.core.quantize import Quantizer
    except Exception:  # noqa: BLE001 - any import failure means "no HQQ baseline"
        return None
    return Quantizer


def hqq_dequantize(quantizer, w: torch.Tensor, bits: int, group_size: int):
    """HQQ-quantized weight and its effective bpw, counted as bitfuse counts its own.

    HQQ's half-quadratic solver (its default, optimize=True) fits each group's zero point with a
    proximal L_p (p = 0.7) objective on the weights alone, data-free. Groups run along the input
    dimension (axis=1), as bitfuse's do. Scale and zero are then rounded to fp16, the precision
    HQQLinear stores them in, so the dequantized weight is what an fp16 deployment would see.
    The group is the one bitfuse would use for this K (QuantConfig.layer_group_size: a smaller
    group where that stores fewer bits), so both pay the same padding. K is padded to a multiple
    of the group by repeating the row's first columns (padding with zeros would pull the
    zero-point fit towards 0), and the padded codes are counted, exactly as bitfuse counts its
    own padding: bpw = (bits·k_pad + 32·k_pad/g) / K (code bits + fp16 scale + fp16 zero per
    group)."""
    n, k = w.shape
    group_size = QuantConfig(bits=bits, group_size=group_size).layer_group_size(k)
    kp = -(-k // group_size) * group_size
    wp = w if kp == k else torch.cat([w, w.repeat(1, -(-kp // k))[:, : kp - k]], dim=1)
    q, meta = quantizer.quantize(wp.float().contiguous(), nbits=bits, group_size=group_size, axis=1,
                                 optimize=True, bitpack=False, device="cpu")
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    what = ((q.float() - zero) * scale).reshape(n, kp)[:, :k]
    bpw = (bits * kp + 32 * kp // group_size) / k
    return what, bpw


def synthetic_layers(quick: bool):
    shapes = [(512, 1024), (1024, 512)] if quick else [(512, 1024), (1024, 1024), (1024, 512), (2048, 1024)]
    for i, (n, k) in enumerate(shapes):
        w = heavy_tailed(n, k, seed=10 + i, outlier_channels=max(4, n // 64))
        yield f"synthetic{n}x{k}", w, correlated_activations(4 * k, k, seed=i), \
            correlated_activations(2 * k, k, seed=i, sample_seed=1)


def unet_layers(width: int = 64, cross_dim: int = 128, sample_size: int = 16, seq: int = 8):
    """A UNet's linear layers with activations captured from two different inputs: the tiny UNet
    (width 64), or with width=320, cross_dim=768 one at SD1.5's widths (its first two levels,
    K = 320…2560, random weights like the tiny one)."""
    from bitfuse.integrations.diffusers import tiny_unet, unet_inputs

    unet = tiny_unet(width=width, cross_dim=cross_dim, sample_size=sample_size)
    acts: Dict[str, List[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: acts.setdefault(n, []).append(inp[0].detach()))
             for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features >= 64]
    with torch.no_grad():
        for seed in (1, 2):
            unet(*unet_inputs(unet, batch=2, seq=seq, seed=seed))
    for h in hooks:
        h.remove()
    for n, m in unet.named_modules():
        if n in acts and len(acts[n]) == 2:
            calib, held = (a.reshape(-1, m.in_features) for a in acts[n])
            yield f"unet.{n}", m.weight.detach().clone(), calib, held


def hqq_recipes(quantizer):
    """HQQ 2/3/4-bit at g64 and g128 (data-free, like RTN), or [] when HQQ is not installed."""
    if quantizer is None:
        return []
    return [(f"HQQ W{b} g{g}", dict(bits=b, group_size=g), HQQ, False) for b in (2, 3, 4) for g in (64, 128)]


HQQ = "hqq"  # marks a recipe quantized by HQQ instead of bitfuse.calibrate


def evaluate(layers, recipes, quantizer=None) -> List[dict]:
    out = []
    totals = {name: [0.0, 0.0, 0.0, 0.0] for name, *_ in recipes}  # err, ref, bits, weights
    for lname, w, calib, held in layers:
        ref = (held @ w.t()).square().sum()
        for name, cfg, kw, uses_act in recipes:
            if kw == HQQ:
                what, bpw = hqq_dequantize(quantizer, w, cfg["bits"], cfg["group_size"])
            else:
                pw = calibrate(w, QuantConfig(**cfg), activations=calib if uses_act else None, **kw)
                what, bpw = reference.dequantize(pw), pw.bpw
            err = (held @ (what - w).t()).square().sum()
            t = totals[name]
            t[0] += float(err)
            t[1] += float(ref)
            t[2] += bpw * w.numel()
            t[3] += w.numel()
    for name, (err, ref, bits, n) in totals.items():
        out.append({"recipe": name, "bpw": bits / n, "output_rel_err": err / ref})
    return out


def baseline(name: str) -> bool:
    return name.startswith(("RTN", "HQQ"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = p.parse_args(argv)
    quantizer = hqq_quantizer()
    if quantizer is None:
        print("HQQ not installed: no HQQ baseline (DISABLE_CUDA=1 pip install hqq==%s)" % HQQ_VERSION)
        hqq_env = "not installed"
    else:
        import importlib.metadata as md
        hqq_env = f"hqq {md.version('hqq')} (data-free half-quadratic solver, fp16 scale and zero)"
    recipes = RTN + hqq_recipes(quantizer) + BITFUSE + GPTQ + COMPACT
    t0 = time.perf_counter()
    suites = {"synthetic": evaluate(list(synthetic_layers(args.quick)), recipes, quantizer),
              "tiny-unet": evaluate(list(unet_layers()), recipes, quantizer)}
    if not args.quick:
        # SD1.5 widths: K = 320…2560 instead of 64…512, 32×32 latents (2048 calibration rows at
        # the first level), CLIP-sized context; what the tiny UNet's small layers hide.
        suites["unet-sd-widths"] = evaluate(list(unet_layers(320, 768, 32, 77)), recipes, quantizer)
    # Every linear layer of a UNet quantized at once, its own output compared (model_output.py).
    suites[MODEL_SUITE.format("tiny-unet")] = evaluate_model(hqq_quantizer=quantizer, hqq_dequantize=hqq_dequantize)
    if not args.quick:
        suites[MODEL_SUITE.format("unet-sd-widths")] = evaluate_model(
            320, 768, 32, 77, hqq_quantizer=quantizer, hqq_dequantize=hqq_dequantize)
        # The whole tiny UNet, convs too (their patch statistics). Not at SD1.5 widths: there the
        # convs' XᵀX (up to 11520 wide) took 20 s per calibration call against 1.2 s for the
        # linears alone, 56 calls here (docs/CALIBRATION.md).
        suites[MODEL_SUITE.format("tiny-unet, convs too")] = evaluate_model(
            hqq_quantizer=quantizer, hqq_dequantize=hqq_dequantize, convs=True)
        # The same, the bitfuse recipes with compact scales (the baselines keep fp16 pairs).
        suites[MODEL_SUITE.format("tiny-unet, convs too, compact scales")] = evaluate_model(
            hqq_quantizer=quantizer, hqq_dequantize=hqq_dequantize, convs=True, compact=True)
    suites[MODEL_SUITE.format("tiny-unet, compact scales")] = evaluate_model(
        hqq_quantizer=quantizer, hqq_dequantize=hqq_dequantize, compact=True)
    env = {"bitfuse": bitfuse.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": "cpu", "seconds": time.perf_counter() - t0, "hqq": hqq_env}
    verdict = {}
    for suite, rows in suites.items():
        rtn4 = next(r for r in rows if r["recipe"] == "RTN W4 g128")
        hqq4 = next((r for r in rows if r["recipe"] == "HQQ W4 g128"), None)
        best = min((r for r in rows if r["bpw"] <= 3.3 and not baseline(r["recipe"])),
                   key=lambda r: r["output_rel_err"], default=None)
        verdict[suite] = {"rtn_w4g128": rtn4, "hqq_w4g128": hqq4, "best_at_most_3.3bpw": best,
                          "target_met": bool(best and best["output_rel_err"] <= rtn4["output_rel_err"]),
                          "beats_hqq_w4g128": None if hqq4 is None or best is None
                          else bool(best["output_rel_err"] <= hqq4["output_rel_err"])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"environment": env, "suites": suites, "target": verdict}, f, indent=1)
    lines = ["# Output error vs effective bits per weight", "",
             f"bitfuse {env['bitfuse']}, torch {env['torch']}, CPU, {env['seconds']:.0f} s. bpw counts "
             f"everything (docs/FORMAT.md §10). HQQ: {env['hqq']}.", "",
             "- Per-layer suites (synthetic, tiny-unet, unet-sd-widths): each layer quantized alone; relative "
             "output error ‖(Ŵ−W)x‖² / ‖Wx‖² on held-out activations, summed over the suite's layers.",
             "- Model-output suites (… (model output)): every linear layer quantized at once (the convs, 72% of "
             "the weights, stay float; bpw is over the linear layers), or, in \"convs too\", every linear and "
             "conv layer (bpw over all of them); relative error of the "
             "UNet's output on held-out inputs and timesteps (benchmarks/quality/model_output.py). "
             "\"allocated ≤b\" chooses W2 g64 / W3 g128 / W4 g128 per layer under a b bpw budget "
             "(bitfuse.calibrate.allocate_bits).",
             "- \"compact scales\" suites and \"+ compact\" recipes: the bitfuse recipes store 8-bit scale and "
             "offset codes on per-row grids (docs/FORMAT.md §5.1; 16 bits a group + 48 a row where a row has "
             "at least 4 groups); the RTN and HQQ baselines keep fp16 scales and offsets.", ""]
    for suite, rows in suites.items():
        v = verdict[suite]
        lines += [f"## {suite}", "", "| recipe | bpw | output rel. error |", "|---|---|---|"]
        lines += [f"| {r['recipe']} | {r['bpw']:.3f} | {r['output_rel_err']:.5f} |" for r in sorted(rows, key=lambda r: r["bpw"])]
        if v["best_at_most_3.3bpw"]:
            lines += ["", f"Target (best bitfuse recipe at ≤ 3.3 bpw has output error ≤ RTN W4 g128): "
                          f"**{'met' if v['target_met'] else 'NOT met'}**: {v['best_at_most_3.3bpw']['recipe']} "
                          f"{v['best_at_most_3.3bpw']['output_rel_err']:.5f} at {v['best_at_most_3.3bpw']['bpw']:.3f} bpw "
                          f"vs {v['rtn_w4g128']['output_rel_err']:.5f} at {v['rtn_w4g128']['bpw']:.3f} bpw."]
            if v["hqq_w4g128"]:
                h = v["hqq_w4g128"]
                lines += ["", f"Against HQQ W4 g128 ({h['output_rel_err']:.5f} at {h['bpw']:.3f} bpw): "
                              f"**{'lower' if v['beats_hqq_w4g128'] else 'NOT lower'}**."]
            lines += [""]
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4.5), squeeze=False)
        for ax, (suite, rows) in zip(axes[0], suites.items()):
            # baselines as curves over bits (one per method and group size), bitfuse recipes as points
            for method, color in (("RTN", "gray"), ("HQQ", "C3")):
                for g, style in ((64, "--"), (128, "-")):
                    pts = sorted((r["bpw"], r["output_rel_err"]) for r in rows
                                 if r["recipe"].startswith(method) and r["recipe"].endswith(f"g{g}"))
                    if pts:
                        ax.plot(*zip(*pts), style, marker="x", color=color, label=f"{method} g{g}")
            for r in rows:
                if not baseline(r["recipe"]):
                    ax.scatter(r["bpw"], r["output_rel_err"], marker="o", color="C0")
                    ax.annotate(r["recipe"], (r["bpw"], r["output_rel_err"]), fontsize=6)
            ax.legend(fontsize=7)
            ax.set_yscale("log")
            ax.set_xlabel("effective bits per weight")
            ax.set_ylabel("relative output error (held-out)")
            ax.set_title(suite)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "quality.png"), dpi=120)
    except ImportError:
        print("matplotlib is not installed: no PNG")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
