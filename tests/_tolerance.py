"""Error bounds derived from floating-point accumulation, so tolerances mean something.

For a length-K dot product accumulated in a format with unit roundoff u, the classical bound is
|fl(x·w) − x·w| ≤ γ_K · Σ|x_k||w_k| with γ_K = K·u / (1 − K·u). Two computations of the same
quantity by different association (e.g. a fused kernel vs dequantize-then-matmul) differ by at
most twice that; each final cast to the output dtype adds half an ulp (u·|y|).
"""

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
                 torch.float64: 2.0**-53}


def gamma(k: int, dtype=torch.float32) -> float:
    ku = k * UNIT_ROUNDOFF[dtype]
    return ku / (1 - ku)


def matmul_bound(x: torch.Tensor, mags, out_dtype, acc_dtype=torch.float32, y_ref=None,
                 operand_dtype=None, bias=None) -> torch.Tensor:
    """Elementwise bound on |y − y_ref| for y = Σ_i x·W_iᵀ computed two ways.

    `mags` is a list of (N, K)-shaped |W_i| magnitude matrices (one per summed branch), or of
    callables mapping |x| to the (M, N) magnitude Σ|x||W_i| (for factored branches).
    operand_dtype: if one side rounds W (or x) to a narrower dtype before the product, each
    product carries that rounding too: + u_operand · Σ|x||w| per side.
    """
    ax = x.detach().abs().double().reshape(-1, x.shape[-1])
    mag = torch.zeros(ax.shape[0], 1, dtype=torch.float64)
    for m in mags:
        mag = mag + (m(ax) if callable(m) else ax @ m.double().abs().t())
    if bias is not None:
        mag = mag + bias.detach().abs().double()
    k = x.shape[-1] + 2  # + the low-rank and bias additions
    bound = 2 * gamma(k, acc_dtype) * mag
    if operand_dtype is not None:
        bound = bound + 2 * UNIT_ROUNDOFF[operand_dtype] * mag
    if y_ref is not None and out_dtype != torch.float32:
        bound = bound + 2 * UNIT_ROUNDOFF[out_dtype] * y_ref.detach().abs().double().reshape(bound.shape)
    return bound + 1e-30


def assert_within(y, y_ref, bound, what=""):
    y = y.detach().double().reshape(bound.shape)
    y_ref = y_ref.detach().double().reshape(bound.shape)
    err = (y - y_ref).abs()
    ratio = float((err / bound).max())
    assert ratio <= 1.0, f"{what}: max |err|/bound = {ratio:.3g} (max err {float(err.max()):.3g})"


def branch_magnitudes(q):
    """|W| of each piece a QuantLinear sums (dense + residual, factored low-rank, sparse), as
    matmul_bound wants them: the bound must hold however the kernel orders those sums."""
    from bitfuse import reference

    pw = q.packed
    mags = [reference.dense_weight(pw).abs()]
    if pw.lr_down is not None:
        up = reference.to_output_order(pw.lr_up.float(), pw).abs().double()
        down = (pw.lr_down.float().abs() * pw.lr_scale.abs().unsqueeze(1)).double()
        mags.append(lambda ax: (ax @ down.t()) @ up.t())
    if pw.sp_values is not None:
        mags.append(reference.sparse_weight(pw).abs())
    return mags


def factored_magnitude(pw):
    """|q·s| + |m| (+ |α|) per weight, (N, K) in original order: what a kernel that applies the
    scales per group (Σx·q·s + m·Σx + α·Σ±x: the tensor-core GEMV, gemv_tc.h) sums, where a
    kernel that dequantizes first sums |Ŵ|. Its fp32 error is bounded by γ_K times this."""
    from bitfuse import pack, reference

    kp, g = pw.k_pad, pw.group_size
    q = torch.cat(pack.unpack_classes(pw.qweight, pw.class_bits, pw.class_rows, kp)).float()
    scales, zeros = pw.group_params()
    mag = (q * scales.float().repeat_interleave(g, 1)).abs() + zeros.float().abs().repeat_interleave(g, 1)
    if pw.res_plane is not None:
        ri = pw.res_index.long()
        rows = torch.nonzero(ri >= 0).flatten()
        mag[rows] += pw.res_alpha.float().abs().repeat_interleave(g, 1)[ri[rows]]
    return reference.to_output_order(mag, pw)[:, : pw.in_features]


def factored_branch_magnitudes(q):
    """branch_magnitudes with the dense piece as factored_magnitude: |Ŵ| ≤ it, so the bound also
    holds for a kernel that dequantizes first."""
    return [factored_magnitude(q.packed)] + branch_magnitudes(q)[1:]
