"""Layer 5 (GPU machines only, `pytest -m gpu`): the CUDA backend against the torch reference."""

import itertools

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear, reference
from _tolerance import assert_within, matmul_bound
from synthetic import heavy_tailed, linear_from

pytestmark = pytest.mark.gpu

CONFIGS = {
    "plain": {},
    "residual": dict(residual=True),
    "residual-part": dict(residual=0.3),
    "mixed": dict(mixed_bits=(2, 3, 4), residual=True),
    "all": dict(residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005),
}


def _cuda_ready():
    b = bitfuse.backends()["cuda"]
    if not b["available"]:
        pytest.fail(f"GPU present but the cuda backend is unavailable: {b['reason']}")


@pytest.mark.parametrize("bits,name,g", list(itertools.product([2, 3, 4], CONFIGS, [32, 128])))
@pytest.mark.parametrize("n,k", [(256, 200), (1088, 1000)])
def test_cuda_dequantize_matches_reference(bits, name, g, n, k):
    _cuda_ready()
    kw = dict(CONFIGS[name])
    if "mixed_bits" in kw and bits != 3:
        kw["mixed_bits"] = (2, 3) if bits == 2 else (3, 4)
    q = QuantLinear.from_linear(linear_from(heavy_tailed(n, k, seed=bits)), QuantConfig(bits=bits, group_size=g, **kw))
    ref = reference.dense_weight(q.packed)
    from bitfuse.backend_cuda import dequantize_dense

    qc = q.cuda()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = dequantize_dense(qc.packed, dtype).float().cpu()
        # q*s+m in fp32 (fma vs mul+add: a few ulps), then one rounding to the output dtype.
        tol = ref.abs() * (4 * 2.0**-24 + (0 if dtype == torch.float32 else
                                           {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype])) + 1e-6
        assert bool(((got - ref).abs() <= tol).all()), f"{dtype}: max err {float((got - ref).abs().max())}"


@pytest.mark.parametrize("m", [1, 7, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_linear_matches_reference(m, dtype):
    _cuda_ready()
    cfg = QuantConfig(bits=3, group_size=64, residual=0.5, mixed_bits=(2, 3, 4), rank=8, outliers=0.005)
    q = QuantLinear.from_linear(linear_from(heavy_tailed(512, 384, seed=1)), cfg)
    x = torch.randn(m, 384).to(dtype)
    y_ref = reference.linear(x, q.packed)
    y = q.cuda()(x.cuda()).cpu()
    W = q.dequantize().abs()
    # the CUDA path rounds Ŵ to x's dtype, then cuBLAS multiplies with fp32 accumulation.
    bound = matmul_bound(x.float(), [W], dtype, y_ref=y_ref, operand_dtype=dtype)
    assert_within(y, y_ref, bound, f"cuda linear M={m} {dtype}")
