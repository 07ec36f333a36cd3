"""Which execution backend runs a bitfuse op, and why the others cannot.

Order (ARCHITECTURE.md §4): the CUDA extension when it is built and the tensor is on a CUDA
device; else Triton on a GPU; else the torch reference. BITFUSE_BACKEND=cuda|triton|torch forces
one; forcing a backend that cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for this tensor's device."""


@functools.lru_cache(maxsize=None)
def _ext():
    """(module or None, reason) for bitfuse._C."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the install
        return None, f"bitfuse._C failed to import ({e}); reinstall with `pip install .`"
    return _C, ""


def extension():
    """The compiled bitfuse._C module; raises with the reason when it is missing."""
    mod, why = _ext()
    if mod is None:
        raise BackendUnavailableError(why)
    return mod


def _cuda_status() -> Tuple[bool, str]:
    mod, why = _ext()
    if mod is None:
        return False, why
    if not mod.cuda_built():
        return False, "bitfuse._C was built without CUDA (no nvcc at build time, or BITFUSE_CUDA=0)"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, f"bitfuse._C CUDA kernels for sm_{mod.cuda_archs().replace(';', ', sm_')}"


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in the interpreter (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'bitfuse[triton]')"
    if torch.cuda.is_available():
        return True, f"fused Triton kernels (triton {triton.__version__}) on CUDA GPUs"
    if triton_interpreting():
        return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for testing)"
    return False, "no CUDA GPU; set TRITON_INTERPRET=1 to run the Triton kernels on CPU in the interpreter"


# The ops each backend implements, and the automatic order on a GPU (ARCHITECTURE.md §4: cuda >
# triton > torch), per op. `linear` is split by M: "gemv" (M <= 8) and "gemm" (M > 8).
#   gemv: the fused CUDA GEMV (csrc/cuda/gemv.cu), then Triton's GEMV path.
#   gemm: the fused CUDA tensor-core GEMM (csrc/cuda/gemm.cu), then Triton's tl.dot GEMM.
#   conv: k×k convs. Triton's implicit GEMM (kernels/conv2d.py) gathers patches in the kernel; no
#         backend has it natively otherwise, so the rest is im2col + the linear op (which then
#         dispatches gemv/gemm itself: the CUDA GEMM on a GPU without Triton). Implicit first
#         because im2col writes kh·kw times the input before the GEMM reads it again.
# Both orders follow §4 and are unmeasured (no GPU run yet, docs/STATUS.md): the first GPU
# session's `bitfuse bench kernels` decides whether cuda really beats triton per shape.
# BITFUSE_BACKEND forces a backend.
NATIVE_OPS = {"cuda": ("dequantize", "gemv", "gemm"), "triton": ("gemv", "gemm", "conv"),
              "torch": ("gemv", "gemm", "dequantize")}
AUTO_ORDER = {"gemv": ("cuda", "triton"), "gemm": ("cuda", "triton"), "conv": ("triton",),
              "dequantize": ("cuda",)}
GEMV_MAX_M = 8


def linear_op(m: int) -> str:
    """The op name `linear` dispatches under for M rows of x."""
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def backends() -> Dict[str, Dict[str, object]]:
    """{name: {"available": bool, "reason": str}} for every backend, on this machine."""
    status = {"cuda": _cuda_status(), "triton": _triton_status(),
              "torch": (True, "torch reference (CPU and any torch device)")}
    return {name: {"available": ok, "reason": why} for name, (ok, why) in status.items()}


def forced_backend() -> str:
    name = os.environ.get("BITFUSE_BACKEND", "").strip().lower()
    if name and name not in BACKENDS:
        raise BackendUnavailableError(f"BITFUSE_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def select_backend(device: torch.device, op: str = "gemv") -> str:
    """The backend that runs `op` ("gemv", "gemm", "conv" or "dequantize"; see linear_op) on
    tensors living on `device`. "torch" for an op means: built from torch ops (for "conv":
    im2col + the linear op, which dispatches again)."""
    forced = forced_backend()
    if forced:
        if forced == "torch":
            return forced
        ok, why = backends_status(forced)
        if not ok:
            raise BackendUnavailableError(f"BITFUSE_BACKEND={forced} requested but unavailable: {why}")
        if device.type != "cuda" and not (forced == "triton" and triton_interpreting()):
            raise BackendUnavailableError(
                f"BITFUSE_BACKEND={forced} needs CUDA tensors, got {device}"
                + (" (or TRITON_INTERPRET=1 for Triton on CPU)" if forced == "triton" else "")
            )
        if op not in NATIVE_OPS[forced]:
            return "torch"  # e.g. dequantize under BITFUSE_BACKEND=triton: torch ops on the same device
        return forced
    if device.type == "cuda":
        for name in AUTO_ORDER.get(op, ()):
            if op in NATIVE_OPS[name] and backends_status(name)[0]:
                return name
    return "torch"


def backends_status(name: str) -> Tuple[bool, str]:
    s = backends()[name]
    return bool(s["available"]), str(s["reason"])
