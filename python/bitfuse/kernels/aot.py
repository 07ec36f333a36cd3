"""Compile the Triton kernels for a GPU architecture without a GPU (ahead of time, no launch).

The CPU interpreter checks what the kernels compute, not whether they compile: it accepts things
the real compiler refuses (a dot tile under 16, a mixed-dtype dot, an int64/int32 mismatch in a
loop carry, ...) and it knows nothing of shared memory or registers. This module runs the normal
launchers (`launch._launch`, `conv_launch._launch`, `hbp.hbp_spmm`) on CPU tensors while triton's
active driver is a stand-in that reports the chosen `GPUTarget` and `JITFunction.run` only
compiles (its `warmup` mode): every kernel the launch would start goes through the whole
TTIR → TTGIR → LLVM → PTX → ptxas pipeline for that arch, and nothing runs.

Per compiled kernel it records the shared memory triton asks for (checked against the arch's
per-block opt-in limit, which is what makes a launch fail with OutOfResources on a GPU) and, from
the cubin, registers and per-thread local memory (`cuobjdump -res-usage`, bundled with triton;
the stack frame is where ptxas puts register spills). These are compiler facts, not speeds.

Must run in a process where TRITON_INTERPRET is unset when bitfuse.kernels is imported (triton
decides interpreted vs compiled when a kernel is defined): `python -m bitfuse.kernels.aot`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

# Per-block dynamic shared memory opt-in limit (bytes), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 8.6/8.9 → 99 KB, 8.7 → 163 KB, 9.0 → 227 KB.
SMEM_OPTIN = {86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

def _target(arch: int) -> str:
    """The target profile whose config tables a GPU of this arch gets (launch.target_for)."""
    from .launch import _TARGET_BY_CAPABILITY
    return _TARGET_BY_CAPABILITY[divmod(arch, 10)]



@dataclass
class CompiledInfo:
    arch: int
    kernel: str
    case: str            # which launch asked for it
    num_warps: int
    num_stages: int
    shared: int          # bytes per block
    regs: int = -1       # per thread, from the cubin (-1: cuobjdump unavailable)
    stack_bytes: int = -1  # per-thread stack frame: register spills, local arrays (ptxas ABI)
    local_bytes: int = -1  # per-thread local memory outside the stack frame
    constexprs: str = ""

    @property
    def smem_ok(self) -> bool:
        return self.shared <= SMEM_OPTIN[self.arch]


class _StandInDriver:
    """Just enough of triton's DriverBase for `JITFunction.run(warmup=True)`: a target and a
    (fake) device and stream. The device id is the arch, so each arch gets its own binder cache."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def is_active(self):
        return True


