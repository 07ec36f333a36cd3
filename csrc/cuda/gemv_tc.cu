// Tensor-core GEMV for M <= 8 rows of x ("swap AB": yᵀ = W·xᵀ on mma.m16n8k16). Semantics,
// arguments and the class rules are the SIMT GEMV's (gemv.cu, gemv.h); why this kernel exists and
// the bit math are in bitfuse/gemv_tc.h, where the CPU twin runs the same helpers.
//
// Work decomposition:
//  * A block (4 warps) owns 16 consecutive packed rows (one m16 A tile; class boundaries are
//    multiples of 16, so the block's rows share a bit width: one uniform switch at block start).
//  * x is staged in shared memory once per chunk of XC = 16384 / m_stage columns (32 KB), raw
//    fp16/bf16 in pair order (gemv_tc.h x_pair_pos): a lane's 4 B registers of a run are one
//    conflict-free 16-byte load. Rows m..m_stage-1 and columns past k are staged as 0.
//  * Split-K inside the block: warp w takes the 8-run blocks w, w+4, ... of each chunk. Lane
//    (g, t) reads word t (4-bit; FORMAT.md §3.1) of each run of rows g and g+8, 8 runs at once,
//    and the next block's words are loaded while this one is computed (two register sets).
//  * Per chunk, after staging: Σx of every (group, x row), summed once per block (group_xsum).
//  * Per run: decode the codes (magic numbers minus the magic: exact), 2 mma for Σx·q, 2 with
//    A = ±1 for the residual (only when a row of the warp has one). At the end of each group:
//    y += s·Σxq + m·Σx + α·Σ±x in fp32 (gemv_tc.h fold_group); the group's scales are loaded one
//    group ahead.
//  * The 4 warps' partial tiles are summed through shared memory in warp order (deterministic),
//    and one thread per output runs the fused epilogue (low-rank up, extra, bias) and stores
//    through perm.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "bitfuse/cuda_api.h"
#include "bitfuse/gemv_tc.h"
#include "cuda_check.cuh"
#include "ptx.cuh"

namespace bitfuse {
namespace {

using gemv::Args;
using gemv_tc::kRowsPerBlock;
using gemv_tc::kRunsPerIter;
using gemv_tc::kThreads;
using gemv_tc::kWarps;
using gemv_tc::kXHalves;
using gemv_tc::kXPad;
using ptx::LdgLoad;
using ptx::mma16816;

struct __align__(16) TcSmem {
  uint16_t xs[kXHalves + 8 * kXPad];  // m_stage rows × (XC + kXPad) halves
  float xsum[kXHalves / 32];          // Σx per (group of the chunk, x row): gemv_tc.h group_xsum
  float red[kWarps][32][4];           // the warps' partial C tiles
};

// Stage x[:, col0 : col0 + XC] (raw 16-bit values) in pair order, 8 columns (one 16-byte load) at
// a time: the 8 columns lie in one run and land as 4 aligned 32-bit pairs.
__device__ __forceinline__ void stage_x(const Args& a, int col0, int xc, int ms, uint16_t* xs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int rs = xc + kXPad;
  const int per_row = xc / 8;
  for (int i = threadIdx.x; i < ms * per_row; i += kThreads) {
    const int mi = i / per_row;
    const int col = (i % per_row) * 8;
    const int k = col0 + col;
    uint16_t v[8];
    if (mi < a.m && a.x_vec && k + 8 <= a.k) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + int64_t(mi) * a.k + k));
      const uint16_t* e = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = e[j];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = (mi < a.m && k + j < a.k) ? x[int64_t(mi) * a.k + k + j] : 0;
    }
    uint16_t* run = xs + mi * rs + (col & ~31);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = (col & 31) + 2 * e;
      *reinterpret_cast<uint32_t*>(run + gemv_tc::x_pair_pos(c)) =
          uint32_t(v[2 * e]) | (uint32_t(v[2 * e + 1]) << 16);
    }
  }
}

// The raw words of 8 runs of the lane's two rows (g, g+8): lo = word lane_word(BITS, t), hi =
// the 3-bit high-plane word, pl = the residual sign word of the row (0 without one).
template <int BITS>
struct Words {
  uint32_t lo[2][kRunsPerIter];
  uint32_t hi[2][BITS == 3 ? kRunsPerIter : 1];
  uint32_t pl[2][kRunsPerIter];
};

// Per-lane state of one warp's rows. Rows past n (the last block only) read row n - 1, which is
// in the same (last) class: their loads are valid, nothing needs a predicate, and their outputs
// are never stored.
struct Lane {
  int g, t;
  const uint32_t* words[2];  // the row's first word
  RowScales scales[2];       // its group-0 index (and compact factors)
  int ri[2];                 // residual row or -1
};

