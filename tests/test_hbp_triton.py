"""The Triton HBP kernel (bitfuse/kernels/hbp.py) under TRITON_INTERPRET=1 on CPU tensors, against the
C++ CPU product: small matrices with several column tiles, split rows and partial sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitfuse.kernels import hbp as khbp
from bitfuse.sparse import HBPMatrix, generate

CASES = {
    "uniform_tiles": lambda: generate.uniform(70, 90, 4, seed=1),
    "dense_row": lambda: generate.dense_row(40, 300, seed=2),
    "empty_rows_cols": lambda: generate.empty_rows_cols(64, 50, seed=3),
    "col_Nx1": lambda: generate.col_vector(100, seed=4),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_matches_cpu(name, dtype):
    a = CASES[name]()
    h = HBPMatrix.from_scipy(a, dtype={torch.float16: np.float16, torch.float32: np.float32,
                                       torch.float64: np.float64}[dtype],
                             tile_rows=32, tile_cols=32)
    x = torch.randn(a.shape[1], 3, dtype=torch.float64).to(dtype)
    want = h @ x  # C++ CPU path
    arrays = h.device_arrays()
    y = khbp.hbp_spmm(arrays, x, h.shape, h.tile_shape[1])
    tol = 1e-3 if dtype == torch.float16 else (1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    tickets = int(arrays["_triton_counter"])
    y2 = khbp.hbp_spmm(arrays, x, h.shape, h.tile_shape[1])
    assert torch.equal(y, y2)  # repeated calls identical
    assert int(arrays["_triton_counter"]) == tickets  # the counter restarts from 0 on every call
    programs = khbp._programs(x.device, h.n_tiles)
    per = int(khbp.FIXED_FRACTION * h.n_tiles) // programs
    assert tickets == h.n_tiles - per * programs + programs  # one failing ticket per program
