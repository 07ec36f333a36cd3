"""Layer 5 (GPU machines only, `pytest -m gpu`): the CUDA backend against the torch reference."""

import copy
import functools
import itertools

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear, reference
from _tolerance import assert_within, matmul_bound
from synthetic import heavy_tailed, linear_from

pytestmark = pytest.mark.gpu

CONFIGS = {
    "plain": {},
    "residual": dict(residual=True),
    "residual-part": dict(residual=0.3),
    "mixed": dict(mixed_bits=(2, 3, 4), residual=True),
    "all": dict(residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005),
    "all+compact": dict(residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005, compact_scales=True),
}


# Mixed widths with a budget that really splits the rows (with avg_bits = bits, the default, the
# 32-bit-per-row permutation makes one class cheaper and the calibrator keeps it): the budgets of
# tests/test_triton.py. With outliers taken out, W3's flattest rows gain nothing from 2 bits.
MIXED = {2: ((2, 3), 2.4), 3: ((2, 3, 4), 2.95), 4: ((3, 4), 3.8)}
MIXED_W3_WITH_OUTLIERS = ((3, 4), 3.5)
MIXED_MIN_K = 128  # narrower layers (48 x 33, K = 77) keep one class: the degenerate case, on purpose


def _mixed(kw: dict, bits: int) -> dict:
    """kw with mixed_bits/avg_bits set for `bits` when the config asks for mixed widths."""
    kw = dict(kw)
    if "mixed_bits" in kw:
        mb = MIXED_W3_WITH_OUTLIERS if bits == 3 and kw.get("outliers") else MIXED[bits]
        kw["mixed_bits"], kw["avg_bits"] = mb
    return kw


def _quantize(lin, cfg: QuantConfig) -> QuantLinear:
    """QuantLinear.from_linear; a compact-scale case whose layer has too few groups a row for
    them (it keeps fp16 pairs, which the other cases cover) is skipped, not silently run; a mixed
    case wide enough must really have several bit classes (else it tests one class)."""
    q = QuantLinear.from_linear(lin, cfg)
    if cfg.compact_scales and not q.packed.compact_scales:
        pytest.skip(f"{q.packed.n_groups} groups a row: compact scales need >= 4 (FORMAT.md §5.1)")
    if cfg.mixed_bits and q.in_features >= MIXED_MIN_K:
        assert len(q.class_bits) > 1, f"mixed case {cfg} kept one class {q.class_bits}"
    return q


def _cuda_ready():
    b = bitfuse.backends()["cuda"]
    if not b["available"]:
        pytest.fail(f"GPU present but the cuda backend is unavailable: {b['reason']}")


@pytest.mark.parametrize("bits,name,g", list(itertools.product([2, 3, 4], CONFIGS, [32, 128])))
@pytest.mark.parametrize("n,k", [(256, 200), (1088, 1000)])
def test_cuda_dequantize_matches_reference(bits, name, g, n, k):
    _cuda_ready()
    kw = _mixed(CONFIGS[name], bits)
    q = _quantize(linear_from(heavy_tailed(n, k, seed=bits)), QuantConfig(bits=bits, group_size=g, **kw))
    ref = reference.dense_weight(q.packed)
    from bitfuse.backend_cuda import dequantize_dense

    qc = q.cuda()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = dequantize_dense(qc.packed, dtype).float().cpu()
        # q*s+m in fp32 (fma vs mul+add: a few ulps), then one rounding to the output dtype.
        tol = ref.abs() * (4 * 2.0**-24 + (0 if dtype == torch.float32 else
                                           {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype])) + 1e-6
        assert bool(((got - ref).abs() <= tol).all()), f"{dtype}: max err {float((got - ref).abs().max())}"


