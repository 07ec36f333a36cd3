"""HBP and CSR products on CUDA (csrc/cuda/hbp.cu) and the outlier branch on HBP.

On the CPU (CI): the kernels' index math through its CPU twins (bitfuse/hbp.h, hbp_csr.h): the
persistent schedule covers every item once, the twin gives the same bits for any grid size and
right-hand-side chunking, empty rows are listed, the CSR twins match scipy; the CUDA entry points
validate their arguments and fail cleanly without a GPU; outliers.apply falls back to the
reference. With `pytest -m gpu`: the CUDA kernels against the CPU twins (bit-identical: same
fma order) and scipy (accumulation bound) over every generated family × dtype × SpMV/SpMM,
repeated calls, the counter back at zero, and the outlier branch inside a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from _cuda_probe import assert_fails_cleanly_without_gpu
from _tolerance import UNIT_ROUNDOFF, gamma
from bitfuse import QuantConfig, QuantLinear, _C, reference
from bitfuse.sparse import HBPMatrix, csr_spmv, generate, outliers
from synthetic import heavy_tailed, linear_from

SUITE = generate.suite("small")
DTYPES = (torch.float16, torch.float32, torch.float64)
NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
MS = (None, 1, 5, 11)  # SpMV, and SpMM with one chunk of 8, a partial chunk, two chunks


def _x(n_cols, m, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (n_cols,) if m is None else (n_cols, m)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _bound_check(a, dtype, x, y):
    """|y − A·x| ≤ γ_{K+2}(acc)·|A|·|x| (+ an fp16 output rounding), A rounded to dtype."""
    a64 = a.tocsr().copy()
    a64.data = a64.data.astype(NP[dtype]).astype(np.float64)
    x64 = x.double().cpu().numpy()
    x64 = x64.reshape(a.shape[1], -1)
    ref = a64 @ x64
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bound = gamma(int(np.diff(a64.indptr).max(initial=0)) + 2, acc) * (abs(a64) @ np.abs(x64))
    if dtype == torch.float16:
        # the final rounding to fp16: relative, plus half fp16's subnormal spacing (2^-25) for
        # results below 2^-14, where the relative bound does not hold (one product per row does)
        bound = bound + UNIT_ROUNDOFF[torch.float16] * np.abs(ref) + 2.0**-25
    err = np.abs(y.double().cpu().numpy().reshape(ref.shape) - ref)
    assert np.all(err <= bound + 1e-300), f"max err/bound {np.max(err / (bound + 1e-300)):.3g}"


# ---- CPU: index math of the kernels, through the twins -------------------------------------------

@pytest.mark.parametrize("n_items", [0, 1, 5, 100, 1001])
@pytest.mark.parametrize("programs", [1, 3, 7, 132, 2000])
def test_schedule_covers_every_item_once(n_items, programs):
    per, first = _C.hbp_schedule(n_items, programs)
    assert first == per * programs and first <= n_items
    assert per == (n_items // 2) // programs  # the fixed half, round robin
    static = [_C.hbp_static_item(p, k, programs) for p in range(programs) for k in range(per)]
    assert sorted(static + list(range(first, n_items))) == list(range(n_items))
    # The Triton path shares the split (HBPMatrix.schedule, FIXED_FRACTION = 0.5).
    h = HBPMatrix.from_scipy(generate.uniform(64, 64, 2), tile_rows=32, tile_cols=8)
    assert h.schedule(programs) == _C.hbp_schedule(h.n_tiles, programs)


@pytest.mark.parametrize("name", ["rmat", "uniform_wide", "dense_row", "empty_rows_cols", "col_Nx1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_twin_is_independent_of_grid_and_chunking(name, dtype):
    a = SUITE[name]
    h = HBPMatrix.from_scipy(a, dtype=NP[dtype])
    acc = np.float64 if dtype == torch.float64 else np.float32
    x = _x(a.shape[1], 11, torch.float64).numpy().astype(NP[dtype]).astype(acc)
    want = _C.hbp_spmm(h.layout, x, programs=1, mt=8)
    assert not np.isnan(want).any()  # every element written (y starts poisoned with NaN)
    for programs in (2, 7, 300):
        for mt in (1, 8):
            np.testing.assert_array_equal(_C.hbp_spmm(h.layout, x, programs=programs, mt=mt), want)
    for m in (1, 5):  # a column of a wider product is the same number as on its own
        np.testing.assert_array_equal(_C.hbp_spmm(h.layout, np.ascontiguousarray(x[:, :m]), 3, 8),
                                      want[:, :m])
    _bound_check(a, dtype, torch.from_numpy(x), torch.from_numpy(want).to(dtype))


@pytest.mark.parametrize("name", sorted(SUITE))
def test_empty_rows_are_listed(name):
    a = SUITE[name]
    h = HBPMatrix.from_scipy(a)
    want = np.flatnonzero(np.diff(a.indptr) == 0)
    np.testing.assert_array_equal(h.layout["empty_rows"], want)


def test_stage_pays():
    assert _C.hbp_stage_pays(8192, 8192, 1, 8192)       # as many slots as columns, fits
    assert not _C.hbp_stage_pays(64, 8192, 1, 8192)     # hypersparse tile: read x through L1
    assert not _C.hbp_stage_pays(10**6, 8192, 8, 8192)  # 8 right-hand sides do not fit
    assert _C.hbp_stage_pays(10**6, 1000, 8, 8192)


def test_launch_params_follow_the_matrix(monkeypatch):
    dense = HBPMatrix.from_scipy(generate.poisson2d(40))  # 1600 × 1600, ~5 per row
    assert dense.tile_shape == (1024, 1600)  # one column tile; 1024 + 576 rows
    assert dense.launch_params() == (1600, 8)  # both tiles worth staging; ~25 groups per tile
    hyper = HBPMatrix.from_scipy(generate.uniform(2048, 1 << 20, 2), tile_cols=8192)
    assert hyper.n_groups == hyper.n_tiles  # ~16 nonzeros per tile: one group each
    assert hyper.launch_params() == (0, 2)  # no tile has as many slots as columns
    monkeypatch.setenv("BITFUSE_HBP_STAGE", "never")
    assert dense.launch_params()[0] == 0


def test_validate_rejects_corrupt_layouts():
    a = generate.uniform(50, 40, 3, seed=0)
    for key, fn in [("tile_order", lambda v: np.zeros_like(v)),
                    ("empty_rows", lambda v: np.append(v, 10**6).astype(np.int32)),
                    ("cols", lambda v: np.full_like(v, 1000))]:
        h = HBPMatrix.from_scipy(a, tile_rows=32, tile_cols=16)
        h.layout[key] = fn(h.layout[key])
        with pytest.raises(ValueError, match="corrupt"):
            _C.hbp_validate(h.layout)
        with pytest.raises(ValueError, match="corrupt"):
            h.device_arrays()  # nothing corrupt ever reaches a device


@pytest.mark.parametrize("kernel", ["scalar", "vector"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_csr_twins_match_scipy(kernel, dtype):
    for name in ("rmat", "dense_row", "empty_rows_cols", "uniform"):
        a = SUITE[name].tocsr()
        vals = a.data.astype(NP[dtype])
        acc = np.float64 if dtype == torch.float64 else np.float32
        x = _x(a.shape[1], 3, dtype).numpy().astype(acc)
        y = _C.csr_spmm_host(a.indptr, a.indices, vals, x, kernel)
        assert y.dtype == acc and y.shape == (a.shape[0], 3)
        _bound_check(a, dtype, torch.from_numpy(x), torch.from_numpy(y).to(dtype))


def test_csr_vector_twin_sums_lanes_by_butterfly():
    # 64 ones and one huge value: the butterfly's order is visible in fp32 rounding.
    n = 65
    vals = np.ones(n, np.float32)
    vals[0] = 2.0**24
    ip, idx = np.array([0, n]), np.arange(n, dtype=np.int32)
    x = np.ones((n, 1), np.float32)
    seq = _C.csr_spmm_host(ip, idx, vals, x, "scalar")[0, 0]
    vec = _C.csr_spmm_host(ip, idx, vals, x, "vector")[0, 0]
    assert seq == 2.0**24  # each +1 rounds away in order
    # lane 0 holds 2^24 + 1 + 1 → 2^24 (ties to even), lanes 1..31 hold 2 each: 2^24 + 62 exactly
    assert vec == 2.0**24 + 62


def test_cuda_entries_fail_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu(
        "_C.hbp_spmm_cuda({}, 256, 256, 0, 256, 4, 4, 4, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 8, 0)",
        "tests/test_hbp_cuda.py GPU tests cover hbp_spmm_cuda")
    assert_fails_cleanly_without_gpu(
        "_C.csr_spmm_cuda(256, 256, 256, 256, 256, 4, 4, 1, 1, 1, 1, 1, 0, 'vector', 0)",
        "tests/test_hbp_cuda.py GPU tests cover csr_spmm_cuda")


def _hbp_call(**over):
    args = dict(arrays={}, x_ptr=256, y_ptr=256, partial_ptr=0, counter_ptr=256, n_rows=4,
                n_cols=4, tile_cols=4, n_tiles=0, n_multi=0, n_empty=0, n_slots=0, m=1,
                x_stride_c=1, x_stride_j=1, y_stride_r=1, y_stride_j=1, value_dtype=0, x_dtype=0,
                y_dtype=0, stage_cols=0, warps=8, stream=0)
    args.update(over)
    return args


def test_cuda_entries_validate_arguments():
    if not _C.cuda_built():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.hbp_spmm_cuda(**_hbp_call())
        return
    for over, msg in [(dict(value_dtype=2), "value_dtype"), (dict(x_dtype=3), "same dtype"),
                      (dict(value_dtype=1, x_dtype=0), "fp16 values take"),
                      (dict(value_dtype=1, x_dtype=2, y_dtype=1), "fp16 values write"),
                      (dict(warps=3), "warps"), (dict(x_stride_c=-1), "strides"),
                      (dict(tile_cols=0), "tile_cols"), (dict(m=-1), "sizes"),
                      (dict(n_tiles=1), "arrays has no"), (dict(n_slots=3), "partial_ptr"),
                      (dict(x_ptr=258), "aligned"), (dict(counter_ptr=0), "counter_ptr")]:
        with pytest.raises(ValueError, match=msg):
            _C.hbp_spmm_cuda(**_hbp_call(**over))
    csr = dict(indptr_ptr=256, indices_ptr=256, values_ptr=256, x_ptr=256, y_ptr=256, n_rows=4,
               n_cols=4, m=1, x_stride_c=1, x_stride_j=1, y_stride_r=1, y_stride_j=1, dtype=0,
               kernel="vector", stream=0)
    for over, msg in [(dict(dtype=2), "dtype"), (dict(kernel="merge"), "kernel"),
                      (dict(indptr_ptr=0), "indptr_ptr"), (dict(values_ptr=258), "aligned")]:
        with pytest.raises(ValueError, match=msg):
            _C.csr_spmm_cuda(**{**csr, **over})


def test_matmul_kernel_choice():
    h = HBPMatrix.from_scipy(SUITE["uniform"], dtype=np.float32)
    x = torch.randn(h.shape[1])
    with pytest.raises(ValueError, match="kernel"):
        h.matmul(x, kernel="cusparse")
    assert torch.equal(h.matmul(x, kernel="cuda"), h @ x)  # CPU tensors: always the C++ product


def test_csr_spmv_rejects_bad_input():
    a = SUITE["uniform"].tocsr()
    ip, idx = torch.from_numpy(a.indptr.astype(np.int32)), torch.from_numpy(a.indices)
    vals = torch.from_numpy(a.data.astype(np.float32))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        csr_spmv(ip, idx, vals, torch.zeros(a.shape[1]))
    with pytest.raises(ValueError, match="kernel"):
        csr_spmv(ip, idx, vals, torch.zeros(a.shape[1]), kernel="merge")
    with pytest.raises(TypeError, match="int32"):
        csr_spmv(ip.long(), idx, vals, torch.zeros(a.shape[1]))


def _outlier_layer(n=160, k=200, outliers_frac=0.02, seed=0):
    cfg = QuantConfig(bits=4, group_size=64, outliers=outliers_frac)
    return QuantLinear.from_linear(linear_from(heavy_tailed(n, k, seed=seed)), cfg)


def test_outliers_apply_falls_back_to_the_reference_on_cpu():
    q = _outlier_layer()
    pw = q.packed
    assert pw.nnz > 0
    x = torch.randn(3, pw.in_features).half()
    assert not outliers.uses_hbp(pw, x)
    torch.testing.assert_close(outliers.apply(pw, x), reference.sparse_apply(x.float(), pw),
                               rtol=0, atol=0)
    h = outliers.prepare(pw)
    assert h is outliers.prepare(pw)  # built once, cached
    assert h.shape == (pw.out_features, pw.in_features) and h.nnz == pw.nnz
    # The HBP form is the CSR (original output order): its CPU product is the reference's.
    y = h @ x.float().t().contiguous().half()
    ref = reference.sparse_apply(x.float(), pw).t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)


# ---- GPU ------------------------------------------------------------------------------------------

def _cuda():
    if not _C.cuda_built():
        pytest.fail("GPU present but bitfuse._C was built without CUDA")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SUITE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_hbp_every_family(name, dtype):
    dev = _cuda()
    a = SUITE[name]
    h_cpu = HBPMatrix.from_scipy(a, dtype=NP[dtype])
    h = HBPMatrix.from_scipy(a, dtype=NP[dtype], device=dev)
    for m in MS:
        x = _x(a.shape[1], m, dtype, seed=m or 0)
        want = h_cpu @ x  # the CPU twin
        xd = x.to(dev)
        y = h.matmul(xd, kernel="cuda")
        assert y.dtype == dtype and y.shape == want.shape
        assert torch.equal(y.cpu(), want), f"m={m}: max diff {float((y.cpu().double() - want.double()).abs().max())}"
        _bound_check(a, dtype, x, y)
        for _ in range(3):
            assert torch.equal(h.matmul(xd, kernel="cuda"), y)  # the counter was reset
        assert h.device_arrays()["_counter"].tolist() == [0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rmat", "uniform_wide", "dense_row", "banded"])
def test_cuda_hbp_same_bits_whether_x_is_staged_or_not(name, monkeypatch):
    dev = _cuda()
    a = SUITE[name]
    x = _x(a.shape[1], 6, torch.float32, device=dev)
    y = HBPMatrix.from_scipy(a, dtype=np.float32, device=dev).matmul(x, kernel="cuda")
    monkeypatch.setenv("BITFUSE_HBP_STAGE", "never")
    y2 = HBPMatrix.from_scipy(a, dtype=np.float32, device=dev).matmul(x, kernel="cuda")
    assert torch.equal(y, y2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rmat", "uniform_wide", "dense_row", "empty_rows_cols", "tile_multiple"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_hbp_on_gpu(name, dtype):
    dev = _cuda()
    a = SUITE[name]
    h = HBPMatrix.from_scipy(a, dtype=NP[dtype], device=dev)
    for m in (None, 5):
        x = _x(a.shape[1], m, dtype, device=dev)
        y = h.matmul(x, kernel="triton")
        _bound_check(a, dtype, x, y)
        assert torch.equal(h.matmul(x, kernel="triton"), y)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["scalar", "vector"])
@pytest.mark.parametrize("name", sorted(SUITE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_csr_baselines(kernel, name, dtype):
    dev = _cuda()
    a = SUITE[name].tocsr()
    ip = torch.from_numpy(a.indptr.astype(np.int32)).to(dev)
    idx = torch.from_numpy(a.indices.astype(np.int32)).to(dev)
    vals = torch.from_numpy(a.data.astype(NP[dtype])).to(dev)
    acc = np.float64 if dtype == torch.float64 else np.float32
    for m in MS:
        x = _x(a.shape[1], m, dtype, seed=3)
        x2 = x.reshape(a.shape[1], -1)
        want = _C.csr_spmm_host(a.indptr, a.indices, a.data.astype(NP[dtype]),
                                x2.numpy().astype(acc), kernel)
        y = csr_spmv(ip, idx, vals, x.to(dev), kernel=kernel)
        assert y.dtype == dtype
        assert torch.equal(y.cpu().reshape(want.shape), torch.from_numpy(want).to(dtype))
        _bound_check(a, dtype, x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_outliers_apply_cuda(xdtype, m):
    dev = _cuda()
    q = _outlier_layer(n=300, k=520, outliers_frac=0.01, seed=m).to(dev)
    pw = q.packed
    x = torch.randn(m, pw.in_features + 8, device=dev).to(xdtype)[:, 3:3 + pw.in_features]
    # strided rows at an odd offset (with one row, torch calls any such view contiguous)
    assert (m == 1 or not x.is_contiguous()) and x.storage_offset() == 3 and outliers.uses_hbp(pw, x)
    y = outliers.apply(pw, x)
    assert y.dtype == torch.float32 and y.shape == (m, pw.out_features)
    # Bit-identical to the CPU twin of the same layout (x exact in fp32), and within the fp32
    # accumulation bound of the reference.
    h = outliers.prepare(pw)
    twin = _C.hbp_spmm(h.layout, x.float().t().contiguous().cpu().numpy())
    assert torch.equal(y.cpu(), torch.from_numpy(twin).t())
    ref = reference.sparse_apply(x.float(), pw)
    w = reference.sparse_weight(pw).abs().double()
    k = int(torch.diff(pw.sp_indptr.long()).max()) + 2
    bound = 2 * gamma(k) * (x.float().abs().double() @ w.t()) + 1e-30
    assert bool(((y.double() - ref.double()).abs() <= bound).all())


@pytest.mark.gpu
def test_outliers_apply_in_a_cuda_graph():
    dev = _cuda()
    pw = _outlier_layer(n=256, k=384, outliers_frac=0.01).to(dev).packed
    x = torch.randn(4, pw.in_features, device=dev, dtype=torch.float16)
    outliers.prepare(pw)
    eager = outliers.apply(pw, x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        outliers.apply(pw, x)  # warm up on the capture stream
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            out = outliers.apply(pw, x)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, outliers.apply(pw, x))


@pytest.mark.gpu
def test_quantlinear_with_outliers_uses_hbp_on_cuda(monkeypatch):
    import copy

    from _tolerance import assert_within, branch_magnitudes, matmul_bound

    dev = _cuda()
    q_cpu = _outlier_layer(n=256, k=384, outliers_frac=0.01)
    mags = branch_magnitudes(q_cpu)
    q = copy.deepcopy(q_cpu).to(dev)
    calls, builds = [], []
    real_apply, real_build = outliers.apply, HBPMatrix.from_csr
    monkeypatch.setattr(outliers, "apply", lambda pw, x: calls.append(x.shape) or real_apply(pw, x))
    monkeypatch.setattr(HBPMatrix, "from_csr",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real_build(*a, **k)))
    for m in (3, 40):  # the CUDA GEMV path and the GEMM path
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, 384, dtype=torch.float32).to(dtype)
            y = q(x.to(dev)).cpu()
            y_ref = reference.linear(x, q_cpu.packed)
            bound = matmul_bound(x.float(), mags, dtype, y_ref=y_ref, operand_dtype=dtype)
            assert_within(y, y_ref, bound, f"QuantLinear M={m} {dtype}")
    assert calls, "the sparse branch did not go through bitfuse.sparse.outliers.apply"
    assert len(builds) == 1, "the HBP form must be built once per layer and device, then cached"


# ---- CPU: the kernel body with the GPU's exact arguments (hbp_spmm_twin) --------------------------

def test_float_to_half_rounds_like_numpy():
    rng = np.random.default_rng(0)
    f = np.concatenate([
        (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 18, 200_000))).astype(np.float32),
        np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 1e9, np.inf, -np.inf, np.nan,
                  2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-12),
                  1 + 2.0**-11, 1 + 3 * 2.0**-11, 1e-45], np.float32)])
    with np.errstate(over="ignore"):
        want = f.astype(np.float16).view(np.uint16)
    got = _C.hbp_float_to_half(f)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all((got[nan] & 0x7C00) == 0x7C00) and np.all(got[nan] & 0x3FF)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's storage as the twin's raw 1-D buffer (fp16/bf16 as uint16)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.element_size() == 2 else t.numpy()


CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _twin(h, x_buf, x_dtype, sxc, sxj, y_dtype, n_y, syr, syj, m, programs=5, warps=8, stage=None, mt=8):
    ny = torch.full((n_y,), float("nan"), dtype=y_dtype)
    y = _bits(ny).copy()
    _C.hbp_spmm_twin(h.layout, x_buf, CODES[x_dtype], sxc, sxj, y, CODES[y_dtype], syr, syj, m,
                     programs, warps, h.tile_shape[1] if stage is None else stage, mt)
    out = torch.from_numpy(y.view(np.int16)).view(y_dtype) if y.dtype == np.uint16 else torch.from_numpy(y)
    return out


@pytest.mark.parametrize("name", ["rmat", "uniform_wide", "dense_row", "empty_rows_cols", "poisson2d", "tile_multiple"])
@pytest.mark.parametrize("vdtype,xdtype", [(torch.float16, torch.float16), (torch.float16, torch.bfloat16),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)], ids=str)
def test_twin_with_gpu_arguments(name, vdtype, xdtype):
    """Every launch choice (grid, warps, staging, chunking) and operand layout gives the bits of
    the CPU product, for the dtype pairs the GPU runs; every element of y is written."""
    a = SUITE[name]
    h = HBPMatrix.from_scipy(a, dtype=NP[vdtype])
    n_rows, n_cols = a.shape
    acc = torch.float64 if vdtype == torch.float64 else torch.float32
    for m in (1, 3, 11):
        x = _x(n_cols, m, xdtype if xdtype != torch.bfloat16 else torch.float32, seed=m).to(xdtype)
        want = torch.from_numpy(_C.hbp_spmm(h.layout, x.to(acc).numpy()))  # (n_rows, m) in acc
        y_dtypes = [acc] + ([torch.float16] if vdtype == torch.float16 and xdtype == torch.float16 else [])
        for y_dtype in y_dtypes:
            ref = want.to(y_dtype)
            # x (n_cols, m) row-major, y (n_rows, m) row-major: H @ x.
            for programs, warps, stage, mt in [(1, 8, None, 8), (7, 2, 0, 8), (300, 4, None, 1)]:
                y = _twin(h, _bits(x), xdtype, m, 1, y_dtype, n_rows * m, m, 1, m, programs, warps, stage, mt)
                assert torch.equal(y.reshape(n_rows, m), ref), (m, y_dtype, programs, warps, stage, mt)
            # A layer's x (M=m, K=n_cols) read in place, y (M, N) written: the outlier branch.
            xt = x.t().contiguous()  # (m, n_cols)
            y = _twin(h, _bits(xt), xdtype, 1, n_cols, y_dtype, m * n_rows, 1, n_rows, m, 3, 8, None, 8)
            assert torch.equal(y.reshape(m, n_rows).t(), ref)


def test_twin_rejects_bad_arguments():
    h = HBPMatrix.from_scipy(SUITE["uniform"], dtype=np.float32)
    n_rows, n_cols = h.shape
    x = np.zeros(n_cols, np.float32)
    y = np.zeros(n_rows, np.float32)
    ok = dict(x_dtype=0, x_stride_c=1, x_stride_j=1, y=y, y_dtype=0, y_stride_r=1, y_stride_j=1, m=1,
              programs=1, warps=8, stage_cols=0, mt=1)
    _C.hbp_spmm_twin(h.layout, x, **ok)
    for over, msg in [(dict(x_stride_c=2), "too small"), (dict(y_stride_r=2), "too small"),
                      (dict(x_dtype=1), "2-byte"), (dict(y_dtype=3), "8-byte"), (dict(warps=3), "warps"),
                      (dict(mt=4), "mt")]:
        with pytest.raises(ValueError, match=msg):
            _C.hbp_spmm_twin(h.layout, x, **{**ok, **over})


def test_outlier_hbp_cache_follows_in_place_loads():
    # The HBP form is built once per layer and cached on the CSR tensors' identity. An in-place
    # load_state_dict keeps the tensors and changes their values: the cache must follow.
    cfg = QuantConfig(bits=4, group_size=64, outliers=0.01)
    torch.manual_seed(0)
    a = QuantLinear.from_linear(torch.nn.Linear(64, 32), cfg)
    b = QuantLinear.from_linear(torch.nn.Linear(64, 32), cfg)
    assert a.sp_values.numel() == b.sp_values.numel()  # same shapes: the load is in place
    h1 = outliers.prepare(a._view())
    assert outliers.prepare(a._view()) is h1  # built once
    a.load_state_dict(b.state_dict())
    h2 = outliers.prepare(a._view())
    assert h2 is not h1
    x = torch.randn(64, 3, dtype=torch.float64)
    want = reference.sparse_weight(b._view()).double() @ x
    assert torch.allclose(torch.as_tensor(h2 @ x.half()).double(), want, rtol=1e-2, atol=1e-3)


def test_outlier_hbp_cache_with_inference_tensors():
    # A layer quantized inside inference_mode holds inference tensors, which have no version
    # counter: the cache keys on identity alone for them (and still builds once).
    with torch.inference_mode():
        q = QuantLinear.from_linear(torch.nn.Linear(64, 32), QuantConfig(bits=4, group_size=64, outliers=0.01))
    h = outliers.prepare(q._view())
    assert h is not None and outliers.prepare(q._view()) is h
