"""Matrix Market (.mtx, .mtx.gz) reader: returns a scipy CSR matrix with float64 values.

Supported: `matrix coordinate|array`, `real|integer|pattern`, `general|symmetric|skew-symmetric`.
Row indices are the first column of an entry line and column indices the second (the seed code
swapped them). Coordinate duplicates are summed; pattern entries are 1.0; symmetric and skew
matrices store the lower triangle and are mirrored (skew with a minus sign). Every malformed or
truncated file raises MatrixMarketError (a ValueError) that names the file and the problem.
"""

from __future__ import annotations

import gzip
import io
import os
import warnings

import numpy as np

FORMATS = ("coordinate", "array")
FIELDS = ("real", "integer", "pattern", "double")  # "double" is a common alias of real
SYMMETRIES = ("general", "symmetric", "skew-symmetric")


class MatrixMarketError(ValueError):
    pass


def _open(path):
    path = os.fspath(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="latin-1") if gz else open(path, "rt", encoding="latin-1")


def load_mtx(path):
    """Read a Matrix Market file into a scipy.sparse.csr_matrix (float64)."""
    import scipy.sparse as sp

    name = os.fspath(path)

    def bad(msg):
        return MatrixMarketError(f"{name}: {msg}")

    with _open(path) as f:
        header = f.readline()
        words = header.strip().lower().split()
        if len(words) != 5 or words[0] != "%%matrixmarket":
            raise bad("not a Matrix Market file (first line must be "
                      "'%%MatrixMarket matrix <format> <field> <symmetry>')")
        obj, fmt, field, sym = words[1:]
        if obj != "matrix":
            raise bad(f"object '{obj}' is not supported (only 'matrix')")
        if fmt not in FORMATS:
            raise bad(f"format '{fmt}' is not one of {FORMATS}")
        if field == "complex" or sym == "hermitian":
            raise bad("complex and hermitian matrices are not supported")
        if field not in FIELDS:
            raise bad(f"field '{field}' is not one of {FIELDS}")
        if sym not in SYMMETRIES:
            raise bad(f"symmetry '{sym}' is not one of {SYMMETRIES}")
        if fmt == "array" and field == "pattern":
            raise bad("an array file cannot have the pattern field")

        size_line = ""
        for line in f:
            if line.strip() and not line.lstrip().startswith("%"):
                size_line = line
                break
        want = 3 if fmt == "coordinate" else 2
        try:
            dims = [int(t) for t in size_line.split()]
        except ValueError:
            raise bad(f"size line {size_line.strip()!r} is not {want} integers") from None
        if len(dims) != want or min(dims) < 0:
            raise bad(f"size line {size_line.strip()!r} must hold {want} non-negative integers")
        n_rows, n_cols = dims[0], dims[1]
        if sym != "general" and n_rows != n_cols:
            raise bad(f"a {sym} matrix must be square, got {n_rows} x {n_cols}")
        body = f.read()

    per_line = (2 if field == "pattern" else 3) if fmt == "coordinate" else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty body is fine when no entry is expected
            data = np.loadtxt(io.StringIO(body), comments="%", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise bad(f"malformed entry line ({e})") from None
    if data.size == 0:
        data = data.reshape(0, per_line)
    if data.shape[1] != per_line:
        raise bad(f"entry lines must hold {per_line} numbers for {fmt} {field}, found "
                  f"{data.shape[1]}")
    if fmt == "array":
        return _from_array(data[:, 0], n_rows, n_cols, sym, bad)

    nnz = dims[2]
    if data.shape[0] < nnz:
        raise bad(f"truncated: the size line announces {nnz} entries, found {data.shape[0]}")
    if data.shape[0] > nnz:
        raise bad(f"{data.shape[0]} entries, but the size line announces {nnz}")
    if not np.all(np.isfinite(data[:, :2])) or np.any(data[:, :2] != np.floor(data[:, :2])):
        raise bad("row and column indices must be integers")
    rows = data[:, 0].astype(np.int64) - 1
    cols = data[:, 1].astype(np.int64) - 1
    vals = np.ones(nnz) if field == "pattern" else data[:, 2].copy()
    for what, idx, n in (("row", rows, n_rows), ("column", cols, n_cols)):
        out = (idx < 0) | (idx >= n)
        if out.any():
            k = int(np.argmax(out))
            raise bad(f"entry {k + 1}: {what} index {idx[k] + 1} is outside 1..{n}")
    if sym != "general":
        if sym == "skew-symmetric" and np.any(rows == cols):
            raise bad("a skew-symmetric matrix cannot store diagonal entries")
        off = rows != cols
        sign = -1.0 if sym == "skew-symmetric" else 1.0
        rows, cols, vals = (np.concatenate([rows, cols[off]]), np.concatenate([cols, rows[off]]),
                            np.concatenate([vals, sign * vals[off]]))
    a = sp.coo_matrix((vals, (rows, cols)), shape=(n_rows, n_cols)).tocsr()
    a.sum_duplicates()
    return a


def _from_array(vals, n_rows, n_cols, sym, bad):
    """Dense column-major body; symmetric files hold the lower triangle (skew: strictly lower)."""
    import scipy.sparse as sp

    if sym == "general":
        need = n_rows * n_cols
    else:
        need = n_rows * (n_rows + 1) // 2 if sym == "symmetric" else n_rows * (n_rows - 1) // 2
    if vals.size < need:
        raise bad(f"truncated: expected {need} values, found {vals.size}")
    if vals.size > need:
        raise bad(f"{vals.size} values, but the size line implies {need}")
    if sym == "general":
        dense = vals.reshape(n_cols, n_rows).T
    else:
        k = 0 if sym == "symmetric" else -1
        # Column-major lower triangle = row-major upper triangle of the transpose.
        iu = np.triu_indices(n_rows, k=-k)
        upper = np.zeros((n_rows, n_rows))
        upper[iu] = vals
        low = upper.T
        dense = low + (low.T if sym == "symmetric" else -low.T)
        if sym == "symmetric":
            dense[np.diag_indices(n_rows)] = np.diag(low)
    return sp.csr_matrix(dense)
