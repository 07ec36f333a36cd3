"""Layer 1: the torch reference against plain per-element dequant math written from FORMAT.md."""

import pytest
import torch

from bitfuse import QuantConfig, calibrate, reference
from synthetic import heavy_tailed


def naive_slot(k):
    """FORMAT.md §3.1, written out: column 16s + 8h + 2t + l of a run is stored in slot 8t + 4l + 2s + h."""
    run, c = divmod(k, 32)
    s, h, t, l = c // 16, (c // 8) % 2, (c // 2) % 4, c % 2
    return 32 * run + 8 * t + 4 * l + 2 * s + h


def naive_code(words, bits, k):
    """FORMAT.md §3, one code at a time, with Python integers."""
    w = [int(x) & 0xFFFFFFFF for x in words]
    k = naive_slot(k)
    if bits in (2, 4):
        per = 32 // bits
        return (w[k // per] >> (bits * (k % per))) & ((1 << bits) - 1)
    t, j = divmod(k, 32)
    lo = (w[3 * t + j // 16] >> (2 * (j % 16))) & 3
    hi = (w[3 * t + 2] >> j) & 1
    return lo | (hi << 2)


def naive_dense(pw):
    """Ŵ_b + R̂ in original order, (N, K) float64, element by element."""
    n, k, g, kp = pw.out_features, pw.in_features, pw.group_size, pw.k_pad
    out = torch.zeros(n, k, dtype=torch.float64)
    perm = pw.perm.tolist() if pw.perm is not None else list(range(n))
    row = 0
    offset = 0
    for bits, rows in zip(pw.class_bits, pw.class_rows):
        wpr = kp * bits // 32
        for r in range(rows):
            words = pw.qweight[offset + r * wpr: offset + (r + 1) * wpr].tolist()
            for c in range(k):
                q = naive_code(words, bits, c)
                v = q * float(pw.scales[row, c // g]) + float(pw.zeros[row, c // g])
                if pw.res_index is not None and int(pw.res_index[row]) >= 0:
                    ri = int(pw.res_index[row])
                    bit = (int(pw.res_plane[ri, c // 32]) >> (naive_slot(c) % 32)) & 1
                    v += float(pw.res_alpha[ri, c // g]) * (2 * bit - 1)
                out[perm[row], c] = v
            row += 1
        offset += rows * wpr
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(bits=2, group_size=32),
        QuantConfig(bits=3, group_size=32, residual=True),
        QuantConfig(bits=4, group_size=64, residual=0.4),
        QuantConfig(bits=3, group_size=32, mixed_bits=(2, 3, 4), residual=True),
    ],
    ids=["w2", "w3+res", "w4+res40%", "mixed+res"],
)
def test_reference_matches_naive_format_decoder(cfg):
    w = heavy_tailed(96 if cfg.mixed_bits else 40, 70, seed=3, outlier_channels=6)
    pw = calibrate(w, cfg)
    if cfg.mixed_bits:
        assert len(pw.class_bits) > 1, "heavy-tailed rows should give mixed classes"
    ref = reference.dense_weight(pw).double()
    naive = naive_dense(pw)
    # Both compute q*s+m(+α·±1) from the same fp16 values; fp32 vs fp64 arithmetic only.
    assert torch.allclose(ref, naive, rtol=2**-22, atol=1e-7), float((ref - naive).abs().max())


def test_branches_in_dequantize_and_linear_agree():
    w = heavy_tailed(48, 96, seed=5)
    cfg = QuantConfig(bits=3, group_size=32, residual=True, mixed_bits=(2, 3, 4), rank=6, outliers=0.01)
    pw = calibrate(w, cfg, bias=torch.linspace(-1, 1, 48))
    dense = reference.dequantize(pw)
    manual = reference.dense_weight(pw) + reference.lowrank_weight(pw) + reference.sparse_weight(pw)
    assert torch.allclose(dense, manual)
    x = torch.randn(5, 96)
    y = reference.linear(x, pw)
    y2 = x @ dense.t() + pw.bias
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-5)


def test_outliers_are_reproduced_exactly():
    w = heavy_tailed(32, 64, seed=9)
    pw = calibrate(w, QuantConfig(bits=2, group_size=32, outliers=0.02))
    rows, cols, _ = reference.sparse_coo(pw)
    approx = reference.dequantize(pw)
    # dense + sparse at the outlier positions equals W up to the fp16 rounding of the correction.
    err = (approx[rows, cols] - w[rows, cols]).abs()
    assert bool((err <= 2.0**-11 * w[rows, cols].abs() + 1e-6).all())
    assert pw.nnz == round(0.02 * w.numel())
