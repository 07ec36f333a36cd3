"""Layer 2: the fused Triton kernels against the torch reference.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it); with one,
`pytest -m gpu` runs the same checks compiled (test_gpu_triton below), on larger shapes too.
"""

import copy
import itertools

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear, reference
from _tolerance import assert_within, branch_magnitudes, matmul_bound
from _spies import count_calls
from synthetic import heavy_tailed, linear_from

triton = pytest.importorskip("triton")
from bitfuse.kernels import KernelConfig, fused_linear  # noqa: E402
from bitfuse.kernels import tuning  # noqa: E402

N, K = 100, 200  # neither is a multiple of any tile; K pads to the group size

BRANCHES = {
    "plain": dict(),
    "bias": dict(),
    "residual": dict(residual=0.5),
    "mixed": dict(mixed_bits=True),
    "lowrank": dict(rank=5),
    "sparse": dict(outliers=0.01),
    "all": dict(residual=True, mixed_bits=True, rank=5, outliers=0.005),
}
# Compact scales (FORMAT.md §5.1), with and without every other branch; not in BRANCHES, whose
# K = 200 is too narrow for them at g128 (a layer takes them with at least 4 groups a row).
COMPACT_BRANCHES = {
    "compact": dict(compact_scales=True),
    "all+compact": dict(BRANCHES["all"], compact_scales=True),
}
_LAYERS = {}


def layer(bits: int, group: int, branch: str, n: int = N, k: int = K) -> QuantLinear:
    key = (bits, group, branch, n, k)
    if key not in _LAYERS:
        kw = dict({**BRANCHES, **COMPACT_BRANCHES}[branch])
        if kw.pop("mixed_bits", False):
            # three classes for W3 "mixed"; two elsewhere (with the outliers out, the flattest
            # rows of W3 "all" gain nothing from b-1, and the calibrator rightly refuses it).
            # avg_bits counts the 32-bit-per-row permutation too (32/K = 0.16 bpw here), so W3
            # "all" needs 3.5 to afford one 16-row 4-bit class. W3 "mixed" asks 2.95, not 3.0: at
            # the GPU sweep's K = 1000, plain W3 meets 3.0 without a permutation and the
            # calibrator rightly keeps one class.
            kw["mixed_bits"], kw["avg_bits"] = {2: ((2, 3), 2.4), 3: ((2, 3, 4), 2.95), 4: ((3, 4), 3.8),
                                                -3: ((3, 4), 3.5)}[-bits if branch.startswith("all") and bits == 3 else bits]
        lin = linear_from(heavy_tailed(n, k, seed=bits * group, outlier_channels=8),
                          bias=branch in ("bias", "all"))
        q = QuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=group, **kw))
        if "mixed_bits" in kw:
            assert len(q.class_bits) > 1, "the mixed case must really have several bit classes"
        if kw.get("compact_scales"):
            assert q.packed.compact_scales, "the compact case must really store compact scales"
        _LAYERS[key] = q
    return _LAYERS[key]


def check(q: QuantLinear, x: torch.Tensor, y: torch.Tensor, path: str, what: str):
    pw = q.packed
    y_ref = reference.linear(x, pw)
    mags = branch_magnitudes(q)
    # GEMM rounds the dequantized weight to x's dtype for tl.dot; GEMV multiplies in fp32.
    operand = x.dtype if (path == "gemm" and x.dtype != torch.float32) else None
    bound = matmul_bound(x.float(), mags, x.dtype, y_ref=y_ref, operand_dtype=operand, bias=pw.bias)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert_within(y, y_ref, bound, what)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("bits,group,branch", list(itertools.product([2, 3, 4], [32, 64, 128], BRANCHES)))
def test_fused_kernel_matches_reference(bits, group, branch, m):
    q = layer(bits, group, branch)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    path = tuning.choose_path(m, "cpu")
    check(q, x, fused_linear(x, q.packed), path, f"W{bits} g{group} {branch} M={m} {path}")


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bits,group,branch", list(itertools.product([2, 3, 4], [32, 64, 128],
                                                                      COMPACT_BRANCHES)))
