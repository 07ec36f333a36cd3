"""HBPMatrix: the Python face of the HBP format (docs/HBP.md). The build and the CPU product run
in C++ (bitfuse._C.hbp_build / hbp_spmm); on CUDA tensors the CUDA kernel (csrc/cuda/hbp.cu,
bitfuse._C.hbp_spmm_cuda) runs when bitfuse._C was built with CUDA, else the Triton kernel in
bitfuse.kernels.hbp.

Input conventions (docs/HBP.md §4): columns are sorted and duplicates summed (in float64, then
rounded once to the value dtype); NaN/inf values are stored as given and propagate through the
product as IEEE arithmetic says (like scipy); x must have the matrix's dtype and device.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from .. import _C

_NP_TO_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.float64): torch.float64}
_TORCH_TO_NP = {v: k for k, v in _NP_TO_TORCH.items()}
METHODS = ("hash", "sort", "dp")
# Share of the tiles handed out statically (round robin, heaviest first); the atomic counter
# hands out the rest (docs/HBP.md §3).
FIXED_FRACTION = 0.5
# Arrays that make up the format (what .nbytes counts and what moves to a device).
ARRAYS = ("tile_coords", "tile_group_ptr", "tile_order", "tile_work", "group_offset",
          "group_width", "group_rows", "group_slot", "cols", "values", "multi_rows", "multi_ptr",
          "empty_rows")
KERNELS = ("auto", "cuda", "triton")
# Element dtype codes of the bitfuse._C CUDA entry points (bitfuse/hbp.h DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def default_smem_bytes(device: torch.device) -> int:
    """Shared-memory budget of one block for the x slice: a quarter of the SM's shared memory
    (so about four blocks fit per SM), or 48 KiB on the CPU (an L1/L2-sized slice)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or 100 * 1024
        return max(8 * 1024, min(48 * 1024, per_sm // 4))
    return 48 * 1024


def _value_dtype(values: np.ndarray, dtype) -> np.dtype:
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            if dtype not in _TORCH_TO_NP:
                raise TypeError(f"HBP values are float16, float32 or float64, not {dtype}")
            return _TORCH_TO_NP[dtype]
        dt = np.dtype(dtype)
    else:
        dt = values.dtype
    if dt not in _NP_TO_TORCH:
        raise TypeError(f"HBP values must be float16, float32 or float64, got {dt}; pass "
                        "dtype=... to convert (e.g. integer or pattern matrices)")
    return dt


def _index(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values beyond int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def _canonical_device(device) -> torch.device:
    """torch.device with the index filled in for CUDA: a CUDA tensor's .device always carries
    one, and torch.device("cuda") != torch.device("cuda:0")."""
    d = torch.device(device if device is not None else "cpu")
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class HBPMatrix:
    """A sparse matrix in HBP layout. Build it with from_csr / from_scipy / from_torch or
    reorder(); multiply with `H @ x`. Immutable; `.to(device)` gives a view on another device."""

    def __init__(self, layout: dict, device=None, method: str = "hash"):
        self.layout = layout  # numpy arrays on the host (docs/HBP.md §2)
        self.device = _canonical_device(device)
        self.method = method
        self._device_arrays = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_csr(cls, indptr, indices, values, shape: Tuple[int, int], *, dtype=None,
                 method: str = "hash", tile_rows: Optional[int] = None,
                 tile_cols: Optional[int] = None, smem_bytes: Optional[int] = None,
                 device=None) -> "HBPMatrix":
        """Build from CSR arrays. Unsorted columns are sorted and duplicates summed."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if len(shape) != 2 or any(int(s) != s or s < 0 for s in shape):
            raise ValueError(f"shape must be two non-negative integers, got {shape!r}")
        n_rows, n_cols = int(shape[0]), int(shape[1])
        indptr, indices = _index(indptr, "indptr"), _index(indices, "indices")
        values = np.asarray(values)
        if values.ndim != 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(f"values must be 1-D with one entry per index ({indices.shape[0]}), "
                             f"got shape {values.shape}")
        vdt = _value_dtype(values, dtype)
        if values.dtype.kind == "c":
            raise TypeError("complex values are not supported")
        canon = _C.hbp_canonicalize(indptr, indices, n_rows, n_cols)  # validates everything
        if canon is None:
            values = np.ascontiguousarray(values, dtype=vdt)
        else:
            indptr, indices, order, seg = canon
            summed = (np.add.reduceat(values[order].astype(np.float64), seg[:-1])
                      if seg.size > 1 else np.zeros(0))
            values = summed.astype(vdt)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        smem = int(smem_bytes) if smem_bytes is not None else default_smem_bytes(dev)
        layout = _C.hbp_build(indptr, indices, values, n_rows, n_cols, int(tile_rows or 0),
                              int(tile_cols or 0), smem, method)
        return cls(layout, dev, method)

    @classmethod
    def from_scipy(cls, a, **kw) -> "HBPMatrix":
        """Build from any scipy.sparse matrix or array (converted to CSR first)."""
        import scipy.sparse as sp

        if not sp.issparse(a):
            raise TypeError(f"from_scipy expects a scipy.sparse matrix, got {type(a).__name__}")
        a = a.tocsr()
        return cls.from_csr(a.indptr, a.indices, a.data, a.shape, **kw)

    @classmethod
    def from_torch(cls, t: torch.Tensor, **kw) -> "HBPMatrix":
        """Build from a torch.sparse_csr (or sparse COO) tensor; the result lives on t.device."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"from_torch expects a torch tensor, got {type(t).__name__}")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().to_sparse_csr()
        if t.layout != torch.sparse_csr or t.dim() != 2:
            raise TypeError(f"from_torch expects a 2-D torch.sparse_csr tensor, got {t.layout}, "
                            f"{t.dim()}-D")
        if t.dtype not in _TORCH_TO_NP and "dtype" not in kw:
            raise TypeError(f"HBP values must be float16, float32 or float64, got {t.dtype}")
        kw.setdefault("device", t.device)
        vals = t.values().detach().cpu()
        if vals.dtype not in _TORCH_TO_NP:
            vals = vals.double()
        return cls.from_csr(t.crow_indices().cpu().numpy(), t.col_indices().cpu().numpy(),
                            vals.numpy(), tuple(t.shape), **kw)

    def to(self, device) -> "HBPMatrix":
        device = _canonical_device(device)
        return self if device == self.device else HBPMatrix(self.layout, device, self.method)

    # ---------------------------------------------------------------- properties
    @property
    def shape(self) -> Tuple[int, int]:
        return (int(self.layout["n_rows"]), int(self.layout["n_cols"]))

    @property
    def dtype(self) -> torch.dtype:
        return _NP_TO_TORCH[self.layout["values"].dtype]

    @property
    def nnz(self) -> int:
        return int(self.layout["nnz"])

    @property
    def tile_shape(self) -> Tuple[int, int]:
        return (int(self.layout["tile_rows"]), int(self.layout["tile_cols"]))

    @property
    def n_tiles(self) -> int:
        return int(self.layout["tile_work"].shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.layout["group_width"].shape[0])

    @property
    def stored(self) -> int:
        """Stored slots, padding included (padding = stored - nnz)."""
        return int(self.layout["cols"].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the format (what a device copy occupies)."""
        return int(sum(self.layout[k].nbytes for k in ARRAYS))

    def schedule(self, n_programs: int) -> Tuple[int, int]:
        """(tiles taken statically per program, first tile index handed out by the counter)."""
        per = int(FIXED_FRACTION * self.n_tiles) // max(1, n_programs)
        return per, per * max(1, n_programs)

    def __repr__(self) -> str:
        return (f"HBPMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, "
                f"tiles={self.n_tiles} of {self.tile_shape}, groups={self.n_groups}, "
                f"padding={self.stored - self.nnz}, device={self.device})")

    # ---------------------------------------------------------------- conversion
    def to_scipy(self):
        """The matrix as a scipy CSR matrix (canonical: sorted columns, no duplicates). scipy has
        no float16, so fp16 matrices come back as float32 (exactly)."""
        import scipy.sparse as sp

        L = self.layout
        widths = L["group_width"].astype(np.int64)
        group = np.repeat(np.arange(widths.size), 32 * widths)
        lane = np.arange(group.size) % 32
        tile_of_group = np.repeat(np.arange(self.n_tiles), np.diff(L["tile_group_ptr"]))
        c0 = L["tile_coords"][:, 1].astype(np.int64) * int(L["tile_cols"])
        cols = L["cols"].astype(np.int64)
        real = L["cols"] != 0xFFFF
        rows = L["group_rows"][group[real], lane[real]]
        cols = cols[real] + c0[tile_of_group[group[real]]]
        vals = L["values"][real]
        if vals.dtype == np.float16:
            vals = vals.astype(np.float32)
        a = sp.csr_matrix((vals, (rows, cols)), shape=self.shape)
        a.sort_indices()
        return a

    # ---------------------------------------------------------------- product
    def __matmul__(self, x):
        if isinstance(x, np.ndarray):
            return (self @ torch.from_numpy(x)).numpy()
        if not isinstance(x, torch.Tensor):
            return NotImplemented
        return self.matmul(x)

    def matmul(self, x: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """y = A @ x for x (n_cols,) or (n_cols, m) of the matrix's dtype and device. On CUDA,
        kernel='auto' takes the CUDA kernel when bitfuse._C has CUDA, else Triton; 'cuda' and
        'triton' force one (an unavailable one is an error). CPU tensors use the C++ product."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        n_rows, n_cols = self.shape
        if x.dim() not in (1, 2) or x.shape[0] != n_cols:
            raise ValueError(f"HBPMatrix {self.shape} @ x: x must be ({n_cols},) or ({n_cols}, m), "
                             f"got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"HBPMatrix @ x: x is {x.dtype} but the matrix is {self.dtype}; "
                            f"convert x with x.to({self.dtype}) or rebuild with dtype={x.dtype}")
        if x.device != self.device:
            raise ValueError(f"HBPMatrix @ x: x is on {x.device}, the matrix on {self.device}; "
                             "use H.to(x.device)")
        x2 = x.detach().reshape(n_cols, 1) if x.dim() == 1 else x.detach()
        if x.device.type == "cpu":
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            y = torch.from_numpy(_C.hbp_spmm(self.layout, x2.to(acc).contiguous().numpy()))
            y = y.to(self.dtype)
        elif kernel == "cuda" or (kernel == "auto" and _C.cuda_built()):
            y = torch.empty(n_rows, x2.shape[1], dtype=self.dtype, device=x.device)
            self.cuda_product(x2, x2.stride(0), x2.stride(1), y, y.stride(0), y.stride(1))
        else:
            from ..kernels.hbp import hbp_spmm

            y = hbp_spmm(self.device_arrays(), x2, self.shape, self.tile_shape[1])
        return y.reshape(n_rows) if x.dim() == 1 else y

    def cuda_product(self, x: torch.Tensor, x_stride_c: int, x_stride_j: int, y: torch.Tensor,
                     y_stride_r: int, y_stride_j: int, m: Optional[int] = None) -> None:
        """The CUDA kernel, writing every element of y: y[r, j] = Σ_c A[r, c] · x[c, j], with
        x[c, j] at x's storage offset c·x_stride_c + j·x_stride_j (elements) and y likewise.
        m defaults to x.shape[1]. fp16 matrices take fp16 or bf16 x and write fp16 or fp32 y
        (accumulating in fp32); fp32/fp64 take and write their own dtype. No host sync and no
        allocation beyond the (host-sized) partial-sum buffer: CUDA-graph safe once
        device_arrays() exists. The competitive counter is per matrix, so one matrix must not
        run on two streams at once."""
        if not _C.cuda_built():
            raise RuntimeError("HBPMatrix: bitfuse._C was built without CUDA; use kernel='triton' "
                               "or reinstall with nvcc available")
        if x.device.type != "cuda" or y.device != x.device or self.device != x.device:
            raise ValueError(f"HBPMatrix.cuda_product: the matrix ({self.device}), x ({x.device}) "
                             f"and y ({y.device}) must be on one CUDA device")
        m = x.shape[1] if m is None else int(m)
        if self.n_tiles == 0 or m == 0:  # no nonzero (or nothing to compute): y is all zeros
            y.zero_()
            return
        arr = self.device_arrays()
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        n_slots = arr["_n_slots"]
        partial = torch.empty(n_slots * m, dtype=acc, device=x.device) if n_slots and m else None
        with torch.cuda.device(x.device):
            _C.hbp_spmm_cuda(
                arr["_ptrs"], x.data_ptr(), y.data_ptr(), 0 if partial is None else partial.data_ptr(),
                arr["_counter"].data_ptr(), self.shape[0], self.shape[1], self.tile_shape[1],
                self.n_tiles, int(self.layout["multi_rows"].shape[0]),
                int(self.layout["empty_rows"].shape[0]), n_slots, m, x_stride_c, x_stride_j,
                y_stride_r, y_stride_j, DTYPE_CODES[self.dtype], DTYPE_CODES[x.dtype],
                DTYPE_CODES[y.dtype], arr["_stage_cols"], arr["_warps"],
                torch.cuda.current_stream(x.device).cuda_stream)

    def launch_params(self) -> Tuple[int, int]:
        """(stage_cols, warps) of the CUDA launch: the widest tile worth staging x for (hbp.h
        stage_pays; 0 with BITFUSE_HBP_STAGE=never) and warps per block (the mean groups per
        tile, rounded up to a power of two in [2, 8])."""
        L = self.layout
        stage = 0
        if self.n_tiles and os.environ.get("BITFUSE_HBP_STAGE", "auto") != "never":
            tc = int(L["tile_cols"])
            c0 = L["tile_coords"][:, 1].astype(np.int64) * tc
            width = np.minimum(tc, self.shape[1] - c0)
            pays = L["tile_work"] >= width
            stage = int(width[pays].max()) if pays.any() else 0
        mean = self.n_groups / max(1, self.n_tiles)
        warps = 2
        while warps < 8 and warps < mean:
            warps *= 2
        return stage, warps

    def device_arrays(self) -> dict:
        """The format arrays as torch tensors on self.device (made once, then cached; the layout
        is validated first, since nothing checks indices on the GPU)."""
        if self._device_arrays is None:
            _C.hbp_validate(self.layout)
            arr = {k: torch.from_numpy(np.ascontiguousarray(self.layout[k])).to(self.device)
                   for k in ARRAYS if k != "cols"}
            # uint16 columns travel as int16 bits (torch has limited uint16 support); kernels mask.
            arr["cols"] = torch.from_numpy(self.layout["cols"].view(np.int16)).to(self.device)
            # Host-known size of the partial-sum buffer: the kernel never reads it from the device.
            arr["_n_slots"] = int(self.layout["multi_ptr"][-1]) if len(self.layout["multi_ptr"]) else 0
            # CUDA kernel state: [next ticket, blocks done], zero between launches (hbp.cu).
            arr["_counter"] = torch.zeros(2, dtype=torch.int32, device=self.device)
            arr["_stage_cols"], arr["_warps"] = self.launch_params()
            arr["_ptrs"] = {k: (arr[k].data_ptr() if arr[k].numel() else 0) for k in ARRAYS}
            self._device_arrays = arr
        return self._device_arrays


def reorder(a, method: str = "hash", **kw) -> HBPMatrix:
    """Build the HBP format with one of three in-tile row orderings (docs/HBP.md §5): 'hash'
    (length buckets, O(rows)), 'sort' (stable sort by length) or 'dp' (sort, then Regu2D-style
    DP grouping). Same output format; used by the preprocessing benchmark."""
    import scipy.sparse as sp

    if isinstance(a, torch.Tensor):
        return HBPMatrix.from_torch(a, method=method, **kw)
    if sp.issparse(a):
        return HBPMatrix.from_scipy(a, method=method, **kw)
    raise TypeError(f"reorder expects a scipy.sparse matrix or a torch sparse tensor, got "
                    f"{type(a).__name__}")
