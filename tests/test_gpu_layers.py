"""The GPU tests' layers, built here on the CPU: each must be what its test's name promises (a
"mixed" layer with several bit classes, a compact one with compact scales). A layer that is not
fails or, worse, passes without testing what it says, and only on the one GPU run there is."""

import itertools

import pytest
import torch

import test_gpu as G
from bitfuse import QuantConfig


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_and_gemm_sweep_layers(bits):
    for name, (n, k, g) in itertools.product(G.GEMV_CONFIGS, [(257, 200, 32), (1088, 1000, 64), (96, 4103, 128)]):
        cfg = QuantConfig(bits=bits, group_size=g, **G._mixed(G.GEMV_CONFIGS[name], bits))
        lin = G.linear_from(G.heavy_tailed(n, k, seed=bits + n))
        lin.bias = torch.nn.Parameter(torch.randn(n) * 0.1)
        G._quantize(lin, cfg)  # asserts several classes for a wide mixed layer
    for name in G.GEMV_CONFIGS:
        G._gemm_layer_cpu(bits, name, 1088, 1000, 64)
    G._gemm_layer_cpu.cache_clear()


def test_sanitizer_and_split_k_layers_are_mixed():
    for k in (333, 2051, 1999):
        q = G._gemm_layer_cpu(3, "all", 200, k, 64)
        assert len(q.class_bits) > 1, (k, q.class_bits)
    for bits, name in ((2, "mixed"), (3, "all")):  # test_cuda_gemm_split_k's layers
        assert len(G._gemm_layer_cpu(bits, name, 4096, 2048, 128).class_bits) > 1
    G._gemm_layer_cpu.cache_clear()
