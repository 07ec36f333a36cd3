"""Kernel microbenchmarks: bitfuse's fused linear (Triton and CUDA backends) vs fp16 cuBLAS,
dequant-then-matmul, torch's int4 tinygemm and gemlite's A16W4 (when installed);
and its implicit-GEMM conv vs fp16 cuDNN and im2col + the fused linear (SD1.5 3×3 convs).

    bitfuse bench kernels                 # full sweep on the visible GPU (= python benchmarks/bench_kernels.py)
    bitfuse bench kernels --quick         # a few shapes
    bitfuse bench kernels --cpu-smoke     # CPU, interpreter, tiny: checks the reporting path

Writes benchmarks/results/<device>/kernels.json, kernels.md and kernels.png (with --out to
change the folder). Every record carries the device, the versions and the shapes. Times are GPU
times of CUDA-graph replays (so Python launch overhead is excluded), median of several replays;
bandwidth is quoted against a copy bandwidth measured in the same run, never a vendor figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

SQUARE = [4096, 8192, 16384]
MS = [1, 4, 8, 16, 64, 256, 1024, 4096]  # the issue's M set, plus 8: the GEMVs' largest M
# (name, N, K): projection shapes of SD1.5's UNet (width 320/640/1280, context 768) and DiT-XL/2
# (hidden 1152, MLP 4608).
DIFFUSION = [
    ("sd15.attn320", 320, 320), ("sd15.ff320.in", 2560, 320), ("sd15.ff320.out", 320, 1280),
    ("sd15.attn1280", 1280, 1280), ("sd15.ff1280.in", 10240, 1280), ("sd15.ff1280.out", 1280, 5120),
    ("sd15.kv768->1280", 1280, 768),
    ("dit.qkv", 3456, 1152), ("dit.proj", 1152, 1152), ("dit.mlp.in", 4608, 1152),
    ("dit.mlp.out", 1152, 4608), ("dit.adaln", 6912, 1152),
]
DIFFUSION_MS = [256, 1024, 4096]
# (name, Cin, Cout, H = W, stride): SD1.5 UNet 3×3 convs (padding 1) at 512² (64×64 latents), batch
# CONV_BATCH (classifier-free guidance): resnet convs per width, a downsample, an up-block conv.
CONV_SD15 = [
    ("sd15.conv320@64", 320, 320, 64, 1), ("sd15.down320@64/2", 320, 320, 64, 2),
    ("sd15.conv640@32", 640, 640, 32, 1), ("sd15.conv1280@16", 1280, 1280, 16, 1),
    ("sd15.conv1280@8", 1280, 1280, 8, 1), ("sd15.up960->320@64", 960, 320, 64, 1),
]
CONV_BATCH = 2
# fit_group=False: a kernel case runs the group its name says (K = 320 would otherwise take g64).
RECIPES = {
    "w4g128": dict(bits=4, group_size=128, fit_group=False),
    "w3g128": dict(bits=3, group_size=128, fit_group=False),
    "w2g128": dict(bits=2, group_size=128, fit_group=False),
    "w3g128+res": dict(bits=3, group_size=128, residual=True, fit_group=False),
    "w4g128+r32": dict(bits=4, group_size=128, rank=32, fit_group=False),
    # compact scales (FORMAT.md §5.1): what reading 8-bit codes + row factors costs the kernels
    "w4g128+compact": dict(bits=4, group_size=128, compact_scales=True, fit_group=False),
}


def capture_graph(fn: Callable[[], None], calls: int = 20) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of `calls` back-to-back calls of fn (warmed up on a side stream first)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    return g


def gpu_time_us(fn: Callable[[], None], calls: int = 20, replays: int = 10) -> Dict[str, object]:
    """Median GPU time of one call, from CUDA-graph replays of `calls` back-to-back calls.
    Falls back to event timing of eager calls if capture fails (recorded in the result)."""
    try:
        run, method = capture_graph(fn, calls).replay, "cuda-graph"
    except Exception as e:  # noqa: BLE001 - record why and measure eagerly instead
        def run():
            for _ in range(calls):
                fn()
        method = f"eager events ({type(e).__name__})"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return {"us": statistics.median(times), "method": method}


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), measured now."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = gpu_time_us(lambda: b.copy_(a), calls=5, replays=5)["us"]
    return 2 * a.numel() / (t * 1e-6) / 1e9


def environment() -> dict:
    import triton

    import bitfuse
    from bitfuse.backend_cuda import gemm_kernel, gemv_kernel

    env = {"bitfuse": bitfuse.__version__, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda,
           "cuda_gemv_default": gemv_kernel(), "cuda_gemm_m16_default": gemm_kernel(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count)
    else:
        env.update(device="cpu", capability=None)
    return env


def tinygemm(w16: torch.Tensor, group: int = 128):
    """torch's int4 tinygemm (torch._weight_int4pack_mm), if this build has it: returns a callable
    x -> y, or None. Its quantization is its own (asymmetric, bf16 scales)."""
    if not hasattr(torch, "_weight_int4pack_mm"):
        return None
    try:
        n, k = w16.shape
        wg = w16.float().reshape(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.clamp(torch.round((wg - lo) / scale), 0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed_u8, 8)
        return lambda x: torch._weight_int4pack_mm(x, wp, group, sz)
    except Exception:  # noqa: BLE001 - absent or changed API in this torch build
        return None


def gemlite_w4(w16: torch.Tensor, group: int = 128):
    """gemlite's A16W4 Triton GEMV/GEMM (mobiusml/gemlite), if it is installed: returns
    (callable x -> y, its dequantized weight) or (None, reason). Its quantization: asymmetric
    per group, W = (q − zero)·scale, fp16 scales and zeros (what A16Wn.from_weights takes)."""
    try:
        from gemlite.helper import A16Wn
    except Exception as e:  # noqa: BLE001 - not installed, or needs a newer triton
        return None, f"gemlite unavailable: {type(e).__name__}: {str(e)[:120]}"
    try:
        n, k = w16.shape
        wg = w16.float().reshape(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zero = -lo / scale
        q = torch.clamp(torch.round(wg / scale + zero), 0, 15)
        w_deq = ((q - zero) * scale).reshape(n, k).to(w16.dtype)
        layer = A16Wn(device=str(w16.device)).from_weights(
            q.reshape(n, k).to(torch.uint8), scale.squeeze(-1).to(w16.dtype),
            zero.squeeze(-1).to(w16.dtype), 4, group)
        return layer, w_deq
    except Exception as e:  # noqa: BLE001 - its API moves between releases
        return None, f"gemlite from_weights failed: {type(e).__name__}: {str(e)[:120]}"


def bench_case(name: str, n: int, k: int, ms: List[int], recipes: List[str], bw: float,
               results: list, dtype=torch.float16, gemlite: bool = True) -> None:
    import bitfuse
    from bitfuse import QuantConfig, QuantLinear
    from bitfuse.kernels import fused_linear, tuning
    from bitfuse.kernels.launch import target_for
    from bitfuse import reference

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float32)
    w16 = lin.weight.detach().to(dtype)
    layers = {r: QuantLinear.from_linear(lin, QuantConfig(target="auto", **RECIPES[r])) for r in recipes}
    tg = tinygemm(w16.to(torch.bfloat16)) if dtype == torch.float16 else None
    # gemlite autotunes on its first call per shape: left out of --quick, whose budget is short
    gl, gl_w = gemlite_w4(w16) if gemlite else (None, "gemlite skipped under --quick (it autotunes per shape)")
    cuda_ok = bitfuse.backends()["cuda"]["available"]
    if cuda_ok:
        from bitfuse.backend_cuda import GEMM_TILES, GEMV_KERNELS, SKINNY_MAX_M, gemm, gemm_unsupported
        from bitfuse.backend_cuda import gemv, gemv_unsupported
        from bitfuse.backend_cuda import linear as cuda_linear
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        base = gpu_time_us(lambda: torch.nn.functional.linear(x, w16))
        row = {"case": name, "n": n, "k": k, "m": m, "dtype": str(dtype).replace("torch.", ""),
               "fp16_us": base["us"], "timing": base["method"]}
        fp16_bytes = 2 * n * k + 2 * m * (n + k)
        row["fp16_bw_frac"] = fp16_bytes / (base["us"] * 1e-6) / 1e9 / bw
        for r, q in layers.items():
            pw = q.packed
            t = gpu_time_us(lambda: fused_linear(x, pw))
            nbytes = pw.nbytes() + 2 * m * (n + k)
            row[f"{r}_us"] = t["us"]
            row[f"{r}_speedup"] = base["us"] / t["us"]
            row[f"{r}_bw_frac"] = nbytes / (t["us"] * 1e-6) / 1e9 / bw
            row[f"{r}_timing"] = t["method"]
            if cuda_ok:  # the cuda backend's linear: the CUDA GEMV for M <= 8, the GEMM above
                tc = gpu_time_us(lambda: cuda_linear(x, pw))
                row[f"{r}_cuda_us"] = tc["us"]
                row[f"{r}_cuda_speedup"] = base["us"] / tc["us"]
                row[f"{r}_cuda_bw_frac"] = nbytes / (tc["us"] * 1e-6) / 1e9 / bw
                if gemv_unsupported(x, pw) is None:  # both CUDA GEMVs: which one M <= 8 should use
                    for kern in GEMV_KERNELS:
                        tk = gpu_time_us(lambda: gemv(x, pw, kernel=kern))
                        row[f"{r}_gemv_{kern}_us"] = tk["us"]
                        row[f"{r}_gemv_{kern}_bw_frac"] = nbytes / (tk["us"] * 1e-6) / 1e9 / bw
                if m <= SKINNY_MAX_M and gemm_unsupported(x, pw) is None:
                    # the GEMM's two tiles for M <= 16 (skinny: the default; small), and at M <= 8
                    # against the GEMVs above: which kernel each M should run
                    for tile in GEMM_TILES:
                        tk = gpu_time_us(lambda: gemm(x, pw, kernel=tile))
                        row[f"{r}_gemm_{tile}_us"] = tk["us"]
                        row[f"{r}_gemm_{tile}_bw_frac"] = nbytes / (tk["us"] * 1e-6) / 1e9 / bw
        q4 = layers.get("w4g128")
        if q4 is not None and m <= tuning.CROSSOVER_MAX_M:
            # Both Triton paths at their table configs: the measured GEMV/GEMM crossover
            # (tuning.GEMV_MAX_M is set from these columns).
            for path in ("gemv", "gemm"):
                cfg = tuning.table_config(path, m, target_for(x.device))
                row[f"{path}_path_us"] = gpu_time_us(lambda: fused_linear(x, q4.packed, config=cfg))["us"]
        if q4 is not None:
            pw = q4.packed
            t = gpu_time_us(lambda: torch.nn.functional.linear(x, reference.dense_weight(pw).to(dtype)))
            row["dequant_matmul_us"] = t["us"]
            if bitfuse.backends()["cuda"]["available"]:
                from bitfuse.backend_cuda import dequantize_dense
                t = gpu_time_us(lambda: torch.nn.functional.linear(x, dequantize_dense(pw, dtype)))
                row["cuda_dequant_matmul_us"] = t["us"]
        if tg is not None:
            xb = x.to(torch.bfloat16)
            try:
                row["tinygemm_us"] = gpu_time_us(lambda: tg(xb))["us"]
            except Exception as e:  # noqa: BLE001
                row["tinygemm_error"] = str(e)[:200]
        if gl is not None:
            try:  # checked against its own dequantized weight before it is timed
                ref = torch.nn.functional.linear(x.float(), gl_w.float())
                err = float((gl(x).float() - ref).norm() / ref.norm().clamp_min(1e-30))
                row["gemlite_rel_err"] = err
                row["gemlite_us"] = gpu_time_us(lambda: gl(x))["us"]
            except Exception as e:  # noqa: BLE001
                row["gemlite_error"] = str(e)[:200]
        elif m == ms[0]:
            row["gemlite_error"] = gl_w
        results.append(row)
        print(json.dumps({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)


def bench_conv_case(name: str, cin: int, cout: int, hw: int, stride: int, recipes: List[str], bw: float,
                    results: list, dtype=torch.float16, batch: int = CONV_BATCH) -> None:
    """One 3×3 conv: cuDNN fp16 (NCHW and channels-last) vs the implicit GEMM (both input layouts)
    and vs im2col (F.unfold) + the fused linear, per recipe."""
    import torch.nn.functional as F

    from bitfuse import QuantConfig
    from bitfuse.kernels import fused_linear
    from bitfuse.kernels.conv_launch import conv2d_implicit
    from bitfuse.nn import QuantConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, device="cuda")
    w16 = conv.weight.detach().to(dtype)
    w16_cl = w16.to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, hw, hw, device="cuda", dtype=dtype)
    x_cl = x.to(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    m, k = batch * ho * ho, cin * 9
    base = gpu_time_us(lambda: F.conv2d(x, w16, None, stride, 1))
    row = {"case": name, "kind": "conv2d", "n": cout, "k": k, "m": m, "cin": cin, "hw": hw,
           "stride": stride, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
           "fp16_us": base["us"], "timing": base["method"],
           "cudnn_channels_last_us": gpu_time_us(lambda: F.conv2d(x_cl, w16_cl, None, stride, 1))["us"]}
    for r in recipes:
        pw = QuantConv2d.from_conv(conv, QuantConfig(target="auto", **RECIPES[r])).packed
        t = gpu_time_us(lambda: conv2d_implicit(x, pw, 3, stride, 1, 1))
        row[f"{r}_us"] = t["us"]
        row[f"{r}_speedup"] = base["us"] / t["us"]
        row[f"{r}_bw_frac"] = (pw.nbytes() + 2 * (x.numel() + m * cout)) / (t["us"] * 1e-6) / 1e9 / bw
        row[f"{r}_timing"] = t["method"]
        row[f"{r}_channels_last_us"] = gpu_time_us(lambda: conv2d_implicit(x_cl, pw, 3, stride, 1, 1))["us"]
        row[f"{r}_im2col_us"] = gpu_time_us(lambda: fused_linear(
            F.unfold(x, 3, padding=1, stride=stride).transpose(1, 2).reshape(m, k), pw))["us"]
    results.append(row)
    print(json.dumps({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)


def conv_table(results: list) -> List[str]:
    """Markdown lines for the conv rows (none if there are none)."""
    rows = [r for r in results if r.get("kind") == "conv2d"]
    recipes = [r for r in RECIPES if any(f"{r}_us" in row for row in rows)]
    if not rows:
        return []
    lines = ["", "## 3×3 convs: implicit GEMM vs cuDNN fp16 and im2col + fused linear", "",
             "Times in µs. `x` = speedup over cuDNN fp16 on NCHW input; per recipe: implicit GEMM on "
             "NCHW input (x, bw) / on channels-last input / im2col (F.unfold) + fused linear.", "",
             "| case | Cin→Cout | M | K | cuDNN µs (NCHW / CL) | "
             + " | ".join(f"{r}: implicit (x, bw) / CL / im2col" for r in recipes) + " |",
             "|---|---|---|---|---|" + "---|" * len(recipes)]
    for row in rows:
        cells = [f"{row[f'{r}_us']:.1f} ({row[f'{r}_speedup']:.2f}x, {row[f'{r}_bw_frac']:.2f}) / "
                 f"{row[f'{r}_channels_last_us']:.1f} / {row[f'{r}_im2col_us']:.1f}"
                 if f"{r}_us" in row else "-" for r in recipes]
        lines.append(f"| {row['case']} | {row['cin']}→{row['n']} | {row['m']} | {row['k']} | "
                     f"{row['fp16_us']:.1f} / {row['cudnn_channels_last_us']:.1f} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(results: list, env: dict, out_dir: str, bw: float) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbs": bw, "results": results}, f, indent=1)
    recipes = [r for r in RECIPES if any(f"{r}_us" in row for row in results)]
    cuda_recipes = [r for r in RECIPES if any(f"{r}_cuda_us" in row for row in results)]
    lines = [f"# Kernel microbenchmarks on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, bitfuse {env['bitfuse']}, "
             f"{env['time']}. Measured copy bandwidth: {bw:.0f} GB/s. Times in µs (CUDA-graph replays, "
             "median); `x` = speedup over fp16 cuBLAS; `bw` = fraction of the measured copy bandwidth. "
             "Plain recipe columns: the Triton fused linear; `cuda` columns: the cuda backend (CUDA "
             "GEMV for M <= 8, tensor-core GEMM above).", "",
             "| case | N | K | M | fp16 µs | " + " | ".join(f"{r} µs (x, bw)" for r in recipes)
             + "".join(f" | cuda {r} µs (x)" for r in cuda_recipes) + " | dequant+mm µs | tinygemm µs | gemlite W4 µs |",
             "|---|---|---|---|---|" + "---|" * (len(recipes) + len(cuda_recipes)) + "---|---|---|"]
    for row in (r for r in results if r.get("kind") != "conv2d"):
        cells = [f"{row[f'{r}_us']:.1f} ({row[f'{r}_speedup']:.2f}x, {row[f'{r}_bw_frac']:.2f})"
                 if f"{r}_us" in row else "-" for r in recipes]
        cells += [f"{row[f'{r}_cuda_us']:.1f} ({row[f'{r}_cuda_speedup']:.2f}x)"
                  if f"{r}_cuda_us" in row else "-" for r in cuda_recipes]
        lines.append(f"| {row['case']} | {row['n']} | {row['k']} | {row['m']} | {row['fp16_us']:.1f} | "
                     + " | ".join(cells) + f" | {row.get('dequant_matmul_us', float('nan')):.1f} | "
                     + (f"{row['tinygemm_us']:.1f}" if "tinygemm_us" in row else "-") + " | "
                     + (f"{row['gemlite_us']:.1f}" if "gemlite_us" in row else "-") + " |")
    cross = [r for r in results if "gemv_path_us" in r]
    if cross:
        lines += ["", "## Triton GEMV vs GEMM path (w4g128, table configs): the measured crossover", "",
                  "| case | N | K | M | GEMV path µs | GEMM path µs | faster |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['n']} | {r['k']} | {r['m']} | {r['gemv_path_us']:.1f} | "
                  f"{r['gemm_path_us']:.1f} | {'gemv' if r['gemv_path_us'] <= r['gemm_path_us'] else 'gemm'} |"
                  for r in cross]
    gemvs = [(row, r) for row in results for r in RECIPES if f"{r}_gemv_tc_us" in row]
    if gemvs:
        lines += ["", "## CUDA GEMV, M <= 8: tensor cores (gemv_tc.cu) vs SIMT (gemv.cu)", "",
                  "Times in µs (fraction of the measured copy bandwidth).", "",
                  "| case | N | K | M | recipe | fp16 µs | tc µs (bw) | simt µs (bw) | faster |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row, r in gemvs:
            tc, simt = row[f"{r}_gemv_tc_us"], row[f"{r}_gemv_simt_us"]
            lines.append(f"| {row['case']} | {row['n']} | {row['k']} | {row['m']} | {r} | {row['fp16_us']:.1f} | "
                         f"{tc:.1f} ({row[f'{r}_gemv_tc_bw_frac']:.2f}) | {simt:.1f} "
                         f"({row[f'{r}_gemv_simt_bw_frac']:.2f}) | {'tc' if tc <= simt else 'simt'} |")
    gemms = [(row, r) for row in results for r in RECIPES if f"{r}_gemm_skinny_us" in row]
    if gemms:
        lines += ["", "## CUDA GEMM, M <= 16: skinny tile (exact codes, scales per group) vs small tile", "",
                  "Times in µs (fraction of the measured copy bandwidth); at M <= 8 the faster CUDA "
                  "GEMV of the table above for comparison.", "",
                  "| case | N | K | M | recipe | fp16 µs | skinny µs (bw) | small µs (bw) | best GEMV µs | fastest |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row, r in gemms:
            sk, sm = row[f"{r}_gemm_skinny_us"], row[f"{r}_gemm_small_us"]
            gv = min((row[f"{r}_gemv_{k}_us"] for k in ("tc", "simt") if f"{r}_gemv_{k}_us" in row),
                     default=None)
            best = min([("skinny", sk), ("small", sm)] + ([("gemv", gv)] if gv is not None else []),
                       key=lambda kv: kv[1])[0]
            lines.append(f"| {row['case']} | {row['n']} | {row['k']} | {row['m']} | {r} | {row['fp16_us']:.1f} | "
                         f"{sk:.1f} ({row[f'{r}_gemm_skinny_bw_frac']:.2f}) | {sm:.1f} "
                         f"({row[f'{r}_gemm_small_bw_frac']:.2f}) | "
                         + (f"{gv:.1f}" if gv is not None else "-") + f" | {best} |")
    lines += conv_table(results)
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot (pip install matplotlib)")
        return
    squares = sorted({row["n"] for row in results if row["case"].startswith("square")})
    fig, axes = plt.subplots(1, max(1, len(squares)), figsize=(5 * max(1, len(squares)), 4), squeeze=False)
    for ax, size in zip(axes[0], squares):
        rows = [r for r in results if r["case"].startswith("square") and r["n"] == size]
        for rec in recipes:
            pts = [(r["m"], r[f"{rec}_speedup"]) for r in rows if f"{rec}_speedup" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=rec)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K=N={size}")
        ax.set_xlabel("M")
        ax.set_ylabel("speedup over fp16 cuBLAS")
        ax.legend(fontsize=7)
    fig.suptitle(f"bitfuse Triton fused linear on {env['device']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=120)


def cpu_smoke(out_dir: str) -> None:
    """Run the reporting code on CPU with the interpreter and a tiny shape: checks the script."""
    os.environ["TRITON_INTERPRET"] = "1"
    from bitfuse import QuantConfig, QuantLinear
    from bitfuse.kernels import fused_linear

    q = QuantLinear.from_linear(torch.nn.Linear(128, 64), QuantConfig(bits=4, group_size=64))
    x = torch.randn(2, 128, dtype=torch.float16)
    t0 = time.perf_counter()
    fused_linear(x, q.packed)
    row = {"case": "square-smoke", "n": 64, "k": 128, "m": 2, "fp16_us": 1.0, "timing": "cpu (meaningless)",
           "w4g128_us": (time.perf_counter() - t0) * 1e6, "w4g128_speedup": 0.0, "w4g128_bw_frac": 0.0}
    # the conv reporting path too: a tiny 3×3 conv through the interpreted implicit GEMM
    import torch.nn.functional as F

    from bitfuse.kernels.conv_launch import conv2d_implicit
    from bitfuse.nn import QuantConv2d

    qc = QuantConv2d.from_conv(torch.nn.Conv2d(8, 16, 3, padding=1), QuantConfig(bits=4, group_size=64))
    xc = torch.randn(1, 8, 6, 6, dtype=torch.float16)
    t0 = time.perf_counter()
    conv2d_implicit(xc, qc.packed, 3, 1, 1, 1)
    t_conv = (time.perf_counter() - t0) * 1e6
    t0 = time.perf_counter()
    fused_linear(F.unfold(xc, 3, padding=1).transpose(1, 2).reshape(36, 72), qc.packed)
    conv_row = {"case": "conv-smoke", "kind": "conv2d", "n": 16, "k": 72, "m": 36, "cin": 8, "hw": 6,
                "stride": 1, "batch": 1, "fp16_us": 1.0, "cudnn_channels_last_us": 1.0,
                "timing": "cpu (meaningless)", "w4g128_us": t_conv, "w4g128_speedup": 0.0,
                "w4g128_bw_frac": 0.0, "w4g128_channels_last_us": t_conv,
                "w4g128_im2col_us": (time.perf_counter() - t0) * 1e6}
    write_outputs([row, conv_row], environment(), out_dir, 1.0)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K=N=4096, two diffusion and two conv shapes only")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run through the interpreter")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--suite", choices=("dense", "sparse", "all"), default="dense",
                   help="dense: the fused linear (default); sparse: SpMV/SpMM (bitfuse.sparse.bench); all: both")
    args = p.parse_args(argv)
    if args.suite != "dense":
        from .sparse.bench import main as sparse_main
        rc = sparse_main((["--quick"] if args.quick else []) + (["--cpu-smoke"] if args.cpu_smoke else [])
                         + (["--out", args.out] if args.out else []))
        if args.suite == "sparse" or rc:
            return rc
    here = os.path.join("benchmarks")  # results/<device>/ under the current directory's benchmarks/
    if args.cpu_smoke:
        cpu_smoke(args.out or os.path.join(here, "results", "cpu-smoke"))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU visible; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    env = environment()
    out = args.out or os.path.join(here, "results", env["device"].replace(" ", "_"))
    bw = copy_bandwidth_gbs()
    print(f"device {env['device']}: measured copy bandwidth {bw:.0f} GB/s", flush=True)
    from tqdm import tqdm

    results: list = []
    cases = [(f"square{s}", s, s, MS, list(RECIPES)) for s in (SQUARE[:1] if args.quick else SQUARE)]
    cases += [(name, n, k, DIFFUSION_MS, ["w4g128", "w3g128+res"])
              for name, n, k in (DIFFUSION[:2] if args.quick else DIFFUSION)]
    convs = CONV_SD15[:2] if args.quick else CONV_SD15
    cases += [(name, cin, cout, hw, stride, "conv") for name, cin, cout, hw, stride in convs]
    for case in tqdm(cases, desc="bitfuse bench kernels", unit="shape"):
        if case[-1] == "conv":
            bench_conv_case(*case[:5], ["w4g128", "w3g128+res"], bw, results)
        else:
            bench_case(*case, bw, results, gemlite=not args.quick)
        # after every shape: a run stopped by a time limit keeps what it measured
        write_outputs(results, env, out, bw)
    print(f"wrote {out}/kernels.json, kernels.md" + (", kernels.png" if os.path.exists(os.path.join(out, "kernels.png")) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
