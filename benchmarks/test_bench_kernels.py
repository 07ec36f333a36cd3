"""pytest-benchmark entry for the kernel microbenchmarks (GPU only):

    pytest benchmarks/test_bench_kernels.py -m gpu --benchmark-json=$OUT/bench.json

Each benchmark times replays of a CUDA graph holding 20 calls, so one "round" is 20 calls; the
per-call time is in extra_info. bench_kernels.py is the full sweep with tables and plots.
"""

import pytest
import torch

from bitfuse.bench_kernels import RECIPES, capture_graph

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("size", [4096, 8192])
@pytest.mark.parametrize("impl", ["fp16"] + list(RECIPES))
def test_linear(benchmark, impl, size, m):
    from bitfuse import QuantConfig, QuantLinear
    from bitfuse.kernels import fused_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(size, size, bias=False, device="cuda")
    x = torch.randn(m, size, device="cuda", dtype=torch.float16)
    if impl == "fp16":
        w = lin.weight.detach().half()
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    else:
        pw = QuantLinear.from_linear(lin, QuantConfig(**RECIPES[impl])).packed
        fn = lambda: fused_linear(x, pw)  # noqa: E731
    g = capture_graph(fn)

    def run():
        g.replay()
        torch.cuda.synchronize()

    benchmark.extra_info.update(device=torch.cuda.get_device_name(0), m=m, n=size, k=size, calls_per_round=20)
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