template <int BITS>
__device__ __forceinline__ void load_words(const Args& a, const Lane& ln, int run0, int runs,
                                           bool res, int kw1, Words<BITS>& w) {
  constexpr int RW = tricks::run_words(BITS);
  const int lw = gemv_tc::lane_word(BITS, ln.t);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t* wp = ln.words[h] + int64_t(run0) * RW + lw;
    const uint32_t* pp = a.res_plane + int64_t(ln.ri[h]) * kw1 + run0;
#pragma unroll
    for (int r = 0; r < kRunsPerIter; ++r) {
      const bool ok = run0 + r < runs;  // uniform across the warp
      w.lo[h][r] = ok ? __ldg(wp + r * RW) : 0u;
      if constexpr (BITS == 3) w.hi[h][r] = ok ? __ldg(wp + r * RW + 2 - lw) : 0u;
      w.pl[h][r] = (res && ok && ln.ri[h] >= 0) ? __ldg(pp + r) : 0u;
    }
  }
}

// Scale, offset and α of the lane's two rows for group grp (0 for rows past n / without residual).
__device__ __forceinline__ void load_group(const Args& a, const Lane& ln, int grp, int G, bool res,
                                           float sc[2], float zr[2], float al[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_group_params(a, ln.scales[h], grp, sc[h], zr[h], LdgLoad());
    al[h] = (res && ln.ri[h] >= 0) ? half_to_float(__ldg(a.res_alpha + int64_t(ln.ri[h]) * G + grp)) : 0.0f;
  }
}

// One 8-run block of the lane: decode, mma, fold every group that ends in it. cq/cr carry a
// group's sums; sc/zr/al hold the current group's parameters, and each fold loads the next
// group's: the next run of this block, else `next_run` (this warp's next block, -1 if none).
template <int BITS, int DT, int RPG>
__device__ __forceinline__ void run_block(const Args& a, const Lane& ln, const Words<BITS>& w,
                                          int run0, int runs, int next_run, int chunk_run0,
                                          const uint16_t* xrow, const float* xsum, int ms,
                                          bool res, int G, float y[4], float cq[4], float cr[4],
                                          float sc[2], float zr[2], float al[2]) {
#pragma unroll
  for (int r = 0; r < kRunsPerIter; ++r) {
    const int R = run0 + r;
    if (R >= runs) break;  // uniform across the warp
    uint32_t c0[4], c1[4];
    gemv_tc::lane_codes<BITS>(w.lo[0][r], BITS == 3 ? w.hi[0][r] : 0u, ln.t, DT, c0);
    gemv_tc::lane_codes<BITS>(w.lo[1][r], BITS == 3 ? w.hi[1][r] : 0u, ln.t, DT, c1);
    // Lanes whose x row is past m_stage read a staged row anyway (their C columns are never
    // stored): no predicate, no zeroing.
    const uint4 b = *reinterpret_cast<const uint4*>(xrow + (R - chunk_run0) * 32 + 8 * ln.t);
    const uint32_t a0[4] = {c0[0], c1[0], c0[1], c1[1]};  // k16 step 0: columns 0..15
    const uint32_t a1[4] = {c0[2], c1[2], c0[3], c1[3]};  // step 1: columns 16..31
    mma16816<DT>(cq, a0, b.x, b.y);
    mma16816<DT>(cq, a1, b.z, b.w);
    if (res) {
      uint32_t s0[4], s1[4];
      gemv_tc::lane_signs(w.pl[0][r], ln.t, DT, s0);
      gemv_tc::lane_signs(w.pl[1][r], ln.t, DT, s1);
      const uint32_t r0[4] = {s0[0], s1[0], s0[1], s1[1]};
      const uint32_t r1[4] = {s0[2], s1[2], s0[3], s1[3]};
      mma16816<DT>(cr, r0, b.x, b.y);
      mma16816<DT>(cr, r1, b.z, b.w);
    }
    if ((r + 1) % RPG == 0) {  // run0 is a multiple of 8 and RPG divides 8: the group ends here
      const int gl = (R - chunk_run0) / RPG;  // the group inside the chunk
      const int c0 = 2 * ln.t;                // this lane's C columns: x rows c0, c0 + 1
      const float xs2[2] = {c0 < ms ? xsum[gl * ms + c0] : 0.0f, c0 + 1 < ms ? xsum[gl * ms + c0 + 1] : 0.0f};
      gemv_tc::fold_group(y, cq, cr, xs2, sc, zr, al, res);
#pragma unroll
      for (int i = 0; i < 4; ++i) cq[i] = cr[i] = 0.0f;
      const int nr = (r + 1 < kRunsPerIter && R + 1 < runs) ? R + 1 : next_run;
      if (nr >= 0) load_group(a, ln, nr / RPG, G, res, sc, zr, al);
    }
  }
}

