"""The fused low-bit linear layer in Triton: one kernel family for GEMV (small M) and GEMM.

y = x·(Ŵ_b + R̂)ᵀ + (x·L_downᵀ·diag(lr_scale))·L_upᵀ + S·x + bias   (docs/FORMAT.md §1)

Layout decisions, where they are used:
  * Weights are read in the canonical layout of docs/FORMAT.md (row-major, K-contiguous; inside
    each 32-column run, column c sits in slot run_slot(c), the mma fragment order of §3.1). A tile
    is BLOCK_N packed rows × BLOCK_K codes (BLOCK_K a multiple of 32, so a tile holds whole runs).
    Each word is loaded once, as a [runs, words-per-run, BLOCK_N] tile, and unpacked into natural
    column order by a broadcast against a shift table plus a reshape (`_dequant_tile`). Loading
    one word per code instead (a gather by slot) made the software pipeliner stage 32/BITS copies
    of every word in shared memory: the AOT compile check (kernels/aot.py) measured 270 KB a block
    for a mixed-class layer at 64×64×64 on sm_90, over every arch's limit; now 59 KB.
  * BLOCK_K divides the group size, so one K tile sees one scale/offset per row: they are loaded
    once per tile as a BLOCK_N vector, and the dequant is one fma in fp32 (q·s is exact).
  * Mixed-precision classes are contiguous runs of packed rows whose boundaries are multiples of
    row_align (16 or 64), and BLOCK_N divides the boundaries, so a program's N tile lies in one class.
    The class is found from the tile's first row with scalar compares, and the K loop is
    specialised per bit width (constexpr) behind a runtime branch: one launch for all classes.
  * The binary residual is applied inside the dequant (fp32 add of ±α) before the product.
  * The low-rank down-projection t = x·L_downᵀ·diag(lr_scale) is one tiny kernel (M × r, fp32);
    the up-projection t·L_upᵀ, the sparse product, the bias and the cast happen in the epilogue,
    which stores through the inverse permutation (out[:, perm[i]] = packed row i).
  * GEMV (USE_DOT=False): products as broadcast-multiply + sum in fp32, with split-K across
    programs and a deterministic second pass that sums the partials and runs the epilogue.
    GEMM (USE_DOT=True): tl.dot in the activation dtype with fp32 accumulation.
  * Under the Triton interpreter, tl.dot on bf16 operands is wrong (triton 3.9); the launcher then
    runs that product in fp32 instead (bf16 -> fp32 is exact), so the index and dequant logic is
    still what is tested. On a GPU, bf16 stays bf16.
No host syncs and no data-dependent allocations: the launches are CUDA-graph safe.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """[BM, BK] x [BK, BN] -> [BM, BN] fp32."""
    if USE_DOT:
        if DOT_FP32:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    else:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return r


@triton.jit
def _dequant_tile(qw_ptr, word_base, k0, offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, g_idx, G,
                  res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1,
                  BITS: tl.constexpr, HAS_RES: tl.constexpr, COMPACT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ŵ_b (+ R̂) for columns k0 .. k0 + BLOCK_K (k0 a multiple of 32) × BLOCK_N packed rows, as
    fp32 [BLOCK_K, BLOCK_N] in natural column order.

    Each packed word is loaded once (BITS·BLOCK_K/32 words per row, not one word per code: the
    pipeliner stages what is loaded, so a per-code gather would stage 32/BITS copies of every
    word). Codes are unpacked by broadcasting the words against a shift table and reshaping.
    Inside a 32-column run, column c = 16·c4 + 8·c3 + 4·c2 + 2·c1 + c0 sits in slot
    run_slot(c) = 16·c2 + 8·c1 + 4·c0 + 2·c4 + c3 (FORMAT.md §3.1). With v = 2·c4 + c3 the
    tile's column index is run·32 + 8·v + (the rest of c), so the code tensor is laid out
    [run, v, ..., BLOCK_N] and a row-major reshape gives natural order:
      4-bit: word c2c1 (4 a run), nibble 4·c0 + v           -> [T, v, word, c0, N]
      2-bit: word c2 (2 a run), pair 4·(2·c1 + c0) + v       -> [T, v, word, u=c1c0, N]
      3-bit: low planes as 2-bit (words 3r, 3r+1), bit plane word 3r+2 bit run_slot(c)
      residual: one word a run, bit run_slot(c) = 16·c2 + 4·u + v  -> [T, v, c2, u, N]
    """
    T: tl.constexpr = BLOCK_K // 32
    nm = n_mask[None, :]
    runs = k0 // 32 + tl.arange(0, T)                       # [T] runs of this tile
    v = tl.arange(0, 4)[None, :, None, None, None]          # 2·c4 + c3
    c2 = tl.arange(0, 2)[None, None, :, None, None]
    u = tl.arange(0, 4)[None, None, None, :, None]          # 2·c1 + c0
    if BITS == 4:
        wi = tl.arange(0, 4)
        wd = tl.load(qw_ptr + word_base[None, None, :] + (4 * runs)[:, None, None] + wi[None, :, None],
                     mask=nm[None, :, :], other=0)          # [T, 4 words, N]
        c0 = tl.arange(0, 2)[None, None, None, :, None]
        q = (wd[:, None, :, None, :] >> (4 * (4 * c0 + v))) & 15   # [T, v, word, c0, N]
    elif BITS == 2:
        wi = tl.arange(0, 2)
        wd = tl.load(qw_ptr + word_base[None, None, :] + (2 * runs)[:, None, None] + wi[None, :, None],
                     mask=nm[None, :, :], other=0)          # [T, 2 words, N]
        q = (wd[:, None, :, None, :] >> (2 * (4 * u + v))) & 3     # [T, v, c2, u, N]
    else:
        wi = tl.arange(0, 2)
        lo = tl.load(qw_ptr + word_base[None, None, :] + (3 * runs)[:, None, None] + wi[None, :, None],
                     mask=nm[None, :, :], other=0)          # [T, 2 words, N]
        hi = tl.load(qw_ptr + word_base[None, :] + (3 * runs + 2)[:, None], mask=nm, other=0)  # [T, N]
        q = ((lo[:, None, :, None, :] >> (2 * (4 * u + v))) & 3) \
            | (((hi[:, None, None, None, :] >> (16 * c2 + 4 * u + v)) & 1) << 2)
    q = tl.reshape(q, (BLOCK_K, q.shape[-1]))
    if COMPACT:
        # Compact scales (FORMAT.md §5.1): 8-bit codes on the row's grids, 3 fp16 row factors.
        # Both products are exact in fp32, so this matches pack.expand_scales bit for bit.
        sc = tl.load(scales_ptr + offs_n * G + g_idx, mask=n_mask, other=0).to(tl.float32)
        zc = tl.load(zeros_ptr + offs_n * G + g_idx, mask=n_mask, other=0).to(tl.float32)
        f_step = tl.load(rows_ptr + offs_n * 3, mask=n_mask, other=0.0).to(tl.float32)
        f_zlo = tl.load(rows_ptr + offs_n * 3 + 1, mask=n_mask, other=0.0).to(tl.float32)
        f_zstep = tl.load(rows_ptr + offs_n * 3 + 2, mask=n_mask, other=0.0).to(tl.float32)
        s = sc * f_step
        z = f_zlo + zc * f_zstep
    else:
        s = tl.load(scales_ptr + offs_n * G + g_idx, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * G + g_idx, mask=n_mask, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * s[None, :] + z[None, :]
    if HAS_RES:
        ri = tl.load(res_index_ptr + offs_n, mask=n_mask, other=-1)
        has = ri >= 0
        ri = tl.where(has, ri, 0).to(tl.int64)
        rw = tl.load(res_plane_ptr + ri[None, :] * KW1 + runs[:, None], mask=has[None, :], other=0)  # [T, N]
        bit = (rw[:, None, None, None, :] >> (16 * c2 + 4 * u + v)) & 1
        sign = tl.reshape(bit, (BLOCK_K, q.shape[-1])).to(tl.float32) * 2.0 - 1.0
        alpha = tl.load(res_alpha_ptr + ri * G + g_idx, mask=has, other=0.0).to(tl.float32)
        w += alpha[None, :] * sign
    return w


@triton.jit
def _k_loop(acc, x_ptr, stride_xm, offs_m, m_mask, K, kt0, kt1,
            qw_ptr, word_base, offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, G,
            res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1,
            BITS: tl.constexpr, HAS_RES: tl.constexpr, COMPACT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
            USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    for kt in range(kt0, kt1):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        g_idx = (kt * BLOCK_K) // GROUP
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, word_base, kt * BLOCK_K, offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr,
                          g_idx, G, res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1, BITS, HAS_RES, COMPACT,
                          BLOCK_K)
        acc += _mm(xt, w, USE_DOT, DOT_DTYPE, DOT_FP32)
    return acc


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, out_ptr, stride_om, N, perm_ptr,
              t_ptr, stride_tm, lr_up_ptr, R, extra_ptr, bias_ptr,
              HAS_PERM: tl.constexpr, HAS_LR: tl.constexpr, R_PAD: tl.constexpr,
              HAS_EXTRA: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr):
    """acc (+ low-rank up) (+ sparse) (+ bias) -> cast -> store through the permutation."""
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        tt = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        up = tl.load(lr_up_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # fp32 product: t is small (r columns) and already fp32; keep its precision.
        acc += _mm(tt, up, USE_DOT, tl.float32, True)
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_n, mask=n_mask, other=0)
    else:
        cols = offs_n
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_EXTRA:
        acc += tl.load(extra_ptr + offs_m[:, None] * N + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_linear_kernel(
    x_ptr, out_ptr, part_ptr,
    qw_ptr, scales_ptr, zeros_ptr, rows_ptr, perm_ptr, res_index_ptr, res_plane_ptr, res_alpha_ptr,
    t_ptr, lr_up_ptr, extra_ptr, bias_ptr,
    M, N, K, K_PAD, R, stride_xm, stride_om, stride_tm,
    ROW1, ROW2, WORD1, WORD2,
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
    G = K_PAD // GROUP
    KW1 = K_PAD // 32
    # This split's whole K tiles.
    k_tiles = K_PAD // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = pid_k * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)
    offs_n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid_n * BLOCK_N
    # A row's words: (K_PAD // 32) runs × BITS words. Written this way (not K_PAD * BITS // 32)
    # triton's divisibility analysis sees a multiple of BITS, so 4-bit words load as 16-byte
    # vectors (cp.async 16 / ld.v4; the other form compiled to 8-byte loads, AOT check PTX).
    if N_CLASSES == 1:
        acc = _k_loop(acc, x_ptr, stride_xm, offs_m, m_mask, K, kt0, kt1, qw_ptr,
                      offs_n64 * ((K_PAD // 32) * BITS0), offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr, G,
                      res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1, BITS0, HAS_RES, COMPACT, GROUP,
                      BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    else:
        # The tile's class, from its first row (tiles never straddle classes, see module doc).
        if row0 < ROW1:
            acc = _k_loop(acc, x_ptr, stride_xm, offs_m, m_mask, K, kt0, kt1, qw_ptr,
                          offs_n64 * ((K_PAD // 32) * BITS0), offs_n, n_mask, scales_ptr, zeros_ptr, rows_ptr,
                          G, res_index_ptr, res_plane_ptr, res_alpha_ptr, KW1, BITS0, HAS_RES, COMPACT,
                          GROUP, BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
        elif row0 < ROW2:
            acc = _k_loop(acc, x_ptr, stride_xm, offs_m, m_mask, K, kt0, kt1, qw_ptr,
                          WORD1 + (offs_n64 - ROW1) * ((K_PAD // 32) * BITS1), offs_n, n_mask,
                          scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr, res_alpha_ptr,
                          KW1, BITS1, HAS_RES, COMPACT, GROUP, BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
        else:
            acc = _k_loop(acc, x_ptr, stride_xm, offs_m, m_mask, K, kt0, kt1, qw_ptr,
                          WORD2 + (offs_n64 - ROW2) * ((K_PAD // 32) * BITS2), offs_n, n_mask,
                          scales_ptr, zeros_ptr, rows_ptr, G, res_index_ptr, res_plane_ptr, res_alpha_ptr,
                          KW1, BITS2, HAS_RES, COMPACT, GROUP, BLOCK_K, USE_DOT, DOT_DTYPE, DOT_FP32)
    if SPLIT_K > 1:
        # Partial sums in packed-row order; splitk_epilogue_kernel adds them in a fixed order.
        p = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, out_ptr, stride_om, N, perm_ptr,
                  t_ptr, stride_tm, lr_up_ptr, R, extra_ptr, bias_ptr,
                  HAS_PERM, HAS_LR, R_PAD, HAS_EXTRA, HAS_BIAS, USE_DOT)


@triton.jit
def splitk_epilogue_kernel(
    part_ptr, out_ptr, perm_ptr, t_ptr, lr_up_ptr, extra_ptr, bias_ptr,
    M, N, R, stride_om, stride_tm,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_LR: tl.constexpr, R_PAD: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Sum the split-K partials in split order (deterministic), then run the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :],
                       mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_n, m_mask, n_mask, out_ptr, stride_om, N, perm_ptr,
              t_ptr, stride_tm, lr_up_ptr, R, extra_ptr, bias_ptr,
              HAS_PERM, HAS_LR, R_PAD, HAS_EXTRA, HAS_BIAS, USE_DOT)


@triton.jit
def lowrank_down_kernel(
    x_ptr, down_ptr, scale_ptr, t_ptr, M, K, R, stride_xm, stride_tm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, USE_DOT: tl.constexpr,
):
    """t = (x · L_downᵀ) · diag(lr_scale), (M, R) fp32: the tiny kernel before the main one."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        dt = tl.load(down_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None],
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += _mm(xt, dt, USE_DOT, tl.float32, True)
    acc *= tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0)[None, :]
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])
