"""Seeded test matrices for HBP (ARCHITECTURE.md §5); no downloads. Every function returns a
scipy CSR matrix with float64 values drawn from N(0, 1) (except where the structure says).

suite(max_nnz) gives the named families the tests and the preprocessing benchmark use.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _rng(seed):
    return np.random.default_rng(seed)


def _csr(rows, cols, shape, rng) -> sp.csr_matrix:
    a = sp.coo_matrix((rng.standard_normal(len(rows)), (rows, cols)), shape=shape).tocsr()
    a.sum_duplicates()
    return a


def rmat(scale: int, edge_factor: int = 8, abc=(0.57, 0.19, 0.19), seed=0) -> sp.csr_matrix:
    """R-MAT / Kronecker power-law graph as Graph500 makes it: 2^scale vertices, about
    edge_factor · 2^scale edges (duplicates summed), quadrant probabilities a, b, c, d."""
    rng = _rng(seed)
    n, m = 1 << scale, edge_factor << scale
    a, b, c = abc
    rows = np.zeros(m, np.int64)
    cols = np.zeros(m, np.int64)
    for bit in range(scale):  # one quadrant choice per level of the recursion
        u = rng.random(m)
        down = u >= a + b                        # quadrants c or d: lower half
        right = ((u >= a) & (u < a + b)) | (u >= a + b + c)  # quadrants b or d: right half
        rows |= down.astype(np.int64) << bit
        cols |= right.astype(np.int64) << bit
    perm = rng.permutation(n)  # Graph500 relabels vertices so hubs are not all at index 0
    return _csr(perm[rows], perm[cols], (n, n), rng)


def poisson2d(n: int) -> sp.csr_matrix:
    """5-point Laplacian on an n × n grid (n² rows)."""
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    i = sp.identity(n)
    return (sp.kron(t, i) + sp.kron(i, t)).tocsr()


def poisson3d(n: int) -> sp.csr_matrix:
    """7-point Laplacian on an n × n × n grid (n³ rows)."""
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    i = sp.identity(n)
    return (sp.kron(sp.kron(t, i), i) + sp.kron(sp.kron(i, t), i) + sp.kron(sp.kron(i, i), t)).tocsr()


def banded(n: int, bandwidth: int, seed=0) -> sp.csr_matrix:
    """n × n with every entry |i − j| ≤ bandwidth stored."""
    rng = _rng(seed)
    offs = list(range(-bandwidth, bandwidth + 1))
    diags = [rng.standard_normal(n - abs(k)) for k in offs]
    return sp.diags(diags, offs, shape=(n, n)).tocsr()


def uniform(n_rows: int, n_cols: int, nnz_per_row: float, seed=0) -> sp.csr_matrix:
    """Entries at uniformly random positions, nnz_per_row on average."""
    rng = _rng(seed)
    m = int(round(n_rows * nnz_per_row))
    return _csr(rng.integers(0, max(n_rows, 1), m), rng.integers(0, max(n_cols, 1), m),
                (n_rows, n_cols), rng)


def block_diagonal(n_blocks: int, block: int, density: float = 0.5, seed=0) -> sp.csr_matrix:
    """n_blocks square blocks of size `block` on the diagonal, each `density` full."""
    rng = _rng(seed)
    blocks = [sp.random(block, block, density=density, random_state=rng, format="csr",
                        data_rvs=rng.standard_normal) for _ in range(n_blocks)]
    return sp.block_diag(blocks, format="csr")


def dense_row(n_rows: int, n_cols: int, row: int = None, seed=0) -> sp.csr_matrix:
    """One fully dense row among empty ones (the worst load imbalance)."""
    rng = _rng(seed)
    row = n_rows // 2 if row is None else row
    return _csr(np.full(n_cols, row), np.arange(n_cols), (n_rows, n_cols), rng)


def empty_rows_cols(n_rows: int, n_cols: int, nnz_per_row: float = 4, seed=0) -> sp.csr_matrix:
    """Random entries only in every third row and every other column: whole empty rows and
    columns, including the first row and the last column."""
    rng = _rng(seed)
    live_r = np.arange(1, n_rows, 3)
    live_c = np.arange(0, max(n_cols - 1, 0), 2)
    if live_r.size == 0 or live_c.size == 0:
        return sp.csr_matrix((n_rows, n_cols))
    m = int(round(live_r.size * nnz_per_row))
    return _csr(rng.choice(live_r, m), rng.choice(live_c, m), (n_rows, n_cols), rng)


def row_vector(n: int, density: float = 0.5, seed=0) -> sp.csr_matrix:
    """1 × n."""
    return sp.random(1, n, density=density, random_state=_rng(seed), format="csr")


def col_vector(n: int, density: float = 0.5, seed=0) -> sp.csr_matrix:
    """n × 1."""
    return sp.random(n, 1, density=density, random_state=_rng(seed), format="csr")


def suite(size: str = "small", seed=0) -> dict:
    """Named matrices of every family. 'small' keeps each under ~20k nonzeros (tests); 'large'
    goes up to about 10M nonzeros (the preprocessing benchmark)."""
    if size == "small":
        return {
            "rmat": rmat(9, 8, seed=seed),
            "poisson2d": poisson2d(24),
            "poisson3d": poisson3d(9),
            "banded": banded(700, 5, seed=seed),
            "uniform": uniform(600, 900, 6, seed=seed),
            "uniform_wide": uniform(40, 70000, 60, seed=seed),  # several column tiles
            "block_diagonal": block_diagonal(12, 24, seed=seed),
            "dense_row": dense_row(300, 5000, seed=seed),
            "empty_rows_cols": empty_rows_cols(500, 400, seed=seed),
            "empty": sp.csr_matrix((64, 48)),
            "row_1xN": row_vector(3000, seed=seed),
            "col_Nx1": col_vector(3000, seed=seed),
            "tile_multiple": uniform(1024, 256, 5, seed=seed),  # 1024 rows: whole 64..1024 tiles
        }
    if size == "large":
        return {
            "rmat_s20": rmat(20, 8, seed=seed),
            "poisson2d_1000": poisson2d(1000),
            "poisson3d_100": poisson3d(100),
            "banded_1M": banded(1 << 20, 3, seed=seed),
            "uniform_1M": uniform(1 << 20, 1 << 20, 8, seed=seed),
            "uniform_wide": uniform(4096, 1 << 24, 512, seed=seed),
            "block_diagonal": block_diagonal(2000, 64, seed=seed),
            "dense_row": dense_row(1 << 20, 1 << 20, seed=seed),
            "row_1xN": row_vector(4_000_000, 0.5, seed=seed),
            "col_Nx1": col_vector(4_000_000, 0.5, seed=seed),
        }
    raise ValueError(f"size must be 'small' or 'large', got {size!r}")
