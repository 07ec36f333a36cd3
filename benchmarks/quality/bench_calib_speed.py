"""Calibration speed: the data-free recipe on the SD1.5 UNet config (860M parameters, random weights).

    python benchmarks/quality/bench_calib_speed.py [--threads 2] [--convs] [--limit N]
                                                   [--recipe w4|mixed|mixed-aware] [--append]
                                                   [--out benchmarks/results/cpu]

Builds bitfuse.e2e.build_denoiser("sd15-unet") (fp32, CPU), runs
quantize_(unet, QuantConfig(bits=4, group_size=64)) (and, with --convs, a second run on a fresh
model with convs=True), and records total seconds, seconds per layer type (summed from the
per-layer report: nn.Linear / nn.Conv2d, and by role: attention projections, feed-forward,
time embedding, ...), and peak RSS (resource.getrusage, whole process, so it includes the fp32
model itself). Writes calib_speed.json and calib_speed.md. Issue 5's target: <= 5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict

import torch


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def role(name: str) -> str:
    for key, label in (("attn", "attention"), ("ff.", "feed-forward"), ("proj_in", "proj_in/out"),
                       ("proj_out", "proj_in/out"), ("time_emb", "time embedding"),
                       ("conv_shortcut", "resnet shortcut"), ("conv1", "resnet conv"),
                       ("conv2", "resnet conv"), ("time_emb_proj", "time embedding"),
                       ("samplers", "up/down sampler")):
        if key in name:
            return label
    return "other"


RECIPES = {
    # the data-free uniform recipe (issue 5's speed target)
    "w4": dict(bits=4, group_size=64),
    # mixed precision: every row quantized at 2, 3 and 4 bits, the split chosen by measured error
    "mixed": dict(bits=3, group_size=64, mixed_bits=(2, 3, 4)),
    "mixed-aware": dict(bits=3, group_size=64, mixed_bits=(2, 3, 4)),
}


def collect_stats(unet, resolution: int = 256, steps: int = 2):
    """Full XᵀX statistics for every linear: one batch of random latents at `resolution`
    pixels (latents resolution/8), random text conditioning, `steps` timesteps."""
    from bitfuse.integrations.diffusers import collect, unet_inputs

    sample, _, ctx = unet_inputs(unet, batch=1, seq=77)
    size = resolution // 8
    sample = sample[:, :, :size, :size].contiguous()
    t0 = time.perf_counter()
    stats = collect(unet, [dict(sample=sample, timestep=torch.tensor([0]), encoder_hidden_states=ctx)], steps=steps)
    info = {"collect_seconds": time.perf_counter() - t0, "collect_resolution": resolution,
            "collect_timesteps": steps, "stats_layers": len(stats),
            "stats_gib": sum(st.xtx.numel() * 8 + st.sq_sum.numel() * 12 for st in stats.values()) / (1 << 30),
            "stats_rows_min": min(st.count for st in stats.values())}
    return stats, info


def run_once(convs: bool, limit: int = 0, recipe: str = "w4") -> dict:
    import torch.nn as nn

    from bitfuse import QuantConfig, quantize_
    from bitfuse.e2e import build_denoiser

    t0 = time.perf_counter()
    unet = build_denoiser("sd15-unet")
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    types = {fqn: type(m).__name__ for fqn, m in unet.named_modules() if isinstance(m, kinds)}
    shapes = {fqn: tuple(m.weight.shape) for fqn, m in unet.named_modules() if isinstance(m, kinds)}
    filter_fn = None
    if limit:
        keep = set(list(types)[:limit])
        filter_fn = lambda m, fqn: fqn in keep  # noqa: E731
    cfg = QuantConfig(**RECIPES[recipe], convs=convs)
    stats, collect_info = None, {}
    if recipe == "mixed-aware":
        with torch.no_grad():
            stats, collect_info = collect_stats(unet)
        if limit:
            stats = {k: v for k, v in stats.items() if k in keep}
    rows: list = []
    load_before = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with torch.no_grad():
        quantize_(unet, cfg, filter_fn=filter_fn, calib_data=stats, report=rows, progress=False)
    total = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    by_type, by_role, count_type = defaultdict(float), defaultdict(float), defaultdict(int)
    slowest = sorted(rows, key=lambda r: -r["seconds"])[:5]
    for r in rows:
        by_type[types[r["name"]]] += r["seconds"]
        count_type[types[r["name"]]] += 1
        by_role[role(r["name"])] += r["seconds"]
    qparams = sum(r["out_features"] * r["in_features"] for r in rows)
    bpw = sum(r["bpw"] * r["out_features"] * r["in_features"] for r in rows) / max(qparams, 1)
    res = {
        "recipe": recipe, **collect_info,
        "config": cfg.to_dict(), "convs": convs, "model_params": params, "build_seconds": build_s,
        "layers_quantized": len(rows), "params_quantized": qparams, "mean_bpw": bpw,
        "total_seconds": total, "cpu_seconds": cpu_s,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "seconds_in_calibrate": sum(r["seconds"] for r in rows),
        "seconds_by_layer_type": dict(by_type), "layers_by_type": dict(count_type),
        "seconds_by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
        "slowest_layers": [dict(name=r["name"], shape=list(shapes[r["name"]]), seconds=r["seconds"])
                           for r in slowest],
        "mean_weight_rel_err": sum(r["weight_rel_err"] for r in rows) / max(len(rows), 1),
        "peak_rss_gib_after": peak_rss_gib(),
        "limited_to_layers": limit or None,
    }
    del unet, stats
    gc.collect()
    return res


def target_met(r: dict) -> str:
    if r.get("recipe", "w4") != "w4":
        return "– (target is for w4)"
    return "yes" if r["total_seconds"] <= 300 else "NO"


def run_name(r: dict) -> str:
    return f"{r.get('recipe', 'w4')}: " + ("linears + convs" if r["convs"] else "linears")


def write_md(doc: dict, path: str) -> None:
    env = doc["environment"]
    lines = [
        "# Calibration speed on the SD1.5 UNet config", "",
        f"Random weights, fp32 on CPU, torch {env['torch']}, {env['threads']} thread(s), "
        f"{env['cpu']}. Issue 5 target: <= 300 s on 2 cores for the data-free recipe (w4). Recipes: "
        "w4 = W4 g64 data-free; mixed = W3 g64, mixed_bits (2, 3, 4), data-free; mixed-aware = the "
        "same with full XᵀX statistics collected first (collect time counted separately).", "",
        "| run | layers | params quantized | total s | in calibrate s | CPU s | load avg before/after | mean bpw | peak RSS GiB | target met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        name = run_name(r)
        lines.append(f"| {name} | {r['layers_quantized']} | {r['params_quantized'] / 1e6:.1f} M | "
                     f"{r['total_seconds']:.1f} | {r['seconds_in_calibrate']:.1f} | {r['cpu_seconds']:.0f} | "
                     f"{r['loadavg_1min_before_after'][0]:.1f}/{r['loadavg_1min_before_after'][1]:.1f} | {r['mean_bpw']:.3f} | "
                     f"{r['peak_rss_gib_after']:.2f} | {target_met(r)} |")
    aware = [r for r in doc["runs"] if r.get("collect_seconds") is not None]
    for r in aware:
        lines += ["", f"{run_name(r)}: statistics collected in {r['collect_seconds']:.1f} s "
                      f"({r['collect_resolution']}² px, {r['collect_timesteps']} timesteps, "
                      f"{r['stats_layers']} layers, fewest rows {r['stats_rows_min']}); full XᵀX "
                      f"for every linear holds {r['stats_gib']:.2f} GiB (fp64)."]
    for r in doc["runs"]:
        name = run_name(r)
        lines += ["", f"## {name}: seconds by layer type / role", "", "| group | seconds |", "|---|---|"]
        for k, v in r["seconds_by_layer_type"].items():
            lines.append(f"| {k} ({r['layers_by_type'][k]} layers) | {v:.1f} |")
        for k, v in r["seconds_by_role"].items():
            lines.append(f"| role: {k} | {v:.1f} |")
        lines += ["", "Slowest layers: " + ", ".join(
            f"{s['name']} {tuple(s['shape'])} {s['seconds']:.2f}s" for s in r["slowest_layers"])]
    lines += ["", "CPU s is user+system time of the process; with 2 threads, CPU s / 2 approximates the "
              "wall time on an idle 2-core machine. A load average above 2 means other processes "
              "shared the cores during the run, and wall seconds are inflated accordingly.", ""]
    lines += ["", "Peak RSS is the whole process high-water mark (getrusage), so it includes the "
              "3.4 GB fp32 model and, for later runs, earlier ones."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convs", action="store_true", help="also run with convs=True")
    ap.add_argument("--limit", type=int, default=0, help="only the first N layers (smoke runs)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="w4")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in calib_speed.json and add these")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", "cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
           "cpu_count": os.cpu_count()}
    runs = []
    old = os.path.join(args.out, "calib_speed.json")
    if args.append and os.path.exists(old):
        with open(old) as f:
            runs = json.load(f)["runs"]
    runs.append(run_once(False, args.limit, args.recipe))
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "config"}, indent=1), flush=True)
    if args.convs:
        runs.append(run_once(True, args.limit, args.recipe))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "config"}, indent=1), flush=True)
    doc = {"environment": env, "runs": runs, "peak_rss_gib": peak_rss_gib()}
    os.makedirs(args.out, exist_ok=True)
    for name, writer in (("calib_speed.json", lambda p: json.dump(doc, open(p, "w"), indent=1)),
                         ("calib_speed.md", lambda p: write_md(doc, p))):
        path = os.path.join(args.out, name)
        tmp = f"{path}.tmp{os.getpid()}"
        writer(tmp)
        os.replace(tmp, path)
    print(f"wrote {args.out}/calib_speed.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
