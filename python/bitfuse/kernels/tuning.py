"""Launch configurations for the fused Triton kernel: per target profile and M bucket, with an
optional measured autotune whose choice is cached (in memory and on disk).

The default tables are starting points chosen from the tile shapes' arithmetic (registers,
shared memory, tensor-core minimums); none is a measured optimum yet. BITFUSE_AUTOTUNE=1 measures
the candidates on the device once per shape bucket and caches the winner in
$BITFUSE_CACHE_DIR/autotune.json (default ~/.cache/bitfuse), so only the first call is slow.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class KernelConfig:
    path: str          # "gemv" (broadcast-sum products, split-K) or "gemm" (tl.dot)
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1   # 0 = choose from the grid size and the device's SM count
    num_warps: int = 4
    num_stages: int = 2


# Largest M that takes the GEMV path per target (ARCHITECTURE.md §4: GEMV for M <= ~8). This is
# the unmeasured default; BITFUSE_TRITON_PATH=gemv|gemm overrides it. With BITFUSE_AUTOTUNE=1 the
# crossover is measured instead: for M up to CROSSOVER_MAX_M both paths are candidates and the
# faster one is cached per shape bucket (`bitfuse bench kernels` also records both paths' times
# at small M, gemv_path_us / gemm_path_us, to set this table from measurements).
GEMV_MAX_M = {"orin": 8, "rtx30": 8, "rtx40": 8, "h100": 8, "cpu": 8}
CROSSOVER_MAX_M = 32

# (M upper bound, config) per target; the first bucket whose bound is >= M applies.
# The 64×64×64 bucket uses 8 warps: with 4, a mixed-class layer with every branch compiled to
# 240-255 registers a thread (triton 3.4, 3.6; spills for the conv kernel under 3.4), with 8 to
# about 128 (AOT check, benchmarks/results/compile/).
_GEMM = [
    (16, KernelConfig("gemm", 16, 64, 64, split_k=0, num_warps=4, num_stages=3)),
    (64, KernelConfig("gemm", 32, 64, 64, split_k=0, num_warps=4, num_stages=3)),
    (256, KernelConfig("gemm", 64, 64, 64, num_warps=8, num_stages=3)),
    (1 << 62, KernelConfig("gemm", 128, 128, 32, num_warps=8, num_stages=3)),
]
# sm_86/sm_89 have 100 KB of shared memory per SM: 2 stages at M <= 256 keep 2+ blocks resident.
# The large tile uses 8 warps as on the other targets: with 4 warps, 128×64 held 254 registers and
# spilled for a mixed-class layer with every branch (AOT check, triton 3.6, sm_86/89); ptxas
# reports 32-38 KB of shared memory for 128×128×32 × 3 stages there (kernels/aot.py).
_GEMM_SMALL_SMEM = [
    (16, KernelConfig("gemm", 16, 64, 64, split_k=0, num_warps=4, num_stages=3)),
    (64, KernelConfig("gemm", 32, 64, 64, split_k=0, num_warps=4, num_stages=3)),
    (256, KernelConfig("gemm", 64, 64, 64, num_warps=8, num_stages=2)),
    (1 << 62, KernelConfig("gemm", 128, 128, 32, num_warps=8, num_stages=3)),
]
_GEMV = [
    (1, KernelConfig("gemv", 1, 64, 128, split_k=0, num_warps=4, num_stages=2)),
    (2, KernelConfig("gemv", 2, 64, 64, split_k=0, num_warps=4, num_stages=2)),
    (4, KernelConfig("gemv", 4, 32, 64, split_k=0, num_warps=4, num_stages=2)),
    (8, KernelConfig("gemv", 8, 32, 32, split_k=0, num_warps=4, num_stages=2)),
]
TABLES: Dict[str, Dict[str, list]] = {
    "h100": {"gemv": _GEMV, "gemm": _GEMM},
    "orin": {"gemv": _GEMV, "gemm": _GEMM},
    "rtx30": {"gemv": _GEMV, "gemm": _GEMM_SMALL_SMEM},
    "rtx40": {"gemv": _GEMV, "gemm": _GEMM_SMALL_SMEM},
    "cpu": {"gemv": _GEMV, "gemm": _GEMM},
}

# Small tiles for the CPU interpreter: it runs every program in numpy, so fewer, smaller tiles
# keep the tests fast; the logic under test is the same.
INTERPRETER = {
    "gemv": KernelConfig("gemv", 4, 16, 32, split_k=2),
    "gemm": KernelConfig("gemm", 16, 16, 32, split_k=1),
}


def choose_path(m: int, target: str) -> str:
    forced = forced_path()
    if forced:
        return forced
    return "gemv" if m <= GEMV_MAX_M.get(target, 8) else "gemm"


def table_config(path: str, m: int, target: str) -> KernelConfig:
    for bound, cfg in TABLES.get(target, TABLES["h100"])[path]:
        if m <= bound:
            return cfg
    return TABLES["h100"][path][-1][1]


def m_bucket(m: int) -> int:
    """Powers of two: configs are tuned per bucket, not per exact M."""
    return 1 << max(0, (m - 1).bit_length())


def candidates(path: str, m: int) -> List[KernelConfig]:
    """What the autotuner tries for one M bucket."""
    # Pruned by the AOT compile check (triton 3.6, sm_86/90, every candidate): GEMV tiles whose
    # broadcast product holds more than 128 fp32 values a thread, and 128-row GEMM tiles on 4
    # warps, spilled registers (up to 4 KB of stack a thread); they are not worth timing.
    out = []
    if path == "gemv":
        bm = min(8, m_bucket(m))
        for bn in (32, 64, 128):
            for bk in (32, 64, 128):
                if bm * bn * bk > 128 * 128:
                    continue
                for sk in (0, 1, 4):
                    out.append(KernelConfig("gemv", bm, bn, bk, split_k=sk))
    else:
        bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, m_bucket(m))]
        for bm in bms:
            for bn in (64, 128):
                for bk in (32, 64):
                    for warps, stages in ((8, 3), (8, 4)) if bm == 128 else ((4, 3), (8, 3), (4, 4)):
                        out.append(KernelConfig("gemm", bm, bn, bk, num_warps=warps, num_stages=stages))
    return out


def forced_path() -> Optional[str]:
    forced = os.environ.get("BITFUSE_TRITON_PATH", "").strip().lower()
    if forced and forced not in ("gemv", "gemm"):
        raise ValueError(f"BITFUSE_TRITON_PATH must be 'gemv' or 'gemm', got {forced!r}")
    return forced or None


def tuning_candidates(m: int, target: str) -> Tuple[str, List[KernelConfig]]:
    """(cache key part, candidates) for the autotuner: the chosen path's candidates, plus, for
    M <= CROSSOVER_MAX_M and no forced path, the other path's table config and its variants, so
    the GEMV/GEMM crossover is measured rather than assumed."""
    forced = forced_path()
    path = choose_path(m, target)
    if forced or m > CROSSOVER_MAX_M:
        return path, candidates(path, m)
    other = "gemm" if path == "gemv" else "gemv"
    base = table_config(other, m, target)
    extra = [base] + [replace(base, split_k=sk) for sk in (0, 1, 4) if sk != base.split_k]
    return "auto", candidates(path, m) + extra


class AutotuneCache:
    """Chosen configs by key, in memory and in a JSON file (written atomically)."""

    def __init__(self, path: Optional[str] = None):
        base = os.environ.get("BITFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bitfuse")
        self.path = path or os.path.join(base, "autotune.json")
        self._mem: Optional[Dict[str, dict]] = None
        self._lock = threading.Lock()

    def _load(self) -> Dict[str, dict]:
        if self._mem is None:
            try:
                with open(self.path) as f:
                    self._mem = json.load(f)
            except (OSError, ValueError):
                self._mem = {}
        return self._mem

    def get(self, key: str) -> Optional[KernelConfig]:
        d = self._load().get(key)
        try:
            return KernelConfig(**d) if d else None
        except TypeError:
            return None

    def put(self, key: str, cfg: KernelConfig) -> None:
        with self._lock:
            mem = self._load()
            mem[key] = asdict(cfg)
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                tmp = self.path + f".{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(mem, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                pass  # an unwritable cache only costs re-tuning next process


_CACHE = AutotuneCache()


def autotune(key: str, cands: List[KernelConfig], run: Callable[[KernelConfig], None],
             bench: Callable[[Callable[[], None]], float]) -> KernelConfig:
    """Measure each candidate with `bench` (e.g. triton.testing.do_bench) and cache the fastest.
    Candidates that fail to compile or launch (too much shared memory, ...) are skipped."""
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    best: Tuple[float, Optional[KernelConfig]] = (float("inf"), None)
    for cfg in cands:
        try:
            t = bench(lambda: run(cfg))
        except Exception:  # noqa: BLE001 - an unusable candidate is simply not chosen
            continue
        if t < best[0]:
            best = (t, cfg)
    if best[1] is None:
        raise RuntimeError(f"bitfuse autotune: no candidate config ran for {key}")
    _CACHE.put(key, best[1])
    return best[1]


def shrink(cfg: KernelConfig) -> Optional[KernelConfig]:
    """The next config needing less shared memory: pipeline stages down to 2, then half the K
    tile (down to one 32-column run, the dequant's unit), half the N tile, half the M tile, and
    only then a single stage (no pipelining at all); None when nothing is left to shrink."""
    min_m = 16 if cfg.path == "gemm" else 1
    if cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_k > 32:
        return replace(cfg, block_k=cfg.block_k // 2)
    if cfg.block_n > 16:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > min_m:
        return replace(cfg, block_m=cfg.block_m // 2)
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    return None


_FITTED: Dict[tuple, KernelConfig] = {}


def launch_fitting(key: tuple, cfg: KernelConfig, launch: Callable[[KernelConfig], None]) -> KernelConfig:
    """launch(cfg), or, when the GPU refuses it for lack of shared memory (triton raises
    OutOfResources before anything runs), the first `shrink` of it that launches. cfg should be
    already fitted to the layer (launch._fit), so every shrink step changes the kernel. The
    tables are checked to fit every target arch ahead of time (kernels/aot.py, in CI), so this
    only triggers on a triton version or GPU that check did not see; the config that ran is
    remembered per (key, cfg), with one warning. Returns the config that ran."""
    tried = _FITTED.get((key, cfg), cfg)
    while True:
        try:
            launch(tried)
            break
        except OutOfResources as e:
            smaller = shrink(tried)
            if smaller is None:
                raise
            if tried == cfg:
                import warnings
                warnings.warn(f"bitfuse triton: {cfg} does not fit this GPU ({e}); using smaller tiles",
                              RuntimeWarning, stacklevel=3)
            tried = smaller
    if tried != cfg:
        _FITTED[(key, cfg)] = tried
    return tried


def with_split(cfg: KernelConfig, split_k: int) -> KernelConfig:
    return replace(cfg, split_k=split_k)
