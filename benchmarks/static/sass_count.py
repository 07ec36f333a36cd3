"""SASS instructions per weight in the steady-state loop of the CUDA GEMVs and of the tensor-core
GEMM at M <= 16, its small tile and its skinny tile (a static count).

No GPU needed: gemv_probe.cu instantiates each kernel body for a plain layer (no residual,
low-rank, sparse or bias; fp16 scale pairs; compile-time bit width and group size), nvcc compiles
it for each architecture, and cuobjdump's SASS is parsed. The hot loop is the innermost loop whose
body holds the product instructions (FFMA for the SIMT GEMV, HMMA for the tensor-core one); its
instruction count divided by the weights one thread covers per iteration is "instructions a
weight". Every instruction in those loops runs on every iteration (their only branches leave the
loop at the end of K, or, in the skinny tile's k-tile loop, skip runs and folds past K, which the
steady state never takes), so the static count is the dynamic one for a long K.

What it bounds. A warp scheduler issues at most one instruction a clock, four schedulers an SM:
a GEMV that streams `bits`-bit weights at DRAM bandwidth BW must issue SMs·4·32·clock /
(BW·8/bits) instructions a weight or fewer (the "budget" column; vendor boost clocks and
bandwidths). Above the budget the loop is issue-bound and cannot reach the bandwidth, whatever
else happens; below it, it may (pipe throughputs, latency and occupancy decide, which only a GPU
measures). This is a projection from a static count, not a measurement.

    python benchmarks/static/sass_count.py [--out benchmarks/results/static]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# GPU: (arch, SMs, boost clock GHz, DRAM GB/s) — vendor figures (clocks: NVIDIA spec sheets).
GPUS = {
    "H200": (90, 132, 1.98, 4800),
    "H100 SXM": (90, 132, 1.98, 3350),
    "RTX 4090": (89, 128, 2.52, 1008),
    "RTX 3090": (86, 82, 1.695, 936),
    "AGX Orin 64GB": (87, 16, 1.3, 204.8),
    "Orin Nano 8GB": (87, 8, 0.625, 68),
}
ARCHS = (86, 87, 89, 90)

# Weights one thread covers per iteration of the hot loop.
SIMT_CODES = 128  # gemv.cu: a batch of IB items = 4 runs of 32 codes
TC_CODES = 2 * 8 * 16  # gemv_tc.cu: two 8-run blocks, 16 codes a lane a run (rows g and g+8)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    sys.exit(f"sass_count: {name} not found (needs the CUDA toolkit or triton's bundled tools)")


SKINNY_CODES = 64  # gemm.h skinny tile: a warp's k tile is 2 runs of 32 packed rows × 32 columns
SKINNY_COPY_CODES = 64 * 128 // 128  # its k tile: 64 packed rows × 128 columns over 128 threads

PROBE_FLAGS = {"simt": [], "tc": ["-DPROBE_KERNEL_TC"], "gemm": ["-DPROBE_KERNEL_GEMM"],
               "skinny": ["-DPROBE_KERNEL_SKINNY"]}  # (the skinny probe also holds skinnycopy)


def compile_sass(arch: int, kind: str, workdir: str) -> str:
    cubin = os.path.join(workdir, f"probe_{kind}_{arch}.cubin")
    cmd = [tool("nvcc"), "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc", "cuda"),
           "-o", cubin, os.path.join(HERE, "gemv_probe.cu")] + PROBE_FLAGS[kind]
    subprocess.run(cmd, check=True)
    return subprocess.run([tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True,
                          text=True).stdout


def functions(sass: str) -> dict:
    """{mangled name: [(address, opcode, text)]}"""
    out = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = []
        for line in part.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(3) + m.group(4)))
        out[name] = ins
    return out


def hot_loop(ins: list, product: str):
    """The innermost loop (backward branch) holding `product` instructions: (first, last) index."""
    loops = []
    addr = {a: i for i, (a, _, _) in enumerate(ins)}
    for i, (a, op, text) in enumerate(ins):
        m = re.search(r"BRA\S*\s.*?(0x[0-9a-f]+)", text)
        if op == "BRA" and m and int(m.group(1), 16) < a and int(m.group(1), 16) in addr:
            lo = addr[int(m.group(1), 16)]
            if any(o == product for _, o, _ in ins[lo:i + 1]):
                loops.append((lo, i))
    if not loops:
        raise RuntimeError(f"no loop with {product} found")
    # innermost: no other such loop nested inside it
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return max(inner, key=lambda lp: lp[1] - lp[0])


def count(arch: int, workdir: str, kinds=("simt", "tc", "gemm", "skinny")) -> list:
    rows = []
    for kind in kinds:
        for name, ins in functions(compile_sass(arch, kind, workdir)).items():
            m = re.search(r"probe_(simt|tc|gemm|skinnycopy|skinny)ILi(\d+)E(?:Li(\d+)E)?", name)
            if not m:
                continue
            p1, p2 = int(m.group(2)), int(m.group(3) or 0)
            kname = m.group(1)  # the probe's kind (the skinny probe file holds two)
            lo, hi = hot_loop(ins, {"simt": "FFMA", "skinnycopy": "LDGSTS"}.get(kname, "HMMA"))
            ops = collections.Counter(op for _, op, _ in ins[lo:hi + 1])
            n = sum(ops.values())
            # weights one thread covers per iteration; for the GEMM (one m16 tile a warp) each
            # HMMA takes a lane's 4 weights of one n8 tile and k16 step
            codes = {"simt": SIMT_CODES, "tc": TC_CODES, "gemm": 4 * ops["HMMA"],
                     "skinny": SKINNY_CODES, "skinnycopy": SKINNY_COPY_CODES}[kname]
            row = {"arch": arch, "kernel": kname, "loop_instructions": n, "weights_per_iteration": codes,
                   "per_weight": n / codes, "ops": dict(ops.most_common())}
            if kname == "skinnycopy":
                row.update(bits=p1, group=128, m="9-16")
            elif kname == "skinny":
                # one k tile a warp: its RUNS / WK = 2 runs of 32 packed rows × 32 columns; its
                # branches (runs past K, groups whose first run was past K) are all taken in the
                # steady state, so the static count is the dynamic one
                row.update(bits=p1, group=32 * p2, m="9-16")
            elif kname == "tc":
                row.update(bits=p1, group=32 * p2, m="1-8")
            elif kname == "gemm":
                row.update(bits=p1, group=128, m="9-16")
            else:
                row.update(bits=p2, group=128, m=p1)
            rows.append(row)
    return rows


def budget(gpu: str, bits: int) -> float:
    _, sms, ghz, gbs = GPUS[gpu]
    return sms * 4 * 32 * ghz * 1e9 / (gbs * 1e9 * 8 / bits)


def markdown(rows: list, nvcc_version: str) -> str:
    lines = ["# CUDA GEMV and small-M GEMM: SASS instructions per weight (static count, not a measurement)", "",
             f"{nvcc_version}. Produced by `python benchmarks/static/sass_count.py` (method in its "
             "docstring): the steady-state loop of each kernel for a plain layer with fp16 x, "
             "instructions a weight (thread-level), counted from the SASS per architecture. The "
             "GEMM small-tile row is its main loop with one m16 tile a warp (M <= 16; the table's "
             "small tile has 4, of which only the first is live at M = 16); the skinny-tile row is "
             "its compute of one k tile (gemm.cu skinny_k_tile, sm_90's tile, M = 16: exact codes as "
             "A, scales per group, the folds included); neither counts the pipeline's cp.async "
             "issue, which the skinny tile's own row counts for an interior k tile (its hoisted "
             "copies of x and of 16-byte weight chunks, no residual; per weight of the block's k "
             "tile): add it to the skinny compute row.", "",
             "| kernel | bits | group | M | " + " | ".join(f"sm_{a}" for a in ARCHS) + " | main opcodes (sm_90) |",
             "|---|---|---|---|" + "---|" * len(ARCHS) + "---|"]
    keyed = collections.defaultdict(dict)
    for r in rows:
        keyed[(r["kernel"], r["bits"], r["group"], str(r["m"]))][r["arch"]] = r
    for (kernel, bits, group, m), by_arch in sorted(keyed.items()):
        ops = by_arch.get(90, next(iter(by_arch.values())))["ops"]
        top = ", ".join(f"{k} {v}" for k, v in list(ops.items())[:6])
        label = {"tc": "GEMV, tensor cores", "simt": "GEMV, SIMT", "gemm": "GEMM small tile (M <= 16)",
                 "skinny": "GEMM skinny tile (M <= 16)",
                 "skinnycopy": "GEMM skinny tile, cp.async issue"}[kernel]
        lines.append(f"| {label} | {bits} | {group} | {m} | "
                     + " | ".join(f"{by_arch[a]['per_weight']:.2f}" if a in by_arch else "-" for a in ARCHS)
                     + f" | {top} |")
    lines += ["", "Issue budget: the most instructions a weight a loop may issue and still stream the "
              "weights at the GPU's DRAM bandwidth (4 schedulers × 1 instruction a clock × 32 lanes "
              "per SM at the boost clock; vendor bandwidth). A loop above it is issue-bound.", "",
              "| GPU | arch | SMs | clock GHz | GB/s | budget 4-bit | budget 3-bit | budget 2-bit |",
              "|---|---|---|---|---|---|---|---|"]
    for gpu, (arch, sms, ghz, gbs) in GPUS.items():
        lines.append(f"| {gpu} | sm_{arch} | {sms} | {ghz} | {gbs:g} | {budget(gpu, 4):.1f} | "
                     f"{budget(gpu, 3):.1f} | {budget(gpu, 2):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "static"))
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    args = ap.parse_args(argv)
    version = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout
    version = next((ln for ln in version.splitlines() if "release" in ln), "nvcc").strip()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in (int(a) for a in args.archs.split(",")):
            rows += count(arch, d)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_sass.json"), "w") as f:
        json.dump({"nvcc": version, "gpus": GPUS, "rows": rows}, f, indent=1)
    md = markdown(rows, version)
    with open(os.path.join(args.out, "gemv_sass.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
