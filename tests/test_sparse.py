"""bitfuse.sparse: HBPMatrix (build, SpMV/SpMM on CPU, conversions), load_mtx, reorder and the
defined behaviour on bad input. Tolerances come from accumulation bounds (tests/_tolerance.py)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _tolerance import UNIT_ROUNDOFF, gamma
from bitfuse.sparse import HBPMatrix, MatrixMarketError, generate, load_mtx, reorder

SUITE = generate.suite("small")
DTYPES = (torch.float16, torch.float32, torch.float64)
NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def stored(a: sp.csr_matrix, dtype) -> sp.csr_matrix:
    """a with its values rounded to dtype, held in float64 (scipy has no float16)."""
    a = a.tocsr().copy()
    a.data = a.data.astype(NP[dtype]).astype(np.float64)
    return a


def assert_product(h: HBPMatrix, a: sp.csr_matrix, x: torch.Tensor, y: torch.Tensor):
    """|y − A·x| ≤ γ_{K+p}(acc)·|A|·|x| (+ half an ulp of the output when it is fp16), K the
    longest row and p its pieces (docs/HBP.md §3 sums pieces in a fixed order)."""
    a64 = stored(a, h.dtype)
    x64 = x.double().numpy()
    x64 = x64.reshape(a.shape[1], 1) if x64.ndim == 1 else x64
    ref = a64 @ x64
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    k = int(np.diff(a64.indptr).max(initial=0)) + 2
    bound = gamma(k, acc) * (abs(a64) @ np.abs(x64))
    if h.dtype == torch.float16:
        bound = bound + UNIT_ROUNDOFF[torch.float16] * np.abs(ref)
    err = np.abs(y.double().numpy().reshape(ref.shape) - ref)
    assert np.all(err <= bound + 1e-300), f"max err/bound {np.max(err / (bound + 1e-300)):.3g}"


@pytest.mark.parametrize("name", sorted(SUITE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spmv_spmm_every_family(name, dtype):
    a = SUITE[name]
    h = HBPMatrix.from_scipy(a, dtype=NP[dtype])
    assert h.shape == a.shape and h.dtype == dtype and h.nnz == a.nnz
    g = torch.Generator().manual_seed(0)
    for m in (None, 1, 5):
        shape = (a.shape[1],) if m is None else (a.shape[1], m)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        y = h @ x
        assert y.dtype == dtype and y.shape == ((a.shape[0],) if m is None else (a.shape[0], m))
        assert_product(h, a, x, y)
        assert torch.equal(y, h @ x)  # repeated calls: bit-identical


@pytest.mark.parametrize("name", ["rmat", "uniform_wide", "dense_row", "empty_rows_cols"])
def test_round_trip_to_scipy(name):
    a = SUITE[name]
    for dtype in (np.float32, np.float64):
        back = HBPMatrix.from_scipy(a, dtype=dtype).to_scipy()
        assert back.dtype == dtype and back.has_sorted_indices
        assert (back != a.astype(dtype)).nnz == 0
    back16 = HBPMatrix.from_scipy(a, dtype=np.float16).to_scipy()
    assert back16.dtype == np.float32  # scipy has no float16: exact upcast
    np.testing.assert_array_equal(back16.toarray(), stored(a, torch.float16).toarray())


def test_from_csr_sorts_and_sums_duplicates():
    indptr = np.array([0, 4, 4, 7])
    indices = np.array([3, 1, 3, 0, 2, 0, 2])
    values = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    h = HBPMatrix.from_csr(indptr, indices, values, (3, 4))
    want = sp.csr_matrix((values, indices, indptr), shape=(3, 4))
    want.sum_duplicates()
    assert h.nnz == 5 and (h.to_scipy() != want).nnz == 0
    # fp16 duplicates are summed in float64 and rounded once: 2048 + 1 + 1 = 2050 exactly.
    h16 = HBPMatrix.from_csr([0, 3], [0, 0, 0], np.array([2048, 1, 1], np.float16), (1, 1))
    assert float(h16.to_scipy()[0, 0]) == 2050.0


def test_from_torch_csr_and_coo():
    a = SUITE["uniform"]
    dense = torch.from_numpy(a.toarray()).float()
    x = torch.randn(a.shape[1], 3)
    for t in (dense.to_sparse_csr(), dense.to_sparse()):
        h = HBPMatrix.from_torch(t)
        assert h.device == t.device and h.dtype == torch.float32
        assert_product(h, a, x, h @ x)
    with pytest.raises(TypeError, match="bfloat16"):
        HBPMatrix.from_torch(dense.bfloat16().to_sparse_csr())
    with pytest.raises(TypeError, match="sparse_csr"):
        HBPMatrix.from_torch(dense)


def test_nbytes_and_padding_are_honest():
    a = SUITE["rmat"]
    h = HBPMatrix.from_scipy(a, dtype=np.float16)
    assert h.nbytes == sum(h.layout[k].nbytes for k in
                           ("tile_coords", "tile_group_ptr", "tile_order", "tile_work",
                            "group_offset", "group_width", "group_rows", "group_slot", "cols",
                            "values", "multi_rows", "multi_ptr", "empty_rows"))
    assert h.stored >= h.nnz and h.stored < 1.5 * h.nnz  # long hub rows are split, not padded


@pytest.mark.parametrize("method", ["hash", "sort", "dp"])
def test_reorder_methods_share_the_format(method):
    a = SUITE["rmat"]
    h = reorder(a, method=method)
    assert isinstance(h, HBPMatrix) and h.method == method
    x = torch.randn(a.shape[1], dtype=torch.float64)
    assert torch.equal(h @ x, reorder(a, "hash") @ x)  # same sums in the same order
    with pytest.raises(TypeError):
        reorder(a.toarray(), method)


def test_nan_values_propagate_to_their_rows_only():
    a = sp.csr_matrix(np.array([[1.0, np.nan, 0], [0, 2.0, 0], [0, 0, 3.0]]))
    h = HBPMatrix.from_scipy(a)
    y = h @ torch.ones(3, dtype=torch.float64)
    assert torch.isnan(y[0]) and y[1] == 2.0 and y[2] == 3.0
    # inf in x reaches only the rows that reference that column
    y = h @ torch.tensor([1.0, 1.0, np.inf], dtype=torch.float64)
    assert torch.isnan(y[0]) and y[1] == 2.0 and torch.isinf(y[2])


def test_x_mismatch_errors():
    h = HBPMatrix.from_scipy(SUITE["uniform"], dtype=np.float32)
    n = h.shape[1]
    with pytest.raises(TypeError, match="float64.*float32"):
        h @ torch.zeros(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be"):
        h @ torch.zeros(n + 1)
    with pytest.raises(ValueError, match="must be"):
        h @ torch.zeros(n, 2, 2)
    with pytest.raises(ValueError, match="meta"):
        h @ torch.zeros(n, device="meta")
    y = h @ np.ones(n, np.float32)  # numpy in, numpy out
    assert isinstance(y, np.ndarray) and y.shape == (h.shape[0],)
    assert (h @ torch.zeros(n, 0)).shape == (h.shape[0], 0)


def test_cuda_device_without_index_means_the_current_one(monkeypatch):
    """H built for "cuda" must accept x.device ("cuda:N" always carries its index)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    h = HBPMatrix.from_scipy(SUITE["uniform"], dtype=np.float32, device="cuda", smem_bytes=48 << 10)
    assert h.device == torch.device("cuda:1")
    assert h.to("cuda") is h and h.to("cuda:1") is h and h.to("cuda:0") is not h