def test_fused_kernel_compact_scales(bits, group, branch, m):
    q = layer(bits, group, branch, k=520)  # 5 to 17 groups a row: compact at every group size
    x = torch.randn(m, 520, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    path = tuning.choose_path(m, "cpu")
    check(q, x, fused_linear(x, q.packed), path, f"W{bits} g{group} {branch} M={m} {path}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("branch", ["plain", "all"])
def test_fused_kernel_other_dtypes(dtype, m, branch):
    q = layer(3, 64, branch)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    path = tuning.choose_path(m, "cpu")
    check(q, x, fused_linear(x, q.packed), path, f"{dtype} M={m} {branch}")


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_paths_can_be_forced_and_agree(monkeypatch, path):
    q = layer(4, 32, "all")
    x = torch.randn(5, K).to(torch.float16)
    monkeypatch.setenv("BITFUSE_TRITON_PATH", path)
    check(q, x, fused_linear(x, q.packed), path, f"forced {path}")


@pytest.mark.parametrize("split_k", [1, 3, 7])
def test_split_k_is_deterministic_and_correct(split_k):
    q = layer(2, 32, "all")
    x = torch.randn(2, K).to(torch.float16)
    cfg = KernelConfig("gemv", 2, 16, 32, split_k=split_k)
    y1, y2 = fused_linear(x, q.packed, cfg), fused_linear(x, q.packed, cfg)
    assert torch.equal(y1, y2)
    check(q, x, y1, "gemv", f"split_k={split_k}")


def test_quantlinear_forward_runs_triton_under_the_interpreter(monkeypatch):
    # The contract: BITFUSE_BACKEND=triton runs the Triton kernels through the normal
    # QuantLinear forward (on CPU tensors under TRITON_INTERPRET=1).
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the GPU run is test_gpu_triton")
    import bitfuse.kernels.launch as launch

    calls = count_calls(monkeypatch, launch)
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    q = layer(3, 32, "all")
    x = torch.randn(2, 3, K).to(torch.float16)
    y = q(x)
    assert calls, "the Triton launcher was not called"
    check(q, x.reshape(-1, K), y.reshape(-1, N), "gemv", "QuantLinear forward")


def test_bad_inputs():
    q = layer(4, 32, "plain")
    with pytest.raises(ValueError, match=r"x must be \(M, 200\)"):
        fused_linear(torch.randn(2, 199).half(), q.packed)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        fused_linear(torch.randn(2, K).double(), q.packed)
    assert fused_linear(torch.randn(0, K).half(), q.packed).shape == (0, N)


def test_autotune_cache_round_trip(tmp_path):
    cache = tuning.AutotuneCache(str(tmp_path / "a.json"))
    cfg = KernelConfig("gemm", 32, 64, 64, 1, 4, 3)
    cache.put("k", cfg)
    assert tuning.AutotuneCache(str(tmp_path / "a.json")).get("k") == cfg
    times = iter([3.0, 1.0, 2.0])
    cands = [KernelConfig("gemv", 1, 32, 32), KernelConfig("gemv", 1, 64, 32), KernelConfig("gemv", 1, 64, 64)]
    tuning._CACHE = tuning.AutotuneCache(str(tmp_path / "b.json"))
    best = tuning.autotune("key", cands, lambda c: None, lambda fn: next(times))
    assert best == cands[1] and tuning._CACHE.get("key") == cands[1]


def test_a_config_the_gpu_refuses_is_shrunk_and_remembered(monkeypatch):
    """OutOfResources (shared memory) at launch: fewer stages, then smaller tiles, until one
    launches; the fitted config is reused without retrying, and a config that never fits raises."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(tuning, "_FITTED", {})
    ran = []

    def launch(cfg):  # pretend only <= 2 stages and K tiles of 32 fit
        ran.append(cfg)
        if cfg.num_stages > 2 or cfg.block_k > 32:
            raise OutOfResources(300000, 232448, "shared memory")

    cfg = KernelConfig("gemm", 64, 64, 64, 1, 4, 4)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        got = tuning.launch_fitting(("k",), cfg, launch)
    # stages down to 2 first, then the K tile; a single stage only when the tiles cannot shrink
    assert got == KernelConfig("gemm", 64, 64, 32, 1, 4, 2)
    assert [(c.num_stages, c.block_k) for c in ran] == [(4, 64), (3, 64), (2, 64), (2, 32)]
    ran.clear()
    assert tuning.launch_fitting(("k",), cfg, launch) == got and ran == [got]
    def never(cfg):
        raise OutOfResources(1, 0, "shared memory")

    with pytest.warns(RuntimeWarning), pytest.raises(OutOfResources):
        tuning.launch_fitting(("other",), cfg, never)
    assert tuning.shrink(KernelConfig("gemv", 1, 16, 32, 1, 4, 2)) == KernelConfig("gemv", 1, 16, 32, 1, 4, 1)
    assert tuning.shrink(KernelConfig("gemv", 1, 16, 32, 1, 4, 1)) is None


def test_an_explicit_config_is_launched_as_given(monkeypatch):
    """Benchmarks label timings with the config they pass: it must not be swapped for a fitted one."""
    called = []
    monkeypatch.setattr(tuning, "launch_fitting", lambda *a: called.append(a))
    q = layer(4, 32, "plain")
    fused_linear(torch.randn(2, K).half(), q.packed, KernelConfig("gemv", 2, 16, 32, split_k=1))
    assert called == []
    fused_linear(torch.randn(2, K).half(), q.packed)
    assert len(called) == 1


def test_block_k_must_hold_whole_runs():
    q = layer(4, 32, "plain")
    for bk in (16, 96):
        with pytest.raises(ValueError, match="power of two >= 32"):
            fused_linear(torch.randn(2, K).half(), q.packed, KernelConfig("gemm", 16, 16, bk))


@pytest.mark.parametrize("table", ["h100", "rtx30"])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_every_gpu_table_config_under_the_interpreter(table, path):
    """The configs a GPU launches (the tables per target; orin shares h100's, rtx40 rtx30's), not
    only the interpreter's small ones: real tile sizes, split-K from the grid, 8 warps, N tiles
    clipped at mixed-class boundaries (N = 1088 gives the 64-row class alignment of real layers)."""
    q = layer(4, 64, "all", n=1088, k=300)
    assert q.class_rows[0] % 128 == 64  # a 128-row N tile must be clipped there
    for bound, cfg in tuning.TABLES[table][path]:
        m = bound if path == "gemv" else min(bound, 70)
        x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m)).half()
        check(q, x, fused_linear(x, q.packed, cfg), path, f"{table} {cfg} M={m}")


@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("bits,branch", [(4, "all"), (3, "mixed"), (3, "all"), (2, "residual")])
def test_k_tiles_of_several_runs(path, bits, branch):
    """The CI configs use 32-column K tiles (one run each); the GPU tables use 64 and 128. Tiles of
    2 and 4 runs at group 128 (the dequant unpacks each run of a tile from its own words)."""
    q = layer(bits, 128, branch, n=160, k=300)
    x = torch.randn(5, 300).half()
    for bk in (64, 128):
        cfg = KernelConfig(path, 4 if path == "gemv" else 16, 16, bk, split_k=2)
        check(q, x, fused_linear(x, q.packed, cfg), path, f"W{bits} {branch} {path} block_k={bk}")


@pytest.mark.parametrize("m,forced,which,paths", [
    (1, "", "auto", {"gemv", "gemm"}), (16, "", "auto", {"gemv", "gemm"}),
    (tuning.CROSSOVER_MAX_M + 1, "", "gemm", {"gemm"}), (4, "gemv", "gemv", {"gemv"}),
    (4, "gemm", "gemm", {"gemm"})])
def test_autotune_measures_the_crossover(monkeypatch, m, forced, which, paths):
    """Near the crossover both paths are autotune candidates (the faster is cached); a forced
    path, or an M far above it, tunes one path only."""
    monkeypatch.setenv("BITFUSE_TRITON_PATH", forced)
    key, cands = tuning.tuning_candidates(m, "h100")
    assert key == which and {c.path for c in cands} == paths
    assert len(set(cands)) == len(cands)  # no candidate measured twice


# ---- compiled, on a GPU -------------------------------------------------------------------------

GPU_SWEEP = list(itertools.product([2, 3, 4], ["plain", "residual", "mixed", "all", "all+compact"]))


def test_gpu_sweep_layers_are_what_they_claim():
    """The GPU sweep's layers (K = 1000, N = 1088) build here with the classes and scale form
    their names promise; a layer that does not would fail every GPU case of it on the device."""
    for bits, branch in GPU_SWEEP:
        layer(bits, 64, branch, n=1088, k=1000)  # asserts inside


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 64, 256, 1024, 8192])
@pytest.mark.parametrize("bits,branch", GPU_SWEEP)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton(m, bits, branch, dtype):
    """The compiled kernels over M from the GEMV to many GEMM M tiles. Rows of the product are
    independent, so at M = 8192 every row is checked finite and a sample (first and last M tiles,
    200 random) against the reference: the fp64 bound of every row costs seconds of CPU each."""
    q = layer(bits, 64, branch, n=1088, k=1000)
    x = torch.randn(m, 1000, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = fused_linear(x.cuda(), copy.deepcopy(q).cuda().packed).cpu()
    path = tuning.choose_path(m, "h100")
    if m > 1024:
        assert torch.isfinite(y).all()
        rows = torch.cat([torch.arange(128), torch.arange(m - 128, m),
                          torch.randperm(m, generator=torch.Generator().manual_seed(2))[:200]])
        x, y = x[rows], y[rows]
    check(q, x, y, path, f"GPU W{bits} {branch} M={m} {dtype}")
