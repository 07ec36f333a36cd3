"""Generated test weights and activations (no downloads)."""

import torch


def heavy_tailed(n: int, k: int, seed: int = 0, df: float = 5.0, outlier_channels: int = 4,
                 scale: float = 0.02) -> torch.Tensor:
    """Student-t weights with a few planted outlier output channels.

    An outlier channel carries spikes: about 3% of its weights are 20x larger, the pattern that
    makes a channel heavy-tailed (high kurtosis) and stretches its quantization ranges.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(df)
    torch.manual_seed(seed)
    w = t.sample((n, k)) * scale
    rows = torch.randperm(n, generator=g)[:outlier_channels]
    spikes = torch.rand(len(rows), k, generator=g) < 0.03
    spikes[:, 0] = True
    w[rows] = torch.where(spikes, w[rows].sign() * (w[rows].abs() + 3 * scale) * 20.0, w[rows])
    return w


def linear_from(w: torch.Tensor, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            g = torch.Generator().manual_seed(seed + 7)
            lin.bias.copy_(torch.randn(w.shape[0], generator=g) * 0.1)
    return lin