_res_re = re.compile(r"Function ([^:\s]+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _nvidia_tool(name: str) -> Optional[str]:
    """A CUDA tool bundled with triton's nvidia backend (ptxas, cuobjdump)."""
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def _cuobjdump() -> Optional[str]:
    return _nvidia_tool("cuobjdump")


def _ptxas_version() -> str:
    tool = _nvidia_tool("ptxas")
    if tool is None:
        return "unknown"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([0-9.]+)", out)
    return m.group(1) if m else "unknown"


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """{'regs', 'stack_bytes', 'local_bytes'} of the one kernel in a cubin (cuobjdump -res-usage)."""
    tool = _cuobjdump()
    if tool is None:
        return {"regs": -1, "stack_bytes": -1, "local_bytes": -1}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _res_re.search(text)
    if not m:
        raise RuntimeError(f"bitfuse aot: cannot read cuobjdump -res-usage output:\n{text}")
    return {"regs": int(m.group(2)), "stack_bytes": int(m.group(3)), "local_bytes": int(m.group(5))}


@contextlib.contextmanager
def compile_only(arch: int, record: List[CompiledInfo], case: List[str]) -> Iterator[None]:
    """Inside: triton kernels launched from this process compile for `arch` and do not run.
    Each compiled kernel is appended to `record`, labelled with case[0] at that moment."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bitfuse aot: unset TRITON_INTERPRET (kernels defined under the interpreter "
                           "cannot be compiled)")
    orig_run = JITFunction.run
    seen = set()

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kernel.hash if hasattr(kernel, "hash") else id(kernel))
        if key not in seen:
            seen.add(key)
            md = kernel.metadata
            consts = {k[0] if isinstance(k, tuple) and len(k) == 1 else k: v
                      for k, v in getattr(kernel.src, "constants", {}).items()} if hasattr(kernel, "src") else {}
            info = CompiledInfo(arch, self.fn.__name__, case[0], md.num_warps, md.num_stages, md.shared,
                                constexprs=_constexpr_text(self, consts))
            if "cubin" in kernel.asm:
                usage = resource_usage(kernel.asm["cubin"])
                info.regs, info.stack_bytes, info.local_bytes = (usage["regs"], usage["stack_bytes"],
                                                                 usage["local_bytes"])
            record.append(info)
        return kernel

    prev = dict(vars(driver))  # restored whole: the attribute names differ across triton versions
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = orig_run
        vars(driver).clear()
        vars(driver).update(prev)


def _constexpr_text(fn, consts) -> str:
    names = [p.name for p in fn.params]
    parts = []
    for k, v in consts.items():
        name = names[k] if isinstance(k, int) and k < len(names) else str(k)
        if name.startswith(("BLOCK", "BITS", "SPLIT", "GROUP", "USE_DOT", "DOT_FP32", "HAS_", "R_PAD", "N_CLASSES")):
            parts.append(f"{name}={v}")
    return " ".join(sorted(parts))


# ---------------------------------------------------------------- what gets compiled


# Layers whose launches cover every specialization the kernels have: each code width's loop
# (BITS 2/3/4), one to three bit classes, and every branch. Heavy-tailed weights, so the mixed
# recipes really split into classes (checked below).
LAYERS = {
    #  name: (bits, group, mixed_bits, avg_bits, branches, expected class widths, compact scales)
    "w4g128": (4, 128, None, None, False, [4], False),
    "mixed3": (3, 64, (2, 3, 4), 3.0, False, [4, 2, 3], False),
    "mixed+all": (3, 64, (2, 3, 4), 3.5, True, [4, 3], False),
    # the COMPACT=True kernels (compact scales, FORMAT.md §5.1), three classes
    "mixed3+compact": (3, 64, (2, 3, 4), 3.0, False, [4, 2, 3], True),
}
FULL_LAYERS = {
    "w3g32+all": (3, 32, None, None, True, [3], False),
    "w2g64": (2, 64, None, None, False, [2], False),
}


def _layer(name: str, k: int = 512, n: int = 1024):
    """A packed layer from LAYERS/FULL_LAYERS. N = 1024 gives mixed classes the 64-row alignment
    of real layers (pack.row_align_for), so the tiles are the ones such layers get."""
    import torch

    from ..calibrate import calibrate
    from ..config import QuantConfig
    from ..synthetic import heavy_tailed

    bits, group, mixed_bits, avg_bits, branches, classes, compact = {**LAYERS, **FULL_LAYERS}[name]
    w = heavy_tailed(n, k, seed=3, outlier_channels=8)
    kw = dict(bits=bits, group_size=group, mixed_bits=mixed_bits, avg_bits=avg_bits,
              compact_scales=compact)
    if branches:
        kw.update(residual=True, rank=8, outliers=0.002)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(0)) if branches else None
    pw = calibrate(w, QuantConfig(**kw), bias=bias, method="rtn")
    if list(pw.class_bits) != classes or pw.compact_scales != compact:
        # the cases would silently cover less than they claim
        raise RuntimeError(f"bitfuse aot: layer {name} calibrated to classes {pw.class_bits} "
                           f"(compact scales: {pw.compact_scales}), expected {classes} ({compact})")
    return pw


def linear_cases(arch: int, full: bool):
    """(label, thunk) pairs: each thunk launches the fused linear once with one config."""
    import torch

    from . import launch, tuning
    from ..targets import PROFILES

    target = _target(arch)
    sms = PROFILES[target].sms
    names = list(LAYERS) + (list(FULL_LAYERS) if full else [])
    cases = []
    for lname in names:
        pw = _layer(lname)
        geo = launch.class_geometry(pw)
        for dtype in (torch.float16, torch.bfloat16):
            # bf16 changes only the tl.dot operands: the GEMV path multiplies in fp32 either way.
            for path in ("gemv", "gemm") if dtype == torch.float16 or full else ("gemm",):
                cfgs = [(bound, cfg) for bound, cfg in tuning.TABLES[target][path]]
                if full:
                    cfgs += [(min(bound, 1024), c) for bound, _ in cfgs for c in tuning.candidates(path, bound)]
                done = set()
                for bound, cfg in cfgs:
                    m = min(bound, 1024) if path == "gemm" else bound
                    fitted = launch._fit(cfg, pw, m, geo[1], geo[2], sms)
                    if (fitted, m > 64) in done:
                        continue
                    done.add((fitted, m > 64))

                    # Everything the launch needs is bound now: the thunks run after the loop.
                    def thunk(pw=pw, geo=geo, dtype=dtype, m=m, fitted=fitted):
                        x = torch.zeros(m, pw.in_features, dtype=dtype)
                        out = torch.empty(m, pw.out_features, dtype=dtype)
                        launch._launch(x, pw, out, fitted, *geo, False)
                    cases.append((f"linear {lname} {str(dtype)[6:]} M={m} {_cfg_text(fitted)}", thunk))
    return cases


def conv_cases(arch: int, full: bool):
    """A 3×3 conv (mixed classes, every branch) with every table config, NCHW input, plus
    channels-last input (the other A-tile order) at the largest tile."""
    import torch

    from . import conv_launch, launch, tuning
    from ..targets import PROFILES

    target = _target(arch)
    sms = PROFILES[target].sms
    cases = []
    pw = _layer("mixed+all", k=9 * 64)
    geo = launch.class_geometry(pw)
    for dtype in (torch.float16, torch.bfloat16):
        for path in ("gemv", "gemm") if dtype == torch.float16 else ("gemm",):  # bf16 matters to tl.dot
            table = tuning.TABLES[target][path]
            for i, (bound, cfg) in enumerate(table):
                m = min(bound, 1024)
                layouts = ("nchw", "channels_last") if path == "gemm" and i == len(table) - 1 else ("nchw",)
                for layout in layouts:
                    x = torch.zeros(1, 64, 1, m, dtype=dtype)  # a 1 × m image: M = m output pixels
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    fitted = launch._fit(cfg, pw, m, geo[1], geo[2], sms)
                    geom = ((3, 3), (1, 1), (1, 1), (1, 1), 1, m)

                    def thunk(x=x, fitted=fitted, geom=geom):
                        out = torch.empty(1, geom[4], geom[5], pw.out_features, dtype=x.dtype)
                        conv_launch._launch(x, pw, out, fitted, *geo, geom, False)
                    cases.append((f"conv3x3 mixed+all {layout} {str(dtype)[6:]} M={m} {_cfg_text(fitted)}", thunk))
    return cases


def hbp_cases(arch: int, full: bool):
    import scipy.sparse as sp
    import torch

    from ..sparse import HBPMatrix
    from . import hbp

    cases = []
    # Narrow column tiles, so rows span several tiles and the split-row reduction kernel runs too.
    a = sp.random(200, 300, density=0.05, format="csr", random_state=0)
    for dtype in (torch.float16, torch.float32, torch.float64):  # x has the matrix's dtype
        h = HBPMatrix.from_scipy(a, dtype=dtype, tile_cols=64)
        for m in (1, 8):
            def thunk(h=h, m=m, dtype=dtype):
                x = torch.zeros(h.shape[1], m, dtype=dtype)
                hbp.hbp_spmm(h.device_arrays(), x, h.shape, h.tile_shape[1])
            cases.append((f"hbp {str(dtype)[6:]} m={m}", thunk))
    return cases


FAMILIES = ("linear", "conv", "hbp")


def _cfg_text(cfg) -> str:
    return (f"{cfg.path} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} split={cfg.split_k} "
            f"w={cfg.num_warps} s={cfg.num_stages}")


def check(archs: List[int], full: bool = False, families=("linear", "conv", "hbp"),
          progress=None) -> dict:
    """Compile every case for every arch. Returns {'kernels': [...], 'errors': [...], ...}."""
    import triton

    makers = {"linear": linear_cases, "conv": conv_cases, "hbp": hbp_cases}
    assert tuple(makers) == FAMILIES
    record: List[CompiledInfo] = []
    errors = []
    t0 = time.time()
    case = [""]
    for arch in archs:
        if arch not in SMEM_OPTIN:
            raise ValueError(f"bitfuse aot: arch must be one of {sorted(SMEM_OPTIN)}, got {arch}")
        with compile_only(arch, record, case):
            for fam in families:
                for label, thunk in makers[fam](arch, full):
                    case[0] = label
                    if progress:
                        progress(arch, label)
                    try:
                        thunk()
                    except Exception as e:  # noqa: BLE001 - a compile failure is the result
                        errors.append({"arch": arch, "case": label, "error": f"{type(e).__name__}: {e}"[:4000]})
    kernels = [asdict(r) | {"smem_ok": r.smem_ok} for r in record]
    return {
        "triton": triton.__version__,
        "ptxas": _ptxas_version(),
        "archs": archs,
        "full": full,
        "seconds": round(time.time() - t0, 1),
        "kernels": kernels,
        "errors": errors,
        "smem_over": [k for k in kernels if not k["smem_ok"]],
        "local_memory": [k for k in kernels if k["stack_bytes"] > 0 or k["local_bytes"] > 0],
    }


def markdown(report: dict) -> str:
    lines = [f"# Triton {report['triton']} (ptxas {report['ptxas']}): ahead-of-time compile for "
             f"sm_{', sm_'.join(map(str, report['archs']))}", "",
             f"{len(report['kernels'])} kernels compiled, {len(report['errors'])} errors, "
             f"{len(report['smem_over'])} over the shared memory limit, {report['seconds']} s wall (kernels "
             "already in triton's cache are not recompiled). Compiler "
             "facts from `python -m bitfuse.kernels.aot` (no GPU; nothing ran): shared memory per block, "
             "registers per thread, stack frame per thread (where spills go).", "",
             "## Worst case per arch and kernel", "",
             "| arch | kernel | compiled | max smem B (limit) | max regs | max stack B |", "|---|---|---|---|---|---|"]
    worst: Dict[tuple, list] = {}
    for k in report["kernels"]:
        w = worst.setdefault((k["arch"], k["kernel"]), [0, 0, 0, 0])
        w[0] += 1
        w[1], w[2], w[3] = max(w[1], k["shared"]), max(w[2], k["regs"]), max(w[3], k["stack_bytes"])
    for (arch, name), (n, smem, regs, stack) in sorted(worst.items()):
        lines.append(f"| sm_{arch} | {name} | {n} | {smem} ({SMEM_OPTIN[arch]}) | {regs} | {stack} |")
    lines += ["", "## Every compiled kernel", "",
              "| arch | kernel | case | warps | stages | smem B | regs | stack B | local B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in report["kernels"]:
        flag = "" if k["smem_ok"] else " **over the limit**"
        lines.append(f"| sm_{k['arch']} | {k['kernel']} | {k['case']} | {k['num_warps']} | {k['num_stages']} | "
                     f"{k['shared']}{flag} | {k['regs']} | {k['stack_bytes']} | {k['local_bytes']} |")
    for e in report["errors"]:
        lines.append(f"\nERROR sm_{e['arch']} {e['case']}: {e['error']}")
    return "\n".join(lines) + "\n"


def _check_in_processes(archs: List[int], args) -> dict:
    """check() with the archs split over args.jobs child processes (ptxas and triton's passes are
    single-threaded), merged into one report."""
    t0 = time.time()
    jobs = min(args.jobs, len(archs))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j in range(jobs):
            part = archs[j::jobs]
            out = os.path.join(tmp, f"{j}.json")
            cmd = [sys.executable, "-m", "bitfuse.kernels.aot", "--arch", ",".join(map(str, part)),
                   "--families", args.families, "--json", out, "--quiet"] + (["--full"] if args.full else [])
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out))
        parts = []
        for proc, out in procs:
            _, err = proc.communicate()
            if not os.path.exists(out):
                raise RuntimeError(f"bitfuse aot: a child process failed (rc {proc.returncode}):\n{err[-4000:]}")
            with open(out) as f:
                parts.append(json.load(f))
    report = dict(parts[0], archs=archs, seconds=round(time.time() - t0, 1))
    for key in ("kernels", "errors", "smem_over", "local_memory"):
        report[key] = [item for part in parts for item in part[key]]
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfuse.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="86,87,89,90", help="comma-separated: 86,87,89,90")
    p.add_argument("--full", action="store_true", help="also every autotune candidate and more layers")
    p.add_argument("--families", default="linear,conv,hbp")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write a table here")
    p.add_argument("--jobs", type=int, default=1, help="compile the archs in this many processes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a]
    except ValueError:
        p.error(f"--arch takes comma-separated numbers such as 86,90, got {args.arch!r}")
    if not archs or set(archs) - set(SMEM_OPTIN):
        p.error(f"--arch must name some of {sorted(SMEM_OPTIN)}, got {args.arch!r}")
    families = tuple(f for f in args.families.split(",") if f)
    if not families or set(families) - set(FAMILIES):
        p.error(f"--families must name some of {','.join(FAMILIES)}, got {args.families!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled")
    if args.jobs > 1 and len(archs) > 1:
        report = _check_in_processes(archs, args)
    else:
        prog = None if args.quiet else (lambda arch, label: print(f"sm_{arch}: {label}", file=sys.stderr, flush=True))
        report = check(archs, args.full, families, prog)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(report))
    print(f"compiled {len(report['kernels'])} kernels for sm_{','.join(map(str, archs))} in "
          f"{report['seconds']} s; errors {len(report['errors'])}, over the smem limit "
          f"{len(report['smem_over'])}, using local memory (spills) {len(report['local_memory'])}")
    for e in report["errors"]:
        print(f"ERROR sm_{e['arch']} {e['case']}:\n{e['error']}", file=sys.stderr)
    for k in report["smem_over"]:
        print(f"SMEM sm_{k['arch']} {k['kernel']} {k['case']}: {k['shared']} B > {SMEM_OPTIN[k['arch']]} B",
              file=sys.stderr)
    return 1 if report["errors"] or report["smem_over"] else 0


if __name__ == "__main__":
    sys.exit(main())
