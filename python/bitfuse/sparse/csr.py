"""CSR SpMV/SpMM baselines on CUDA (csrc/cuda/hbp.cu), for the HBP benchmark: a scalar kernel
(one thread per row) and a vector kernel (one warp per row, deterministic xor-butterfly sum).

    y = csr_spmv(indptr, indices, values, x, kernel="vector")   # x (n_cols,) or (n_cols, m)

CUDA tensors only (a CUDA entry point without a GPU raises RuntimeError); int32 indptr and
indices; values and x of one dtype (fp16, fp32 or fp64; fp16 accumulates in fp32). With
check=True the structure is validated on the host first (a device-to-host copy: keep it off the
timed path); with check=False indices are trusted, as torch's sparse ops trust theirs.
"""

from __future__ import annotations

import torch

from .. import _C
from .hbp import DTYPE_CODES

CSR_KERNELS = ("scalar", "vector")


def csr_spmv(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
             kernel: str = "vector", check: bool = True, out: torch.Tensor = None) -> torch.Tensor:
    """y = A @ x for the CSR matrix (indptr, indices, values) with x.shape[0] columns."""
    if kernel not in CSR_KERNELS:
        raise ValueError(f"csr_spmv: kernel must be one of {CSR_KERNELS}, got {kernel!r}")
    for name, t in (("indptr", indptr), ("indices", indices), ("values", values), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"csr_spmv: {name} must be a torch tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"csr_spmv: {name} is on {t.device}, x on {x.device}")
    if indptr.dtype != torch.int32 or indices.dtype != torch.int32:
        raise TypeError(f"csr_spmv: indptr and indices must be int32, got {indptr.dtype}, {indices.dtype}")
    if indptr.dim() != 1 or indices.dim() != 1 or values.dim() != 1 or indptr.numel() < 1:
        raise ValueError("csr_spmv: indptr, indices and values must be 1-D (indptr non-empty)")
    if values.numel() != indices.numel():
        raise ValueError(f"csr_spmv: {values.numel()} values for {indices.numel()} indices")
    if values.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"csr_spmv: values must be fp16, fp32 or fp64, got {values.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"csr_spmv: x is {x.dtype}, values are {values.dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"csr_spmv: x must be (n_cols,) or (n_cols, m), got {tuple(x.shape)}")
    if x.device.type != "cuda":
        raise ValueError(f"csr_spmv: the CSR baselines run on CUDA tensors only, got {x.device}")
    n_rows, n_cols = indptr.numel() - 1, x.shape[0]
    if check:
        # Raises ValueError naming the bad position (indptr order/ends, index range).
        _C.hbp_canonicalize(indptr.cpu().numpy(), indices.cpu().numpy(), n_rows, n_cols)
    x2 = x.reshape(n_cols, 1) if x.dim() == 1 else x
    m = x2.shape[1]
    y = out if out is not None else torch.empty(n_rows, m, dtype=x.dtype, device=x.device)
    if y.shape != (n_rows, m) or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"csr_spmv: out must be ({n_rows}, {m}) {x.dtype} on {x.device}")
    if n_rows == 0 or m == 0:  # nothing to write (and empty tensors have a null data_ptr)
        return y.reshape(n_rows) if x.dim() == 1 else y
    if n_cols == 0:  # every row is empty: y = 0
        y.zero_()
        return y.reshape(n_rows) if x.dim() == 1 else y
    code = DTYPE_CODES[x.dtype]
    with torch.cuda.device(x.device):
        _C.csr_spmm_cuda(indptr.data_ptr(), indices.data_ptr() if indices.numel() else 0,
                         values.data_ptr() if values.numel() else 0, x2.data_ptr(), y.data_ptr(),
                         n_rows, n_cols, m, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
                         code, kernel, torch.cuda.current_stream(x.device).cuda_stream)
    return y.reshape(n_rows) if x.dim() == 1 else y


csr_spmm = csr_spmv
