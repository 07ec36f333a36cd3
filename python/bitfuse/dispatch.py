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


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'bitfuse[triton]')"
    return False, "the Triton kernels are not implemented yet (issue #3)"


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


def select_backend(device: torch.device) -> str:
    """The backend that runs an op on tensors living on `device`."""
    forced = forced_backend()
    if forced:
        if forced == "torch":
            return forced
        ok, why = backends_status(forced)
        if not ok:
            raise BackendUnavailableError(f"BITFUSE_BACKEND={forced} requested but unavailable: {why}")
        if forced == "cuda" and device.type != "cuda":
            raise BackendUnavailableError(f"BITFUSE_BACKEND=cuda needs CUDA tensors, got {device}")
        return forced
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if backends_status(name)[0]:
                return name
    return "torch"


def backends_status(name: str) -> Tuple[bool, str]:
    s = backends()[name]
    return bool(s["available"]), str(s["reason"])
