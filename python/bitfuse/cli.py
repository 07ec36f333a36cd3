"""The `bitfuse` command line: `bitfuse demo`, `bitfuse backends`, `bitfuse --version`."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import sys
import time
from typing import List, Optional

import torch


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """PSNR (dB, peak = max |ref|) and cosine similarity of out against ref."""
    ref, out = ref.double().flatten(), out.double().flatten()
    mse = float((ref - out).square().mean())
    peak = float(ref.abs().max())
    psnr = math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
    cos = float(torch.nn.functional.cosine_similarity(ref, out, dim=0))
    return {"psnr_db": psnr, "cosine": cos, "mse": mse}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def layer_table(model: torch.nn.Module) -> List[dict]:
    """One row per QuantLinear: name, shape, bits, bpw, fp16 bytes and packed bytes."""
    from .nn import QuantLinear

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n, k = m.out_features, m.in_features
            rows.append({"layer": name, "shape": f"{n}x{k}", "bits": m.bits, "bpw": m.bpw,
                         "fp16_bytes": 2 * n * k, "packed_bytes": m.bpw * n * k / 8})
    return rows


def _print_table(rows: List[dict], out=sys.stdout) -> None:
    w = max([len(r["layer"]) for r in rows] + [5])
    print(f"{'layer':<{w}}  {'shape':>9}  {'bits':>5}  {'bpw':>6}  {'fp16':>10}  {'packed':>10}", file=out)
    for r in rows:
        print(f"{r['layer']:<{w}}  {r['shape']:>9}  {r['bits']:>5.2f}  {r['bpw']:>6.3f}  "
              f"{_fmt_bytes(r['fp16_bytes']):>10}  {_fmt_bytes(r['packed_bytes']):>10}", file=out)
    fp16 = sum(r["fp16_bytes"] for r in rows)
    packed = sum(r["packed_bytes"] for r in rows)
    total_w = sum(r["fp16_bytes"] / 2 for r in rows)
    print(f"{'total (' + str(len(rows)) + ' layers)':<{w}}  {'':>9}  {'':>5}  {8 * packed / total_w:>6.3f}  "
          f"{_fmt_bytes(fp16):>10}  {_fmt_bytes(packed):>10}   ({fp16 / packed:.2f}x smaller)", file=out)


def demo(args: argparse.Namespace) -> int:
    from . import QuantConfig, quantize_
    from .dispatch import select_backend
    from .integrations.diffusers import tiny_unet, unet_inputs

    t0 = time.perf_counter()
    config = QuantConfig(
        bits=args.bits, group_size=args.group_size, residual=args.residual,
        mixed_bits=tuple(args.mixed) if args.mixed else None, rank=args.rank,
        outliers=args.outliers, target="cpu" if not torch.cuda.is_available() else "auto",
    )
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    print(f"bitfuse demo: tiny UNet2DConditionModel from a config (random weights), {config}")
    unet = tiny_unet(width=args.width, cross_dim=2 * args.width).to(device)
    sample, t, ctx = (a.to(device) for a in unet_inputs(unet))
    with torch.no_grad():
        ref = unet(sample, t, ctx).sample
    qunet = quantize_(copy.deepcopy(unet), config)
    t_quant = time.perf_counter() - t0
    with torch.no_grad():
        out = qunet(sample, t, ctx).sample
    rows = layer_table(qunet)
    _print_table(rows)
    fid = fidelity(ref, out)
    print(f"\noutput fidelity vs float: PSNR {fid['psnr_db']:.2f} dB, cosine {fid['cosine']:.5f}")
    print(f"backend: {select_backend(device, 'gemm')} on {device}"
          + (" (CPU: the torch reference path; timings here are CPU timings)" if device.type == "cpu" else ""))
    print(f"time: {time.perf_counter() - t0:.1f} s (build + quantize {t_quant:.1f} s)")
    return 0


def quantize_cmd(args: argparse.Namespace) -> int:
    """Quantize and save. The checkpoint is written to a temporary name and renamed, so an
    interrupted run never leaves a half-written file (or clobbers an older one) at --out."""
    from . import QuantConfig, quantize_, save_quantized
    from .e2e import RECIPES, E2EError, build_denoiser
    from .integrations.diffusers import collect, keep_float_filter

    if args.recipe not in RECIPES:
        raise E2EError(f"unknown recipe {args.recipe!r}; choose one of {sorted(RECIPES)}")
    if args.calib < 0 or args.calib_steps < 1:
        raise SystemExit(f"bitfuse quantize: --calib must be >= 0 and --calib-steps >= 1, got "
                         f"{args.calib} and {args.calib_steps}")
    if args.rounding == "gptq" and not args.calib:
        raise SystemExit("bitfuse quantize: --rounding gptq needs activations: add --calib N")
    if args.avg_bpw is None and args.candidates is not None:
        raise SystemExit("bitfuse quantize: --candidates are the choices of --avg-bpw: add --avg-bpw B")
    if args.avg_bpw is not None and not (math.isfinite(args.avg_bpw) and args.avg_bpw > 0):
        raise SystemExit(f"bitfuse quantize: --avg-bpw must be a positive number of bits per weight, got {args.avg_bpw}")
    if args.avg_bpw is not None and args.calib < 2:
        raise SystemExit("bitfuse quantize: --avg-bpw scores layers by their effect on the model's output on "
                         "inputs they were not fitted to, which needs activations: add --calib N with N >= 2")
    if not (math.isfinite(args.calib_memory) and args.calib_memory >= 0):
        raise SystemExit(f"bitfuse quantize: --calib-memory must be a number of GiB >= 0, got {args.calib_memory}")
    config = QuantConfig(target="auto", compact_scales=args.compact_scales, **RECIPES[args.recipe])
    candidates = None
    if args.avg_bpw is not None:
        # the candidates cover the layers the recipe covers: its convs too when it takes them
        candidates = [dataclasses.replace(c, convs=config.convs, compact_scales=args.compact_scales)
                      for c in _candidates(args.candidates or DEFAULT_CANDIDATES)]
    keep = _keep_float(args.keep_float)
    only = keep_float_filter(keep)  # None when nothing is kept float
    t0 = time.perf_counter()
    model = build_denoiser(args.model, args.path).float()
    if args.keep_float.strip() not in ("auto", "none"):  # names given by hand must name layers
        have = dict(model.named_modules())
        wrong = [n for n in keep if not isinstance(have.get(n), (torch.nn.Linear, torch.nn.Conv2d))]
        if wrong:
            raise SystemExit(f"bitfuse quantize: --keep-float names {wrong}, which are not linear or conv "
                             f"layers of this model (names are fully qualified, e.g. 'proj_out')")
    if torch.cuda.is_available():
        model = model.cuda()
    batches = _calibration_batches(model, args.calib)
    # XᵀX kept within --calib-memory (collect's max_full_bytes); convs are recorded when the
    # recipe quantizes them (their statistics are over patches, C·kh·kw wide)
    memory = int(args.calib_memory * 2**30)
    options = {"rounding": args.rounding, "gptq_order": args.gptq_order, "outlier_rule": args.outlier_rule}
    rows: list = []
    if candidates:
        from .calibrate import allocate_bits, merge_stats, quantize_per_layer
        from .integrations.diffusers import holdout_timesteps, sensitivity

        # Fit on half the inputs at --calib-steps timesteps, score on the other half at the
        # timesteps between them (allocate_bits' holdout), quantize with both. The sensitivity
        # (a weighting, one backward per probe) from two of the fitted inputs. fit, held and
        # their merge are alive at once: a third of --calib-memory each.
        fit = collect(model, batches[::2], steps=args.calib_steps, convs=config.convs,
                      max_full_bytes=memory // 3, filter_fn=only)
        held = collect(model, batches[1::2], steps=holdout_timesteps(args.calib_steps),
                       convs=config.convs, max_full_bytes=memory // 3, filter_fn=only)
        kinds = (torch.nn.Linear, torch.nn.Conv2d) if config.convs else (torch.nn.Linear,)
        sens = sensitivity(model, batches[::2][:2], steps=args.calib_steps,
                           filter_fn=lambda m, n: isinstance(m, kinds) and (only is None or only(m, n)))
        configs = allocate_bits(model, candidates, args.avg_bpw, calib_data=fit, holdout=held,
                                sensitivity=sens, calib_options=options, filter_fn=only)
        calib = merge_stats(fit, held)
        del fit, held
        quantize_per_layer(model, configs, config, filter_fn=only, calib_data=calib, calib_options=options,
                           report=rows)
    elif batches:
        # in passes, so every layer's XᵀX fits --calib-memory (calibrate/sequential.py)
        from .calibrate.sequential import quantize_in_passes

        quantize_in_passes(model, config, batches, max_full_bytes=memory, filter_fn=only, calib_options=options,
                           report=rows, collect_fn=lambda m, b, **kw: collect(m, b, steps=args.calib_steps, **kw))
    else:
        quantize_(model, config, filter_fn=only, calib_options=options, report=rows)
    save_quantized(model, args.out)
    if args.report:
        from .calibrate.report import write_report
        # with --avg-bpw the layers' own rows say what each got; the recipe covers the rest
        write_report(rows, args.report, config)
    total = sum(r.get("bpw", 0) * r.get("out_features", 0) * r.get("in_features", 0) for r in rows)
    how = (f"a per-layer choice of {args.candidates or DEFAULT_CANDIDATES} at <= {args.avg_bpw} bpw "
           f"(other layers {args.recipe})" if candidates else args.recipe)
    print(f"quantized {len(rows)} layers of {args.path or args.model} with {how} in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}" + (f" ({total / 8 / 2**20:.1f} MiB packed)" if total else ""))
    return 0


def _calibration_batches(model, n: int) -> list:
    """n random denoiser inputs (the e2e benchmark's latents and conditioning, one seed each);
    collect and sensitivity run each at --calib-steps timesteps spread over [0, 1000).
    Random conditioning is a stand-in: for a real model, collect from real prompts with
    bitfuse.integrations.diffusers.collect(pipe, prompts)."""
    from .e2e import make_inputs, sample_key

    p = next(model.parameters())
    batches = []
    for seed in range(n):
        lat, cond = make_inputs(model, 1, p.device, p.dtype, None, seed=seed)
        batches.append({sample_key(model): lat, "timestep": 0, **cond})
    return batches


DEFAULT_CANDIDATES = "w2g64,w3g128,w4g128"


def _keep_float(spec: str) -> tuple:
    """--keep-float: "auto" -> the denoiser's input/output layers (DENOISER_KEEP_FLOAT), "none" ->
    (), else a comma-separated list of layer names."""
    from .integrations.pipelines import DENOISER_KEEP_FLOAT

    spec = spec.strip()
    if spec == "auto":
        return DENOISER_KEEP_FLOAT
    if spec == "none":
        return ()
    return tuple(n.strip() for n in spec.split(",") if n.strip())


def _candidates(spec: str) -> list:
    """"w2g64,w3g128,w4g128" -> QuantConfigs (bits and group size per candidate)."""
    import re

    from . import QuantConfig

    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"w([234])g(32|64|128)", item.strip().lower())
        if not m:
            raise SystemExit(f"bitfuse quantize: --candidates takes a comma-separated list like "
                             f"w2g64,w3g128,w4g128 (bits 2-4, group 32/64/128); got {item!r}")
        out.append(QuantConfig(bits=int(m[1]), group_size=int(m[2]), target="auto"))
    return out


def bench_kernels(args: argparse.Namespace) -> int:
    from .bench_kernels import main as kernels_main

    argv = (["--quick"] if args.quick else []) + (["--cpu-smoke"] if args.cpu_smoke else []) \
        + (["--out", args.out] if args.out else []) + ["--suite", args.suite]
    return kernels_main(argv)


def bench_e2e(args: argparse.Namespace) -> int:
    import os

    from .e2e import format_report, run

    device = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
    out = args.out or os.path.join("benchmarks", "results", device)
    r = run(model=args.model, recipe=args.recipe, steps=args.steps, batch=args.batch,
            resolution=args.resolution, path=args.path, out_dir=out, cuda_graphs=args.cuda_graphs,
            breakdown=not args.no_breakdown)
    print(format_report(r))
    stem = os.path.join(out, f"e2e_{args.model}_{args.recipe}")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def show_backends(_args: argparse.Namespace) -> int:
    from .dispatch import backends

    for name, s in backends().items():
        print(f"{name:7s} {'yes' if s['available'] else 'no ':3s}  {s['reason']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .version import __version__

    p = argparse.ArgumentParser(prog="bitfuse", description="low-bit fused kernels for edge GPUs")
    p.add_argument("--version", action="version", version=f"bitfuse {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log each layer decision")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="quantize a tiny diffusers UNet and report size and fidelity")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--residual", action="store_true")
    d.add_argument("--mixed", type=int, nargs="+", metavar="BITS", help="mixed widths, e.g. 3 4")
    d.add_argument("--rank", type=int, default=0)
    d.add_argument("--outliers", type=float, default=0.0)
    d.add_argument("--width", type=int, default=64, help="UNet base channel count")
    d.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    d.set_defaults(func=demo)
    qz = sub.add_parser("quantize", help="quantize a denoiser (built-in config or local folder) to a checkpoint")
    qz.add_argument("--model", default="tiny", help="tiny, sd15-unet, dit-xl-2, pixart-alpha or sd3-medium (random weights)")
    qz.add_argument("--path", default=None, help="a local diffusers denoiser folder (with config.json)")
    qz.add_argument("--recipe", default="w4", help="w4, w4g128, w3res, w3resc, w3mix, w4-linear or w4c (c: compact scales)")
    qz.add_argument("--out", required=True, help="the .safetensors checkpoint to write")
    qz.add_argument("--report", default=None, help="also write the per-layer report as JSON here")
    qz.add_argument("--keep-float", default="auto", metavar="NAMES",
                    help="layers left float: auto (default: the denoiser's input and output layers, "
                         "conv_in/conv_out/proj_out/proj_out_1/proj_out_2), none, or comma-separated names")
    qz.add_argument("--calib", type=int, default=0, metavar="N",
                    help="activation-aware calibration from N random inputs (latents + conditioning) "
                         "at --calib-steps timesteps; 0 (default): data-free")
    qz.add_argument("--calib-steps", type=int, default=4, help="timesteps sampled per calibration input")
    qz.add_argument("--calib-memory", type=float, default=8.0, metavar="GIB",
                    help="memory for the calibration XᵀX (default 8 GiB): layers are calibrated in passes "
                         "that fit it (with --avg-bpw, one collection: the widest layers beyond a third of it "
                         "keep only the diagonal and are rounded to nearest under --rounding gptq)")
    qz.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                    help="gptq: error-feedback rounding (needs --calib; layers whose XᵀX --calib-memory "
                         "leaves out stay nearest)")
    qz.add_argument("--gptq-order", choices=("act", "natural"), default="act",
                    help="the column order of --rounding gptq: act-order (default) or left to right")
    qz.add_argument("--outlier-rule", default="auto",
                    choices=("auto", "magnitude", "act_norm", "sensitivity", "measured"),
                    help="how outliers are chosen when the recipe has them (docs/CALIBRATION.md)")
    qz.add_argument("--avg-bpw", type=float, default=None, metavar="B",
                    help="choose a recipe per layer from --candidates so the layers the recipe covers "
                         "(linears, and convs if it takes them) average at most B bits per weight, by each layer's measured effect on the model output "
                         "(needs --calib; docs/CALIBRATION.md, layer-wise allocation)")
    qz.add_argument("--candidates", default=None,
                    help=f"the per-layer choices of --avg-bpw (default {DEFAULT_CANDIDATES})")
    qz.add_argument("--compact-scales", action="store_true",
                    help="8-bit scale and offset codes on per-row grids (FORMAT.md §5.1): 16 bits a "
                         "group + 48 a row instead of 32 a group, in layers of >= 4 groups a row")
    qz.set_defaults(func=quantize_cmd)
    b = sub.add_parser("backends", help="which backends run here, and why the others do not")
    b.set_defaults(func=show_backends)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    kb = bench.add_parser("kernels", help="kernel microbenchmarks -> benchmarks/results/<device>/")
    kb.add_argument("--quick", action="store_true", help="K=N=4096 and two diffusion shapes only")
    kb.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run through the interpreter")
    kb.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    kb.add_argument("--suite", choices=("dense", "sparse", "all"), default="dense",
                    help="dense: fused linear; sparse: HBP/CSR SpMV/SpMM (benchmarks/bench_spmv.py); all")
    kb.set_defaults(func=bench_kernels)
    e = bench.add_parser("e2e", help="float vs bitfuse denoiser over its sampling loop, + Orin projection")
    e.add_argument("--model", default="tiny", help="tiny, sd15-unet, dit-xl-2, pixart-alpha or sd3-medium")
    e.add_argument("--path", default=None, help="a local diffusers denoiser folder (with config.json)")
    e.add_argument("--recipe", default="w4", help="w4, w4g128, w3res, w3resc, w3mix, w4-linear or w4c")
    e.add_argument("--steps", type=int, default=4)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--resolution", type=int, default=None, help="image side in pixels (latents are /8)")
    e.add_argument("--out", default=None, help="folder for the JSON and markdown (default benchmarks/results/<device>)")
    e.add_argument("--cuda-graphs", action="store_true",
                   help="also time each step as a CUDA-graph replay (GPU only; ignored on CPU)")
    e.add_argument("--no-breakdown", action="store_true",
                   help="skip the extra profiled step that splits the time per layer type")
    e.set_defaults(func=bench_e2e)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.cmd:
        p.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, RuntimeError) as e:
        print(f"bitfuse {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
