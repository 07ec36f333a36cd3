"""Which calibration options pay off: outlier rules, kurtosis smoothing, activation-aware ranks.

    python benchmarks/quality/bench_calib_options.py [--quick] [--out benchmarks/results/cpu]

Same layers and metric as bench_quality.py: the synthetic suite (heavy-tailed weights, correlated
activations with outlier input channels) and the tiny UNet's linears with their own captured
activations; statistics from one sample, relative output error ‖(Ŵ−W)x‖²/‖Wx‖² on a held-out
sample, summed over the suite's layers.

  1. outlier_rule: magnitude / act_norm / sensitivity / measured (calibrate's outlier_rule=),
     with activations, plus magnitude and measured data-free; seconds per rule over the suite.
  2. kurtosis_smoothing: the chosen mixed-precision split's error for α ∈ {none, 0 … 1}.
  3. allocate_ranks: data-free vs activation-aware (calib_data=; probe method "rtn", the
     default, and "search") at the same rank budget; each layer then calibrated with its rank
     and its activations.
Writes quality_options.json and quality_options.md. CPU; tens of minutes on a loaded 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quality as bq  # noqa: E402  (same layers as the quality benchmark)

import bitfuse  # noqa: E402
from bitfuse import QuantConfig, reference  # noqa: E402
from bitfuse.calibrate import ActivationStats, allocate_ranks, calibrate  # noqa: E402

OUTLIER_CFGS = {
    "W3 g128, 0.1%": dict(bits=3, group_size=128, outliers=0.001),
    "W3 g128, 0.5%": dict(bits=3, group_size=128, outliers=0.005),
    "W2 g64, 0.5%": dict(bits=2, group_size=64, outliers=0.005),
    "W4 g128, 0.2%": dict(bits=4, group_size=128, outliers=0.002),
}
OUTLIER_RULES = [("magnitude", True), ("act_norm", True), ("sensitivity", True), ("measured", True),
                 ("magnitude", False), ("measured", False)]
MIXED_CFGS = {
    "W3 g128 (2,3,4)": dict(bits=3, group_size=128, mixed_bits=(2, 3, 4)),
    "W3 g128 (3,4) avg 3.25": dict(bits=3, group_size=128, mixed_bits=(3, 4), avg_bits=3.25),
    "W2 g64 (2,3) avg 2.2": dict(bits=2, group_size=64, mixed_bits=(2, 3), avg_bits=2.2),
}
ALPHAS = [None, 0.0, 0.25, 0.5, 0.75, 1.0]
AVG_RANKS = [4, 8]


def rel_error(layers, make):
    """Σ held-out output error / Σ reference output energy; make(w, calib) -> PackedWeight."""
    err = ref = 0.0
    for _, w, calib, held in layers:
        pw = make(w, calib)
        err += float((held @ (reference.dequantize(pw) - w).t()).square().sum())
        ref += float((held @ w.t()).square().sum())
    return err / ref


def outlier_rules(layers):
    rows = []
    for cname, cfg in OUTLIER_CFGS.items():
        row = {"config": cname}
        for rule, aware in OUTLIER_RULES:
            t0 = time.perf_counter()
            e = rel_error(layers, lambda w, c: calibrate(w, QuantConfig(**cfg), activations=c if aware else None,
                                                        outlier_rule=rule))
            key = rule if aware else f"{rule} (data-free)"
            row[key] = e
            row[key + " s"] = time.perf_counter() - t0
        row["none"] = rel_error(layers, lambda w, c: calibrate(w, QuantConfig(**{**cfg, "outliers": 0.0}),
                                                              activations=c))
        rows.append(row)
    return rows


def smoothing(layers):
    rows = []
    for cname, cfg in MIXED_CFGS.items():
        row = {"config": cname}
        uni = {k: v for k, v in cfg.items() if k not in ("mixed_bits", "avg_bits")}
        row["uniform"] = rel_error(layers, lambda w, c: calibrate(w, QuantConfig(**uni), activations=c))
        for a in ALPHAS:
            row[f"alpha={a}"] = rel_error(layers, lambda w, c: calibrate(w, QuantConfig(**cfg), activations=c,
                                                                         kurtosis_smoothing=a))
        rows.append(row)
    return rows


def rank_allocation(layers):
    weights = {name: w for name, w, _, _ in layers}
    stats = {name: ActivationStats.from_tensor(c, w.shape[1]) for name, w, c, _ in layers}
    cfg = QuantConfig(bits=3, group_size=64)
    rows = []
    for avg in AVG_RANKS:
        row = {"avg_rank": avg}
        for label, calib, method in (("data-free", None, "rtn"), ("activation-aware", stats, "rtn"),
                                     ("activation-aware, search probe", stats, "search")):
            ranks = allocate_ranks(weights, cfg, avg_rank=avg, calib_data=calib, method=method)
            by_name = {name: (w, c, h) for name, w, c, h in layers}
            err = ref = 0.0
            for name, (w, c, h) in by_name.items():
                pw = calibrate(w, QuantConfig(bits=3, group_size=64, rank=ranks[name]), activations=c)
                err += float((h @ (reference.dequantize(pw) - w).t()).square().sum())
                ref += float((h @ w.t()).square().sum())
            row[label] = err / ref
            row[label + " ranks"] = ranks
        rows.append(row)
    return rows


def table(rows, keys, first, fmt="{:.5f}"):
    lines = ["| " + " | ".join([first] + keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in rows:
        cells = [str(r[first])] + [fmt.format(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_md(env, res, path):
    lines = ["# Calibration options: measured effect on held-out output error", "",
             f"bitfuse {env['bitfuse']}, torch {env['torch']}, CPU ({env['threads']} threads, shared machine: "
             f"seconds are upper bounds), {env['seconds']:.0f} s in all. Relative output error on held-out "
             "activations, summed over the suite's layers (benchmarks/quality/bench_calib_options.py).", ""]
    okeys = [r if a else f"{r} (data-free)" for r, a in OUTLIER_RULES]
    for suite, r in res.items():
        lines += [f"## {suite}", "", "### outlier_rule", ""]
        lines += table(r["outlier_rules"], ["none"] + okeys, "config")
        lines += ["", "Seconds over the suite per rule (calibration included):", ""]
        lines += table(r["outlier_rules"], [k + " s" for k in okeys], "config", "{:.2f}")
        lines += ["", "### kurtosis_smoothing (mixed-precision ranking; α = None is raw kurtosis)", ""]
        lines += table(r["kurtosis_smoothing"], ["uniform"] + [f"alpha={a}" for a in ALPHAS], "config")
        lines += ["", "### allocate_ranks: data-free vs activation-aware (W3 g64)", ""]
        lines += table(r["rank_allocation"], ["data-free", "activation-aware", "activation-aware, search probe"],
                       "avg_rank")
        lines += [""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    suites = {"synthetic": list(bq.synthetic_layers(args.quick)), "tiny-unet": list(bq.unet_layers())}
    res = {}
    for suite, layers in suites.items():
        res[suite] = {"outlier_rules": outlier_rules(layers), "kurtosis_smoothing": smoothing(layers),
                      "rank_allocation": rank_allocation(layers)}
        print(suite, json.dumps(res[suite], indent=1), flush=True)
    env = {"bitfuse": bitfuse.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": "cpu", "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
           "seconds": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality_options.json"), "w") as f:
        json.dump({"environment": env, "suites": res}, f, indent=1)
    write_md(env, res, os.path.join(args.out, "quality_options.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
