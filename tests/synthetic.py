"""Test data generators: they live in bitfuse.synthetic (the quality benchmark uses them too)."""

from bitfuse.synthetic import correlated_activations, heavy_tailed, linear_from  # noqa: F401
