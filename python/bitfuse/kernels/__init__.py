"""Triton kernels for bitfuse (installed as bitfuse.kernels).

fused_linear.py holds the kernels, launch.py the host side (checks, configs, launches),
tuning.py the per-target config tables and the autotune cache. Importing this package needs
triton; bitfuse.dispatch imports it only when the triton backend is used.
"""

from .launch import fused_linear, interpreting
from .tuning import KernelConfig

__all__ = ["fused_linear", "interpreting", "KernelConfig"]
