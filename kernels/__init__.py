"""Triton kernels for bitfuse; see issue #3."""
