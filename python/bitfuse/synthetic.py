"""Generated weights and activations for tests and quality benchmarks (nothing is downloaded):
heavy-tailed layers with planted outlier channels, and correlated activations with outlier
input channels."""

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


def correlated_activations(m: int, k: int, seed: int = 0, outlier_channels: int = 8, rank: int = 16,
                           outlier_scale: float = 20.0, sample_seed: int = 0) -> torch.Tensor:
    """(m, k) calibration activations: channels correlated through a shared low-rank mix plus
    noise, log-normally spread channel scales, and a few input channels `outlier_scale` times
    larger than the rest (the pattern diffusion and LLM activations show).

    `seed` fixes the distribution (mix, scales, outlier channels); `sample_seed` draws the rows,
    so a different sample_seed gives held-out data from the same distribution."""
    g = torch.Generator().manual_seed(seed + 1000)
    mix = torch.randn(rank, k, generator=g) / rank ** 0.5
    spread = torch.exp(0.5 * torch.randn(k, generator=g))
    cols = torch.randperm(k, generator=g)[:outlier_channels]
    r = torch.Generator().manual_seed(seed * 7919 + sample_seed + 1)
    x = torch.randn(m, rank, generator=r) @ mix + 0.3 * torch.randn(m, k, generator=r)
    x = x * spread
    x[:, cols] *= outlier_scale
    return x