@pytest.mark.parametrize("m", [1, 7, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_linear_matches_reference(m, dtype):
    _cuda_ready()
    cfg = QuantConfig(bits=3, group_size=64, residual=0.5, rank=8, **_mixed(dict(mixed_bits=True, outliers=0.005), 3))
    q = _quantize(linear_from(heavy_tailed(512, 384, seed=1)), cfg)
    x = torch.randn(m, 384).to(dtype)
    y_ref = reference.linear(x, q.packed)
    y = q.cuda()(x.cuda()).cpu()
    W = q.dequantize().abs()
    # the CUDA path rounds Ŵ to x's dtype for the tensor cores (the GEMM, M > 8; the GEMV keeps
    # it exact), with fp32 accumulation.
    bound = matmul_bound(x.float(), [W], dtype, y_ref=y_ref, operand_dtype=dtype)
    assert_within(y, y_ref, bound, f"cuda linear M={m} {dtype}")


# ---- the fused CUDA GEMVs, M <= 8: tensor-core (csrc/cuda/gemv_tc.cu) and SIMT (gemv.cu) --------

GEMV_CONFIGS = {
    "plain": {},
    "residual": dict(residual=0.5),
    "mixed": dict(mixed_bits=(2, 3, 4), residual=True),
    "all": dict(residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005),
    # compact scales (FORMAT.md §5.1) where the layer has >= 4 groups a row (not 48x33)
    "all+compact": dict(residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005, compact_scales=True),
}


@functools.lru_cache(maxsize=None)
def _gemv_layer_cpu(bits, name, n, k, g) -> QuantLinear:
    kw = _mixed(GEMV_CONFIGS[name], bits)
    lin = linear_from(heavy_tailed(n, k, seed=bits + n))
    lin.bias = torch.nn.Parameter(torch.randn(n) * 0.1)
    return _quantize(lin, QuantConfig(bits=bits, group_size=g, **kw))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("name", list(GEMV_CONFIGS))
@pytest.mark.parametrize("n,k,g", [(257, 200, 32), (1088, 1000, 64), (96, 4103, 128), (48, 33, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_cuda_gemv_matches_reference(bits, name, n, k, g, dtype, kernel):
    """Every M in 1..8 through backend_cuda.gemv vs the fp32 reference (odd K and N included)."""
    _cuda_ready()
    from _tolerance import branch_magnitudes, factored_branch_magnitudes
    from bitfuse.backend_cuda import gemv

    q = _gemv_layer_cpu(bits, name, n, k, g)  # one quantization for both kernels
    qc = copy.deepcopy(q).cuda()  # Module.cuda() moves in place: keep q on the CPU
    # simt: Ŵ is the reference's fp32 value bit for bit, summed in another order; tc: exact codes
    # and x on the tensor cores, scales per group in fp32 (|q·s| + |m| + |α| bounds the terms).
    mags = factored_branch_magnitudes(q) if kernel == "tc" else branch_magnitudes(q)
    for m in range(1, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        y_ref = reference.linear(x.float(), q.packed)  # fp32, before the cast
        y = gemv(x.cuda(), qc.packed, kernel=kernel).float().cpu()
        # fp32 accumulation in another order, then
        # one cast to x's dtype (operand_dtype covers the activations' own rounding: none here,
        # x is exact in fp32, so it only widens the bound by one more ulp of the dtype).
        bound = matmul_bound(x.float(), mags, dtype, y_ref=y_ref, operand_dtype=dtype,
                             bias=q.packed.bias)
        assert_within(y, y_ref, bound, f"cuda gemv {bits}b {name} {n}x{k} g{g} M={m} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_cuda_gemv_deterministic_and_unaligned_x(dtype, kernel):
    _cuda_ready()
    from bitfuse.backend_cuda import gemv

    cfg = QuantConfig(bits=4, group_size=128, residual=0.5, rank=8, **_mixed(dict(mixed_bits=True), 4))
    q_cpu = _quantize(linear_from(heavy_tailed(512, 1024, seed=3)), cfg)
    q = copy.deepcopy(q_cpu).cuda()
    buf = torch.randn(3 * 1024 + 1, dtype=dtype, device="cuda")
    x_aligned = buf[: 3 * 1024].view(3, 1024)
    x_odd = buf[1:].view(3, 1024)  # 2-byte aligned only: the kernel's 16-bit x loads
    for x in (x_aligned, x_odd):
        ys = [gemv(x, q.packed, kernel=kernel) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), "split-K reduction is not deterministic"
        y_ref = reference.linear(x.float().cpu(), q_cpu.packed)
        assert torch.allclose(ys[0].float().cpu(), y_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_cuda_gemv_sanitizer_subset(kernel, m):
    """A subset of the GEMVs for compute-sanitizer (scripts/gpu_session.sh: memcheck on all,
    racecheck on the tensor-core one at m = 5): mixed classes, every branch, K ending inside a
    run and a group, N ending inside the last 16-row block, fp16 and bf16."""
    _cuda_ready()
    from _tolerance import factored_branch_magnitudes
    from bitfuse.backend_cuda import gemv

    kw = _mixed(GEMV_CONFIGS["all"], 3)
    lin = linear_from(heavy_tailed(200, 1001, seed=7))
    lin.bias = torch.nn.Parameter(torch.randn(200) * 0.1)
    q = _quantize(lin, QuantConfig(bits=3, group_size=64, **kw))
    qc = copy.deepcopy(q).cuda()
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(m, 1001, generator=torch.Generator().manual_seed(m)).to(dtype)
        y_ref = reference.linear(x.float(), q.packed)
        y = gemv(x.cuda(), qc.packed, kernel=kernel).float().cpu()
        bound = matmul_bound(x.float(), factored_branch_magnitudes(q), dtype, y_ref=y_ref,
                             operand_dtype=dtype, bias=q.packed.bias)
        assert_within(y, y_ref, bound, f"gemv sanitizer subset {kernel} M={m} {dtype}")
    torch.cuda.synchronize()


def test_cuda_linear_uses_gemv_for_small_m(monkeypatch):
    _cuda_ready()
    import bitfuse.backend_cuda as bc

    calls = []
    real = bc.gemv
    monkeypatch.setattr(bc, "gemv", lambda x, pw: calls.append(x.shape[0]) or real(x, pw))
    q = QuantLinear.from_linear(linear_from(heavy_tailed(256, 512, seed=5)), QuantConfig(bits=4)).cuda()
    for m in (1, 8, 9):
        bc.linear(torch.randn(m, 512, dtype=torch.float16, device="cuda"), q.packed)
    assert calls == [1, 8]


# ---- the fused CUDA tensor-core GEMM (csrc/cuda/gemm.cu), M > 8 ----------------------------------

@functools.lru_cache(maxsize=None)
def _gemm_layer_cpu(bits, name, n, k, g) -> QuantLinear:
    kw = _mixed(GEMV_CONFIGS[name], bits)
    lin = linear_from(heavy_tailed(n, k, seed=bits + n + k))
    lin.bias = torch.nn.Parameter(torch.randn(n) * 0.1)
    return _quantize(lin, QuantConfig(bits=bits, group_size=g, **kw))


@functools.lru_cache(maxsize=None)
def _gemm_layer(bits, name, n, k, g):
    q = _gemm_layer_cpu(bits, name, n, k, g)
    return q, copy.deepcopy(q).cuda()  # Module.cuda() moves in place: keep q on the CPU


def _gemm_skinny(qc, m, split=0, kernel=None) -> bool:
    """Whether backend_cuda.gemm runs m rows of x on the skinny tile (its plan's tile)."""
    from bitfuse import _C
    from bitfuse.backend_cuda import gemm_kernel

    tile = _gemm_plan_of(qc, m, split, skinny=gemm_kernel(kernel) == "skinny")["tile"]
    return any(r["skinny"]["id"] == tile for r in _C.gemm_tile_table())


def _gemm_bound(q, qc, x, y_ref, rows_x, split=0, kernel=None):
    """The bound of a GEMM result: small and large tiles round Ŵ to x's dtype for the tensor
    cores (operand bound: products exact, fp32 accumulation in another order, one cast of y); the
    skinny tile sums the exact codes times x in fp32 and applies s, m, α per group (factored
    magnitudes, no rounding before the sums), then one cast."""
    from _tolerance import branch_magnitudes, factored_branch_magnitudes

    if _gemm_skinny(qc, x.shape[0], split, kernel):
        return matmul_bound(rows_x, factored_branch_magnitudes(q), x.dtype, y_ref=y_ref,
                            bias=q.packed.bias)
    return matmul_bound(rows_x, branch_magnitudes(q), x.dtype, y_ref=y_ref, operand_dtype=x.dtype,
                        bias=q.packed.bias)


def _check_gemm(q, qc, x, what, rows=None, split=0, kernel=None):
    """backend_cuda.gemm on x (CUDA, fp16/bf16) vs the fp32 reference on the CPU, on `rows` of x
    (rows of a GEMM are independent: a large M is checked on a sample); split: forced S; kernel:
    the tile M <= 16 runs on (backend_cuda.gemm_kernel)."""
    from bitfuse.backend_cuda import gemm

    y = gemm(x, qc.packed, split=split, kernel=kernel).float().cpu()
    assert bool(torch.isfinite(y).all()), what
    xs = x.cpu() if rows is None else x.cpu()[rows]
    ys = y if rows is None else y[rows]
    y_ref = reference.linear(xs.float(), q.packed)  # fp32, before the cast
    assert_within(ys, y_ref, _gemm_bound(q, qc, x, y_ref, xs.float(), split, kernel), what)
    return y


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("name", list(GEMV_CONFIGS))
@pytest.mark.parametrize("n,k,g", [(257, 200, 32), (1088, 1000, 64), (96, 4103, 128), (48, 33, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_matches_reference(bits, name, n, k, g, dtype):
    """M in {9, 16, 17, 64, 255, 1024} (skinny, small and large tiles, masked M, odd K and N) vs
    the reference."""
    _cuda_ready()
    q, qc = _gemm_layer(bits, name, n, k, g)
    for m in (9, 16, 17, 64, 255, 1024):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
        _check_gemm(q, qc, x, f"cuda gemm {bits}b {name} {n}x{k} g{g} M={m} {dtype}")


@pytest.mark.parametrize("bits,name", [(4, "all"), (3, "mixed"), (2, "residual")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_large_m(bits, name, dtype):
    """M = 8192 (many M tiles): every row finite, a sample of rows (first, last, random) exact."""
    _cuda_ready()
    q, qc = _gemm_layer(bits, name, 1088, 1000, 64)
    x = torch.randn(8192, 1000, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    rows = torch.cat([torch.arange(70), torch.arange(8192 - 70, 8192),
                      torch.randperm(8192, generator=torch.Generator().manual_seed(2))[:200]])
    _check_gemm(q, qc, x, f"cuda gemm M=8192 {bits}b {name} {dtype}", rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_deterministic_and_unaligned_x(dtype):
    """Repeated calls are bit-identical (split-K is summed in a fixed order); x views that are not
    16-byte aligned, and an odd K, go through the padded copy and give the same result."""
    _cuda_ready()
    from bitfuse.backend_cuda import gemm

    q, qc = _gemm_layer(4, "all", 512, 1024, 128)
    buf = torch.randn(40 * 1024 + 1, dtype=dtype, device="cuda")
    x_aligned = buf[: 40 * 1024].view(40, 1024)
    x_odd = buf[1:].view(40, 1024)
    for x in (x_aligned, x_odd):
        ys = [gemm(x, qc.packed) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), "the GEMM is not deterministic"
        _check_gemm(q, qc, x, f"gemm x offset {x.storage_offset()}")
    assert torch.equal(gemm(x_odd.clone(), qc.packed), gemm(x_odd, qc.packed))
    q2, qc2 = _gemm_layer(3, "mixed", 130, 1001, 64)  # K % 8 != 0: the padded path
    _check_gemm(q2, qc2, torch.randn(33, 1001, dtype=dtype, device="cuda"), "gemm odd K")


def test_cuda_linear_uses_gemm_above_8(monkeypatch):
    _cuda_ready()
    import bitfuse.backend_cuda as bc

    calls = []
    real = bc.gemm
    monkeypatch.setattr(bc, "gemm", lambda x, pw: calls.append(x.shape[0]) or real(x, pw))
    q = QuantLinear.from_linear(linear_from(heavy_tailed(256, 512, seed=5)), QuantConfig(bits=4)).cuda()
    for m in (8, 9, 16, 300):
        bc.linear(torch.randn(m, 512, dtype=torch.float16, device="cuda"), q.packed)
    assert calls == [9, 16, 300]


@pytest.mark.parametrize("m,k,split", [(9, 77, 0), (70, 333, 0), (130, 2051, 0), (17, 1999, 0),
                                       (70, 1999, 3), (16, 1999, 0), (5, 333, 3)])
def test_cuda_gemm_sanitizer_subset(m, k, split):
    """A representative subset for `compute-sanitizer --tool memcheck` (scripts/gpu_session.sh):
    mixed classes, residual, low-rank, sparse, bias; M masked in the skinny, small and large
    tiles, K ends inside a run, fp16 and bf16; split-K across blocks as planned (m = 16 / 17,
    k = 1999: a handful of N tiles, split on every GPU of the tile table) and forced (S = 3,
    skinny and large tiles)."""
    _cuda_ready()
    q, qc = _gemm_layer(3, "all", 200, k, 64)
    if (m, split) in ((17, 0), (16, 0)):
        assert _gemm_plan_of(qc, m)["split"] > 1
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
        _check_gemm(q, qc, x, f"sanitizer subset m={m} k={k} S={split or 'plan'} {dtype}", split=split)
    torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("name", ["plain", "residual", "all", "all+compact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_skinny_and_small_tiles(bits, name, dtype):
    """M <= 16 on both tiles the GEMM has for it: the skinny one (the default) and the small one
    (kernel="small"), each within its own bound of the reference, at M = 1, 8, 13, 16, groups of
    32/64/128, split as planned and forced (S = 3); the two agree within the sum of their bounds."""
    _cuda_ready()
    for n, k, g in ((1088, 1000, 64), (96, 4103, 128), (257, 200, 32)):
        q, qc = _gemm_layer(bits, name, n, k, g)
        for m in (1, 8, 13, 16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
            assert _gemm_skinny(qc, m) and not _gemm_skinny(qc, m, kernel="small")
            for split in (0, 3):
                what = f"{bits}b {name} {n}x{k} g{g} M={m} S={split or 'plan'} {dtype}"
                ys = _check_gemm(q, qc, x, what + " skinny", split=split)
                yl = _check_gemm(q, qc, x, what + " small", split=split, kernel="small")
                y_ref = reference.linear(x.cpu().float(), q.packed)
                both = (_gemm_bound(q, qc, x, y_ref, x.cpu().float(), split)
                        + _gemm_bound(q, qc, x, y_ref, x.cpu().float(), split, "small"))
                assert_within(ys, yl, both, what + ": skinny vs small")


# ---- split-K across blocks (csrc/cuda/gemm.cu split_fixup): small M × N = 4096 grids -----------

def _gemm_plan_of(qc, m, split=0, skinny=True):
    from bitfuse.backend_cuda import _gemm_plan

    pw = qc.packed
    return _gemm_plan(torch.cuda.current_device(), m, tuple(pw.class_bits), tuple(pw.class_rows),
                      pw.out_features, pw.in_features, pw.k_pad, pw.group_size, split, skinny)


def _split_counters_of(qc):
    from bitfuse.backend_cuda import _COUNTERS

    return _COUNTERS[id(qc.packed.qweight)][1]


@pytest.mark.parametrize("bits,name", [(4, "plain"), (3, "all"), (2, "mixed")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_split_k(bits, name, dtype):
    """N = 4096, K = 2048: at M = 16..64 the grid is ~64 blocks, so on a GPU with 40 or more SMs
    the plan splits K across blocks (asserted). Each M: the plan's S and forced S = 1, 2, 5 vs the
    reference; the plan's S bit-identical over repeated calls (the reduction is s = 0..S-1
    whichever block arrives last); S = 2, 5 within the fp32 summation-order bound of S = 1 (same
    operands, partials added in another order); every counter back at 0 afterwards."""
    _cuda_ready()
    from _tolerance import branch_magnitudes, factored_branch_magnitudes
    from bitfuse.backend_cuda import gemm

    q, qc = _gemm_layer(bits, name, 4096, 2048, 128)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (16, 17, 64):  # the skinny tile, then the small one
        mags = factored_branch_magnitudes(q) if _gemm_skinny(qc, m) else branch_magnitudes(q)
        x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
        xf = x.float().cpu()
        plan = _gemm_plan_of(qc, m)
        if sms >= 40:
            assert plan["split"] > 1, plan
        what = f"split-K {bits}b {name} M={m} {dtype} plan S={plan['split']}"
        y_ref = reference.linear(xf, q.packed)  # fp32, before the cast
        bound = _gemm_bound(q, qc, x, y_ref, xf)
        y = gemm(x, qc.packed).float().cpu()
        assert_within(y, y_ref, bound, what)
        for _ in range(3):
            assert torch.equal(gemm(x, qc.packed).float().cpu(), y), what + ": not deterministic"
        forced = {}
        for s in (1, 2, 5):
            forced[s] = gemm(x, qc.packed, split=s).float().cpu()
            assert_within(forced[s], y_ref, bound, f"{what}: forced S={s}")
        order = matmul_bound(xf, mags, dtype, y_ref=forced[1], bias=q.packed.bias)
        for s in (2, 5):
            assert_within(forced[s], forced[1], order, f"{what}: S={s} vs S=1")
    torch.cuda.synchronize()
    assert int(_split_counters_of(qc).abs().sum()) == 0, "split-K counters not reset"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_split_k_in_a_cuda_graph(dtype):
    """A split launch captured in a CUDA graph (after one eager call, which zeroes the layer's
    counters) replays to the eager result bit for bit, several times in a row: the counters are
    reset on the device, the workspace is a graph allocation of a shape-only size."""
    _cuda_ready()
    from bitfuse.backend_cuda import gemm

    q, qc = _gemm_layer(3, "all", 4096, 2048, 128)  # the layer test_cuda_gemm_split_k builds
    x = torch.randn(16, 2048, generator=torch.Generator().manual_seed(7)).to(dtype).cuda()
    y_eager = gemm(x, qc.packed, split=4)
    assert _gemm_plan_of(qc, 16, split=4)["split"] == 4
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gemm(x, qc.packed, split=4)  # warm-up on the side stream, as torch's recipe does
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = gemm(x, qc.packed, split=4)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_graph, y_eager)
    assert int(_split_counters_of(qc).abs().sum()) == 0
