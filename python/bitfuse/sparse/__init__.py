"""Sparse matrices in the HBP (hash-based partitioned) format: SpMV/SpMM on CPU and GPU.

    import bitfuse.sparse as bs
    A = bs.load_mtx("matrix.mtx")          # scipy CSR
    H = bs.HBPMatrix.from_scipy(A)         # the build runs in C++ (bitfuse._C)
    y = H @ x                              # x: (cols,) or (cols, m) torch tensor, same dtype

docs/HBP.md describes the layout and the kernels; generate.py makes the test matrices;
csr_spmv runs the CUDA CSR baselines; outliers.apply is QuantLinear's sparse branch on HBP.
"""

from .hbp import HBPMatrix, reorder
from .mtx import MatrixMarketError, load_mtx
from .csr import csr_spmm, csr_spmv
from . import generate, outliers

__all__ = ["HBPMatrix", "reorder", "load_mtx", "MatrixMarketError", "generate", "csr_spmv",
           "csr_spmm", "outliers"]