def test_from_csr_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        HBPMatrix.from_csr([0, 1], [7], [1.0], (1, 3))
    with pytest.raises(ValueError, match="non-decreasing"):
        HBPMatrix.from_csr([0, 2, 1, 2], [0, 1], [1.0, 1.0], (3, 3))
    with pytest.raises(ValueError, match="one entry per index"):
        HBPMatrix.from_csr([0, 1], [0], [1.0, 2.0], (1, 3))
    with pytest.raises(ValueError, match="shape"):
        HBPMatrix.from_csr([0, 1], [0], [1.0], (1, -3))
    with pytest.raises(TypeError, match="dtype="):
        HBPMatrix.from_csr([0, 1], [0], np.array([1], np.int64), (1, 3))
    with pytest.raises(TypeError, match="integer"):
        HBPMatrix.from_csr([0, 1], [0.5], [1.0], (1, 3))
    with pytest.raises(ValueError, match="method"):
        HBPMatrix.from_csr([0, 1], [0], [1.0], (1, 3), method="magic")
    h = HBPMatrix.from_csr([0, 1], [0], np.array([3], np.int64), (1, 3), dtype=torch.float32)
    assert h.dtype == torch.float32


@settings(max_examples=30)
@given(n_rows=st.integers(0, 90), n_cols=st.integers(0, 90), density=st.floats(0, 0.4),
       tile_rows=st.sampled_from([0, 32, 64]), tile_cols=st.sampled_from([0, 1, 7, 32]),
       dtype=st.sampled_from(DTYPES), m=st.integers(1, 3), seed=st.integers(0, 2**16),
       method=st.sampled_from(["hash", "sort", "dp"]))
def test_random_shapes(n_rows, n_cols, density, tile_rows, tile_cols, dtype, m, seed, method):
    rng = np.random.default_rng(seed)
    a = sp.random(n_rows, n_cols, density=density, random_state=rng, format="csr")
    h = HBPMatrix.from_scipy(a, dtype=NP[dtype], tile_rows=tile_rows or None,
                             tile_cols=tile_cols or None, method=method)
    x = torch.from_numpy(rng.standard_normal((n_cols, m))).to(dtype)
    assert_product(h, a, x, h @ x)
    assert (h.to_scipy() != stored(a, dtype)).nnz == 0