template <int BITS, int DT, int RPG>
__device__ __forceinline__ void tc_tile(const Args& a, int cls, int row0, TcSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Lane ln;
  ln.g = lane >> 2, ln.t = lane & 3;
  const int wpr = words_per_row(BITS, a.k_pad);
  const uint32_t* cls_words = a.qweight + a.class_word[cls];
  const int G = a.k_pad / a.group_size, kw1 = a.k_pad / 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = min(row0 + ln.g + 8 * h, a.n - 1);
    ln.words[h] = cls_words + int64_t(row - a.class_first[cls]) * wpr;
    ln.scales[h] = row_scales(a, row, G, LdgLoad());
    ln.ri[h] = a.res_index ? a.res_index[row] : -1;
  }
  const bool res = a.res_index && __any_sync(0xffffffffu, ln.ri[0] >= 0 || ln.ri[1] >= 0);
  // Every run up to k_pad, so every group is whole: the padding columns' x is staged as 0.
  const int runs = kw1;
  const int ms = gemv_tc::m_stage(a.m), xc = gemv_tc::chunk_cols(a.m), xr = xc / 32;
  const uint16_t* xrow = sm.xs + (ln.g & (ms - 1)) * (xc + kXPad);

  float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float cq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float sc[2], zr[2], al[2];
  constexpr int kStride = kWarps * kRunsPerIter;  // runs between a warp's blocks
  Words<BITS> wa, wb;
  for (int c0 = 0; c0 < runs; c0 += xr) {
    const int cend = c0 + xr < runs ? c0 + xr : runs;
    const int first = c0 + warp * kRunsPerIter;
    // This warp's first block: words and its first group's parameters go out before the barrier.
    if (first < cend) {
      load_words<BITS>(a, ln, first, cend, res, kw1, wa);
      load_group(a, ln, first / RPG, G, res, sc, zr, al);
    }
    __syncthreads();  // every warp is done with the previous chunk
    stage_x(a, c0 * 32, xc, ms, sm.xs);
    __syncthreads();
    // Σx of every (group, x row) of the chunk, for the offset terms.
    for (int e = threadIdx.x; e < ms * (xc / a.group_size); e += kThreads)
      sm.xsum[e] = gemv_tc::group_xsum(sm.xs + (e % ms) * (xc + kXPad), e / ms, a.group_size, DT);
    __syncthreads();
    for (int b = first; b < cend; b += 2 * kStride) {
      if (b + kStride < cend) load_words<BITS>(a, ln, b + kStride, cend, res, kw1, wb);
      run_block<BITS, DT, RPG>(a, ln, wa, b, cend, b + kStride < cend ? b + kStride : -1, c0, xrow,
                               sm.xsum, ms, res, G, y, cq, cr, sc, zr, al);
      if (b + kStride >= cend) break;
      if (b + 2 * kStride < cend) load_words<BITS>(a, ln, b + 2 * kStride, cend, res, kw1, wa);
      run_block<BITS, DT, RPG>(a, ln, wb, b + kStride, cend,
                               b + 2 * kStride < cend ? b + 2 * kStride : -1, c0, xrow, sm.xsum, ms,
                               res, G, y, cq, cr, sc, zr, al);
    }
  }

  // The 4 warps' tiles, summed in warp order by one thread per output, then the epilogue.
#pragma unroll
  for (int i = 0; i < 4; ++i) sm.red[warp][lane][i] = y[i];
  __syncthreads();
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (int o = threadIdx.x; o < kRowsPerBlock * a.m; o += kThreads) {
    const int lr = o / a.m, mi = o % a.m;
    const int row = row0 + lr;
    if (row >= a.n) continue;
    const int src = 4 * (lr & 7) + (mi >> 1), i = 2 * (lr >> 3) + (mi & 1);
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += sm.red[w][src][i];
    int col;
    const float yv = gemv::epilogue(a, v, row, mi, &col);
    out[int64_t(mi) * a.n + col] = DT == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(yv) : mma::f32_to_f16_bits(yv);
  }
}

// One kernel per (dtype, runs per group): the group folds sit at compile-time positions of the
// unrolled 8-run block. The bit width is a uniform switch per block (mixed classes, one launch).
template <int DT, int RPG>
__global__ void __launch_bounds__(kThreads) gemv_tc_kernel(const Args a) {
  __shared__ TcSmem sm;
  const int row0 = int(blockIdx.x) * kRowsPerBlock;
  const int cls = gemv::class_of_row(a, row0);
  switch (a.classes.bits[cls]) {
    case 2: tc_tile<2, DT, RPG>(a, cls, row0, sm); break;
    case 3: tc_tile<3, DT, RPG>(a, cls, row0, sm); break;
    default: tc_tile<4, DT, RPG>(a, cls, row0, sm); break;
  }
}

template <int DT>
void launch_dt(const Args& a, unsigned blocks, cudaStream_t s) {
  switch (a.group_size / 32) {  // 32, 64 or 128 (the binding's class table checks)
    case 1: gemv_tc_kernel<DT, 1><<<blocks, kThreads, 0, s>>>(a); break;
    case 2: gemv_tc_kernel<DT, 2><<<blocks, kThreads, 0, s>>>(a); break;
    default: gemv_tc_kernel<DT, 4><<<blocks, kThreads, 0, s>>>(a); break;
  }
}

}  // namespace

namespace cuda {

void gemv_tc_launch(const gemv::Args& args, int dtype, unsigned blocks, std::uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 2) launch_dt<mma::kDtypeBF16>(args, blocks, s);
  else launch_dt<mma::kDtypeF16>(args, blocks, s);
}

}  // namespace cuda
}  // namespace bitfuse
