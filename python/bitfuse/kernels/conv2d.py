"""Implicit-GEMM QuantConv2d in Triton: the fused linear kernel with its A tile gathered from the image.

A conv is the GEMM  y[m, n] = Σ_k patch[m, k] · Ŵ[n, k]  with m = (b, ho, wo) an output pixel and
k = (cin, r, s) a patch element, in the K order of F.unfold and of `weight.reshape(O, -1)` (channel
slowest, kernel column fastest; nn/conv.py). The packed weight is exactly the linear one, so the B
side (codes, classes, residual, scales) is fused_linear.py's `_dequant_tile`, the product its `_mm`
and the tail its `_epilogue`; only the A side differs:
  * No im2col buffer: each K tile decomposes k -> (cin, r, s) and each output pixel m -> (b, ho, wo),
    and loads x[b, cin, ho·sh − ph + r·dh, wo·sw − pw + s·dw] straight from the input, with taps
    outside the image (the zero padding) and k ≥ K (the group padding) masked to 0. Kernel size,
    stride, padding and dilation are constexpr, so the per-k div/mod are by constants (a UNet has
    a handful of conv geometries, each compiled once).
  * The input is addressed through its four strides, so NCHW and channels-last inputs both run
    without a copy. Which one this kernel prefers follows from the fixed K order (unmeasured, see
    docs/STATUS.md): consecutive k inside one kernel row (s, s+1) and consecutive output pixels
    along a row (wo, wo+1) are both adjacent in an NCHW image (dilation and stride 1), so a K tile
    of one channel-row is a sliding window over contiguous memory. In channels-last, neighbouring k
    are C elements apart and a pixel's run of same-tap channels is only BLOCK_K/(kh·kw) long (3-7
    for a 3×3 kernel), so loads use a fraction of each 32-byte sector. Library implicit GEMMs
    (cuDNN, CUTLASS) want channels-last because they order K as (r, s, cin), making a K slice one
    contiguous channel vector; changing the K order here would change which weights share a
    quantization group, i.e. the packed format, so bitfuse keeps (cin, r, s) and prefers NCHW.
    For NCHW the tile is loaded as [BLOCK_K, BLOCK_M] and transposed (A_M_MAJOR): Triton puts a
    gathered load's last dimension across neighbouring threads, so a warp then reads neighbouring
    pixels, i.e. contiguous addresses.
  * Mixed bit classes in one launch, split-K and the output follow fused_linear_kernel: the output
    is the (M, N) matrix of pixels × channels, i.e. a channels-last (B, Ho, Wo, N) tensor, stored
    through the inverse permutation by `_epilogue` (which writes rows of N).
  * Low-rank branch: t = patch · L_downᵀ · diag(lr_scale) is computed first by
    conv_lowrank_down_kernel, which gathers the same A tiles (no im2col either), then the main
    kernel's epilogue adds t · L_upᵀ. Fusing the down-projection into the main pass instead would
    make every N tile recompute it (N/BLOCK_N times the r·K work per pixel) for the saving of one
    extra read of x, which the cache mostly serves; the separate pass is simpler and does strictly
    less arithmetic.
  * The sparse branch is computed by the launcher in torch (conv_launch.py: a gather of just the
    outliers' patch elements, chunked) and added in the epilogue as `extra`, like the linear
    launcher's sparse_apply: outliers are 0.05-0.5% of the weights, so their product is small next
    to the GEMM; an HBP kernel on gathered patches is future work.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_linear import _dequant_tile, _epilogue, _mm


@triton.jit
def _pixels(offs_m, HO, WO, stride_xb, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
            PW: tl.constexpr):
    """Output pixel m -> (image offset in elements, int64; top row; left column) of its window."""
    hw = HO * WO
    b = offs_m // hw
    p = offs_m % hw
    ih0 = (p // WO) * SH - PH
    iw0 = (p % WO) * SW - PW
    return b.to(tl.int64) * stride_xb, ih0, iw0


@triton.jit
def _gather_a(x_ptr, xb_off, ih0, iw0, m_mask, offs_k, K, H, W, stride_xc, stride_xh, stride_xw,
              KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
              A_M_MAJOR: tl.constexpr):
    """The A tile [BLOCK_M, BLOCK_K]: patch element offs_k of each output pixel, 0 outside the
    image (zero padding) and for k >= K (group padding)."""
    cin = offs_k // (KH * KW)
    rs = offs_k % (KH * KW)
    dr = (rs // KW) * DH
    ds = (rs % KW) * DW
    k_ok = offs_k < K
    coff = cin * stride_xc
    if A_M_MAJOR:
        # [BLOCK_K, BLOCK_M], pixels along the fast (thread) dimension; transposed after the load.
        ih = ih0[None, :] + dr[:, None]
        iw = iw0[None, :] + ds[:, None]
        ok = k_ok[:, None] & m_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + xb_off[None, :] + (coff[:, None] + ih * stride_xh + iw * stride_xw),
                    mask=ok, other=0.0)
        a = tl.trans(a)
    else:
        ih = ih0[:, None] + dr[None, :]
        iw = iw0[:, None] + ds[None, :]
        ok = m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + xb_off[:, None] + (coff[None, :] + ih * stride_xh + iw * stride_xw),
                    mask=ok, other=0.0)
    return a


@triton.jit
def _conv_k_loop(acc, x_ptr, xb_off, ih0, iw0, m_mask, K, H, W, stride_xc, stride_xh, stride_xw,
                 kt0, kt1, qw_ptr, word_base, offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, G,
                 res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1,
                 KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 A_M_MAJOR: tl.constexpr, BITS: tl.constexpr, HAS_RES: tl.constexpr, COMPACT: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    for kt in range(kt0, kt1):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        a = _gather_a(x_ptr, xb_off, ih0, iw0, m_mask, offs_k, K, H, W, stride_xc, stride_xh,
                      stride_xw, KH, KW, DH, DW, A_M_MAJOR)
        w = _dequant_tile(qw_ptr, word_base, kt * BLOCK_K, offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr,
                          (kt * BLOCK_K) // GROUP, G, res_index_ptr, res_plane_ptr, res_alpha_ptr,
                          KW1, BITS, HAS_RES, COMPACT, BLOCK_K)
        acc += _mm(a, w, USE_DOT, DOT_DTYPE, DOT_FP32)
    return acc


@triton.jit
def conv2d_kernel(
    x_ptr, out_ptr, part_ptr,
    qw_ptr, scales_ptr, zeros_ptr, rows_ptr, perm_ptr, res_index_ptr, res_plane_ptr, res_alpha_ptr,
    t_ptr, lr_up_ptr, extra_ptr, bias_ptr,
    M, N, K, K_PAD, R, H, W, HO, WO,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_om, stride_tm,
    ROW1, ROW2, WORD1, WORD2,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, A_M_MAJOR: tl.constexpr,
    GROUP: tl.constexpr, N_CLASSES: tl.constexpr,
    BITS0: tl.constexpr, BITS1: tl.constexpr, BITS2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_RES: tl.constexpr, COMPACT: tl.constexpr, HAS_LR: tl.constexpr, R_PAD: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    xb_off, ih0, iw0 = _pixels(offs_m, HO, WO, stride_xb, SH, SW, PH, PW)
    G = K_PAD // GROUP
    KW1 = K_PAD // 32
    k_tiles = K_PAD // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = pid_k * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)
    offs_n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid_n * BLOCK_N
    # The tile's bit class from its first row (tiles never straddle classes: launch._fit), each
    # class's K loop specialised on its width, as in fused_linear_kernel.
    if N_CLASSES == 1:
        acc = _conv_k_loop(acc, x_ptr, xb_off, ih0, iw0, m_mask, K, H, W, stride_xc, stride_xh,
                           stride_xw, kt0, kt1, qw_ptr, offs_n64 * ((K_PAD // 32) * BITS0), offs_n,
                           n_mask, scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr,
                           res_alpha_ptr, KW1, KH, KW, DH, DW, A_M_MAJOR, BITS0, HAS_RES, COMPACT, GROUP,
                           BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    elif row0 < ROW1:
        acc = _conv_k_loop(acc, x_ptr, xb_off, ih0, iw0, m_mask, K, H, W, stride_xc, stride_xh,
                           stride_xw, kt0, kt1, qw_ptr, offs_n64 * ((K_PAD // 32) * BITS0), offs_n,
                           n_mask, scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr,
                           res_alpha_ptr, KW1, KH, KW, DH, DW, A_M_MAJOR, BITS0, HAS_RES, COMPACT, GROUP,
                           BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    elif row0 < ROW2:
        acc = _conv_k_loop(acc, x_ptr, xb_off, ih0, iw0, m_mask, K, H, W, stride_xc, stride_xh,
                           stride_xw, kt0, kt1, qw_ptr, WORD1 + (offs_n64 - ROW1) * ((K_PAD // 32) * BITS1),
                           offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr,
                           res_alpha_ptr, KW1, KH, KW, DH, DW, A_M_MAJOR, BITS1, HAS_RES, COMPACT, GROUP,
                           BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    else:
        acc = _conv_k_loop(acc, x_ptr, xb_off, ih0, iw0, m_mask, K, H, W, stride_xc, stride_xh,
                           stride_xw, kt0, kt1, qw_ptr, WORD2 + (offs_n64 - ROW2) * ((K_PAD // 32) * BITS2),
                           offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr,
                           res_alpha_ptr, KW1, KH, KW, DH, DW, A_M_MAJOR, BITS2, HAS_RES, COMPACT, GROUP,
                           BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    if SPLIT_K > 1:
        # Partials in packed-row order; fused_linear.splitk_epilogue_kernel sums them in split
        # order (deterministic) and runs the same epilogue.
        p = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, out_ptr, stride_om, N, perm_ptr,
                  t_ptr, stride_tm, lr_up_ptr, R, extra_ptr, bias_ptr,
                  HAS_PERM, HAS_LR, R_PAD, HAS_EXTRA, HAS_BIAS, USE_DOT)


@triton.jit
def conv_lowrank_down_kernel(
    x_ptr, down_ptr, scale_ptr, t_ptr, M, K, R, H, W, HO, WO,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_tm,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, A_M_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, USE_DOT: tl.constexpr,
):
    """t = (patch · L_downᵀ) · diag(lr_scale), (M, R) fp32, from the same gathered A tiles."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    xb_off, ih0, iw0 = _pixels(offs_m, HO, WO, stride_xb, SH, SW, PH, PW)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _gather_a(x_ptr, xb_off, ih0, iw0, m_mask, offs_k, K, H, W, stride_xc, stride_xh,
                      stride_xw, KH, KW, DH, DW, A_M_MAJOR)
        dt = tl.load(down_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None],
                     mask=(offs_k < K)[:, None] & r_mask[None, :], other=0.0)
        # fp32 product: t feeds the fp32 up-projection in the epilogue (as in lowrank_down_kernel).
        acc += _mm(a, dt, USE_DOT, tl.float32, True)
    acc *= tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0)[None, :]
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])