# ------------------------------------------------------------------------ Matrix Market reader
def _write(tmp_path, text, name="m.mtx"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_mtx_coordinate_rows_are_rows(tmp_path):
    p = _write(tmp_path, "%%MatrixMarket matrix coordinate real general\n% comment\n\n"
                         "2 3 3\n1 3 5.0\n2 1 -1.5\n% inline comment\n1 3 1.0\n")
    a = load_mtx(p)
    assert isinstance(a, sp.csr_matrix) and a.shape == (2, 3)
    np.testing.assert_array_equal(a.toarray(), [[0, 0, 6.0], [-1.5, 0, 0]])  # duplicate summed


@pytest.mark.parametrize("header, body, want", [
    ("coordinate integer general", "2 2 2\n1 2 7\n2 2 -3\n", [[0, 7], [0, -3]]),
    ("coordinate pattern general", "2 2 2\n1 1\n2 1\n", [[1, 0], [1, 0]]),
    ("coordinate real symmetric", "2 2 2\n1 1 1\n2 1 4\n", [[1, 4], [4, 0]]),
    ("coordinate real skew-symmetric", "2 2 1\n2 1 4\n", [[0, -4], [4, 0]]),
    ("array real general", "2 3\n1\n2\n3\n4\n5\n6\n", [[1, 3, 5], [2, 4, 6]]),
    ("array real symmetric", "2 2\n1\n2\n3\n", [[1, 2], [2, 3]]),
    ("array real skew-symmetric", "3 3\n1\n2\n3\n", [[0, -1, -2], [1, 0, -3], [2, 3, 0]]),
    ("coordinate real general", "0 0 0\n", np.zeros((0, 0))),
])
def test_mtx_variants(tmp_path, header, body, want):
    a = load_mtx(_write(tmp_path, f"%%MatrixMarket matrix {header}\n{body}"))
    np.testing.assert_array_equal(a.toarray(), np.array(want, dtype=np.float64).reshape(a.shape))


def test_mtx_gzip(tmp_path):
    p = tmp_path / "m.mtx.gz"
    with gzip.open(p, "wt") as f:
        f.write("%%MatrixMarket matrix coordinate real general\n1 2 1\n1 2 3.5\n")
    assert load_mtx(p).toarray().tolist() == [[0, 3.5]]


@pytest.mark.parametrize("text, msg", [
    ("", "not a Matrix Market file"),
    ("%%MatrixMarket matrix coordinate real\n1 1 0\n", "not a Matrix Market file"),
    ("%%MatrixMarket vector coordinate real general\n1 1 0\n", "object"),
    ("%%MatrixMarket matrix coordinate complex general\n1 1 0\n", "complex"),
    ("%%MatrixMarket matrix coordinate real weird\n1 1 0\n", "symmetry"),
    ("%%MatrixMarket matrix array pattern general\n1 1\n", "pattern"),
    ("%%MatrixMarket matrix coordinate real general\n", "size line"),
    ("%%MatrixMarket matrix coordinate real general\n2 x 1\n", "size line"),
    ("%%MatrixMarket matrix coordinate real general\n2 2\n", "size line"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 3\n1 1 1\n2 2 2\n", "truncated"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n2 2\n", "malformed"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n1 1 abc\n", "malformed"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n1 1 1\n2 2 2\n", "announces"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n3 1 1\n", "row index 3"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n1 0 1\n", "column index 0"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n1.5 1 1\n", "integers"),
    ("%%MatrixMarket matrix coordinate real symmetric\n2 3 0\n", "square"),
    ("%%MatrixMarket matrix coordinate real skew-symmetric\n2 2 1\n1 1 1\n", "diagonal"),
    ("%%MatrixMarket matrix array real general\n2 2\n1\n2\n3\n", "truncated"),
    ("%%MatrixMarket matrix coordinate pattern general\n2 2 1\n1 1 1\n", "2 numbers"),
])
def test_mtx_bad_files(tmp_path, text, msg):
    with pytest.raises(MatrixMarketError, match=msg):
        load_mtx(_write(tmp_path, text))


def test_mtx_then_hbp(tmp_path):
    a = SUITE["poisson2d"]
    coo = a.tocoo()
    lines = [f"{r + 1} {c + 1} {float(v)!r}" for r, c, v in zip(coo.row, coo.col, coo.data)]
    p = _write(tmp_path, "%%MatrixMarket matrix coordinate real general\n"
                         f"{a.shape[0]} {a.shape[1]} {a.nnz}\n" + "\n".join(lines) + "\n")
    b = load_mtx(p)
    assert (b != a).nnz == 0
    h = HBPMatrix.from_scipy(b)
    x = torch.randn(a.shape[1], dtype=torch.float64)
    assert_product(h, a, x, h @ x)
