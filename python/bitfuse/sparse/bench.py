"""SpMV/SpMM benchmark: HBP (CUDA, Triton) vs the scalar and vector CSR kernels vs torch.sparse
CSR (cuSPARSE), on the generated suite (power-law R-MAT included).

    python benchmarks/bench_spmv.py            # = bitfuse bench kernels --suite sparse
    python benchmarks/bench_spmv.py --quick    # fewer, smaller matrices
    python benchmarks/bench_spmv.py --cpu-smoke --out DIR   # CPU, tiny, seconds: checks the script

Writes spmv.json, spmv.md and spmv.png into benchmarks/results/<device>/ (or --out) with the
device, versions and shapes. Times: CUDA-graph replays of 20 back-to-back calls, median of 10
replays (bitfuse.bench_kernels.gpu_time_us). GB/s counts each kernel's own format read once plus
x read and y written once (a lower bound on its traffic), quoted as a fraction of a copy
bandwidth measured in the same run. Matrices that fit in L2 (50 MB on an H100) stay there across
back-to-back calls, as they would in an iterative solver.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from . import generate
from .hbp import HBPMatrix

KERNELS = ("hbp_cuda", "hbp_cuda_l1", "hbp_triton", "csr_scalar", "csr_vector", "torch_csr")
POWER_LAW = ("rmat",)  # name prefixes of the power-law family
NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# (dtype, m): SpMV in three precisions, SpMM with 8 right-hand sides in fp32.
CONFIGS = [(torch.float32, None), (torch.float16, None), (torch.float64, None), (torch.float32, 8)]


def gpu_suite(quick: bool) -> Dict[str, object]:
    """Matrices sized to fill an H100-class GPU (up to ~8M nonzeros); quick: a few, smaller."""
    if quick:
        return {
            "rmat_s16": generate.rmat(16, 16, seed=0),
            "rmat_s18": generate.rmat(18, 8, seed=0),
            "poisson2d_500": generate.poisson2d(500),
            "uniform_256k": generate.uniform(1 << 18, 1 << 18, 8, seed=0),
        }
    return {
        "rmat_s18": generate.rmat(18, 16, seed=0),
        "rmat_s20": generate.rmat(20, 8, seed=0),
        "rmat_s16_ef64": generate.rmat(16, 64, seed=0),
        "poisson2d_1000": generate.poisson2d(1000),
        "poisson3d_100": generate.poisson3d(100),
        "banded_1M_bw3": generate.banded(1 << 20, 3, seed=0),
        "uniform_1M": generate.uniform(1 << 20, 1 << 20, 8, seed=0),
        "uniform_64k_x64": generate.uniform(1 << 16, 1 << 16, 64, seed=0),
        "block_diagonal": generate.block_diagonal(2000, 64, seed=0),
        "dense_row_1M": generate.dense_row(1 << 20, 1 << 20, seed=0),
        "uniform_wide": generate.uniform(4096, 1 << 24, 512, seed=0),
        "row_1xN": generate.row_vector(4_000_000, 0.5, seed=0),
        "col_Nx1": generate.col_vector(4_000_000, 0.5, seed=0),
    }


def _csr_bytes(a, elem: int) -> int:
    return 4 * (a.shape[0] + 1) + (4 + elem) * a.nnz


def _geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def bench_matrix(name: str, a, bw: float, results: list, kernels=KERNELS) -> None:
    from .. import _C
    from ..bench_kernels import gpu_time_us
    from .csr import csr_spmv

    dev = torch.device("cuda")
    a = a.tocsr()
    a.sort_indices()
    hs = {}  # dtype -> (HBPMatrix, build seconds)
    for dtype, m in CONFIGS:
        elem = torch.finfo(dtype).bits // 8
        vals = torch.from_numpy(a.data.astype(NP[dtype])).to(dev)
        ip = torch.from_numpy(a.indptr.astype(np.int32)).to(dev)
        idx = torch.from_numpy(a.indices.astype(np.int32)).to(dev)
        shape = (a.shape[1],) if m is None else (a.shape[1], m)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev)
        mm = 1 if m is None else m
        io_bytes = elem * mm * (a.shape[0] + a.shape[1])
        if dtype not in hs:
            t0 = time.perf_counter()
            hs[dtype] = (HBPMatrix.from_scipy(a, dtype=NP[dtype], device=dev), time.perf_counter() - t0)
        h, build_s = hs[dtype]
        row = {"matrix": name, "rows": a.shape[0], "cols": a.shape[1], "nnz": int(a.nnz),
               "dtype": str(dtype).replace("torch.", ""), "m": mm, "hbp_build_s": build_s,
               "hbp_tiles": h.n_tiles, "hbp_tile_shape": list(h.tile_shape),
               "hbp_padding": (h.stored - h.nnz) / max(1, h.nnz), "hbp_bytes": h.nbytes,
               "csr_bytes": _csr_bytes(a, elem)}
        row["hbp_stage_cols"], row["hbp_warps"] = h.launch_params()
        fns, nbytes = {}, {}
        if "hbp_cuda" in kernels and _C.cuda_built():
            fns["hbp_cuda"] = lambda: h.matmul(x, kernel="cuda")
            nbytes["hbp_cuda"] = h.nbytes + io_bytes
        if "hbp_cuda_l1" in kernels and _C.cuda_built():
            os.environ["BITFUSE_HBP_STAGE"] = "never"
            h_l1 = HBPMatrix(h.layout, dev)  # same layout, launched without x staging
            h_l1.device_arrays()
            os.environ.pop("BITFUSE_HBP_STAGE")
            fns["hbp_cuda_l1"] = lambda: h_l1.matmul(x, kernel="cuda")
            nbytes["hbp_cuda_l1"] = h.nbytes + io_bytes
        if "hbp_triton" in kernels:
            fns["hbp_triton"] = lambda: h.matmul(x, kernel="triton")
            nbytes["hbp_triton"] = h.nbytes + io_bytes
        for k in ("scalar", "vector"):
            if f"csr_{k}" in kernels and _C.cuda_built():
                out = torch.empty(a.shape[0], mm, dtype=dtype, device=dev)
                fns[f"csr_{k}"] = (lambda k=k, out=out: csr_spmv(ip, idx, vals, x, kernel=k, check=False, out=out))
                nbytes[f"csr_{k}"] = _csr_bytes(a, elem) + io_bytes
        if "torch_csr" in kernels:
            try:
                t = torch.sparse_csr_tensor(ip, idx, vals, size=a.shape)
                t @ x
                fns["torch_csr"] = lambda: t @ x
                row["torch_csr_index"] = "int32"
            except Exception as e:  # noqa: BLE001 - fall back to int64 indices, say so
                try:
                    t = torch.sparse_csr_tensor(ip.long(), idx.long(), vals, size=a.shape)
                    t @ x
                    fns["torch_csr"] = lambda: t @ x
                    row["torch_csr_index"] = f"int64 (int32 failed: {type(e).__name__})"
                except Exception as e2:  # noqa: BLE001 - record, keep going
                    row["torch_csr_error"] = f"{type(e2).__name__}: {str(e2)[:160]}"
            nbytes["torch_csr"] = _csr_bytes(a, elem) + io_bytes
        ref = None
        for k, fn in fns.items():
            try:
                y = fn().double()
                torch.cuda.synchronize()
                if ref is None:
                    ref = y
                    scale = float(ref.abs().max()) or 1.0
                row[f"{k}_max_rel_err"] = float((y - ref).abs().max()) / scale
                tm = gpu_time_us(fn)
            except Exception as e:  # noqa: BLE001 - one failing kernel must not lose the run
                row[f"{k}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            us = tm["us"]
            row[f"{k}_us"] = us
            row[f"{k}_timing"] = tm["method"]
            row[f"{k}_gflops"] = 2 * a.nnz * mm / (us * 1e-6) / 1e9
            row[f"{k}_gbs"] = nbytes[k] / (us * 1e-6) / 1e9
            row[f"{k}_bw_frac"] = row[f"{k}_gbs"] / bw
        if "torch_csr_us" in row:
            for k in fns:
                if f"{k}_us" in row:
                    row[f"{k}_speedup"] = row["torch_csr_us"] / row[f"{k}_us"]
        results.append(row)
        brief = {k: row[k] for k in ("matrix", "dtype", "m")}
        brief.update({k: round(v, 3) for k, v in row.items() if k.endswith(("_us", "_speedup"))})
        brief.update({k: v for k, v in row.items() if k.endswith("_error")})
        print(json.dumps(brief), flush=True)
        del fns
    del hs
    torch.cuda.empty_cache()


def summarize(results: list) -> dict:
    """Geomean speedups over torch CSR, per kernel: overall and on the power-law matrices."""
    out = {}
    for k in KERNELS:
        if k == "torch_csr":
            continue
        all_ = [r[f"{k}_speedup"] for r in results if f"{k}_speedup" in r]
        pl = [r[f"{k}_speedup"] for r in results if f"{k}_speedup" in r and r["matrix"].startswith(POWER_LAW)]
        if all_:
            out[k] = {"geomean_all": _geomean(all_), "geomean_power_law": _geomean(pl), "cases": len(all_)}
    return out


def write_outputs(results: list, env: dict, out_dir: str, bw: float) -> None:
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    with open(os.path.join(out_dir, "spmv.json"), "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbs": bw, "summary": summary,
                   "results": results}, f, indent=1)
    ks = [k for k in KERNELS if any(f"{k}_us" in r for r in results)]
    lines = [f"# SpMV / SpMM on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, bitfuse "
             f"{env['bitfuse']}, {env['time']}. Measured copy bandwidth: {bw:.0f} GB/s. Times in µs "
             "(CUDA-graph replays of 20 calls, median of 10); `x` = speedup over torch.sparse CSR "
             "(cuSPARSE, int32 indices); `bw` = the kernel's own format + x + y bytes / time, as a "
             "fraction of the copy bandwidth. `hbp_cuda_l1` = the CUDA HBP kernel with x never "
             "staged in shared memory.", "", "## Geomean speedup over torch CSR", "",
             "| kernel | all cases | power-law (R-MAT) | cases |", "|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for k, s in summary.items():
        lines.append(f"| {k} | {fmt(s['geomean_all'])} | {fmt(s['geomean_power_law'])} | {s['cases']} |")
    lines += ["", "## Cases", "",
              "| matrix | rows × cols | nnz | dtype | m | HBP pad | " + " | ".join(f"{k} µs (x, bw)" for k in ks) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(ks)]
    for r in results:
        cells = []
        for k in ks:
            if f"{k}_us" in r:
                x = f"{r[f'{k}_speedup']:.2f}x, " if f"{k}_speedup" in r else ""
                cells.append(f"{r[f'{k}_us']:.1f} ({x}{r[f'{k}_bw_frac']:.2f})")
            else:
                cells.append("err" if f"{k}_error" in r else "-")
        lines.append(f"| {r['matrix']} | {r['rows']}×{r['cols']} | {r['nnz']} | {r['dtype']} | {r['m']} | "
                     f"{100 * r['hbp_padding']:.0f}% | " + " | ".join(cells) + " |")
    errs = [(r["matrix"], r["dtype"], r["m"], k, r[f"{k}_error"]) for r in results for k in KERNELS if f"{k}_error" in r]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {a} {b} m={c} {k}: {e}" for a, b, c, k, e in errs]
    with open(os.path.join(out_dir, "spmv.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot")
        return
    cases = [r for r in results if "torch_csr_us" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(ks) - 1)
    for i, k in enumerate(k for k in ks if k != "torch_csr"):
        ys = [r.get(f"{k}_speedup", 0) for r in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=k)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{r['matrix']} {r['dtype']} m={r['m']}" for r in cases], rotation=75, fontsize=6)
    ax.set_ylabel("speedup over torch CSR")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"SpMV/SpMM on {env['device']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spmv.png"), dpi=120)


def cpu_smoke(out_dir: str) -> None:
    """The reporting path on CPU in seconds: the C++ HBP product and scipy on tiny matrices
    (times meaningless; the GPU kernels are not run)."""
    from ..bench_kernels import environment

    results = []
    for name in ("rmat", "poisson2d", "dense_row"):
        a = generate.suite("small")[name].tocsr()
        h = HBPMatrix.from_scipy(a, dtype=np.float32)
        x = torch.randn(a.shape[1], dtype=torch.float32, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        y = h @ x
        t_hbp = (time.perf_counter() - t0) * 1e6
        xs = x.numpy()
        t0 = time.perf_counter()
        ref = a @ xs
        t_sp = (time.perf_counter() - t0) * 1e6
        err = float(np.abs(y.numpy() - ref).max() / max(1e-30, np.abs(ref).max()))
        # fp32 accumulation of a row of n terms is off by at most ~n·2^-24·Σ|a||x| (Higham's γ_n)
        longest = int(np.diff(a.indptr).max()) if a.nnz else 0
        bound = float((longest * 2.0 ** -24 * (abs(a) @ np.abs(xs))).max()) if a.nnz else 0.0
        bound /= max(1e-30, np.abs(ref).max())
        results.append({"matrix": name, "rows": a.shape[0], "cols": a.shape[1], "nnz": int(a.nnz),
                        "dtype": "float32", "m": 1, "hbp_padding": (h.stored - h.nnz) / max(1, h.nnz),
                        "hbp_cuda_us": t_hbp, "hbp_cuda_max_rel_err": err, "hbp_cuda_err_bound": bound,
                        "hbp_cuda_bw_frac": 0.0,
                        "hbp_cuda_speedup": t_sp / t_hbp, "torch_csr_us": t_sp, "torch_csr_bw_frac": 0.0,
                        "torch_csr_speedup": 1.0,
                        "timing": "cpu wall clock, meaningless: the C++ HBP product under hbp_cuda, "
                                  "scipy under torch_csr"})
    write_outputs(results, environment(), out_dir, 1.0)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="four smaller matrices")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run: checks the reporting path")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--only", default=None, help="comma-separated matrix names to run")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        cpu_smoke(args.out or os.path.join("benchmarks", "results", "cpu-smoke"))
        return 0
    if not torch.cuda.is_available():
        print("bench_spmv: no CUDA GPU visible; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    from ..bench_kernels import copy_bandwidth_gbs, environment

    env = environment()
    out = args.out or os.path.join("benchmarks", "results", env["device"].replace(" ", "_"))
    bw = copy_bandwidth_gbs()
    print(f"device {env['device']}: measured copy bandwidth {bw:.0f} GB/s", flush=True)
    suite = gpu_suite(args.quick)
    if args.only:
        suite = {k: v for k, v in suite.items() if k in args.only.split(",")}
    results: list = []
    for name, a in suite.items():
        bench_matrix(name, a, bw, results)
        write_outputs(results, env, out, bw)  # after every matrix: a cut-off run keeps its data
    s = summarize(results)
    for k, v in s.items():
        print(f"{k}: geomean speedup over torch CSR {v['geomean_all']:.3f} (power-law "
              f"{(v['geomean_power_law'] or float('nan')):.3f}, {v['cases']} cases)")
    print(f"wrote {out}/spmv.json, spmv.md, spmv.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
