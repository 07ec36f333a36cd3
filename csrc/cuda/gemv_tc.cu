// Tensor-core GEMV for M <= 8 rows of x ("swap AB": yᵀ = W·xᵀ on mma.m16n8k16). Semantics,
// arguments and the class rules are the SIMT GEMV's (gemv.cu, gemv.h); why this kernel exists and
// the bit math are in bitfuse/gemv_tc.h, where the CPU twin runs the same helpers.
//
// Work decomposition:
//  * A block (4 warps) owns 16 consecutive packed rows (one m16 A tile; class boundaries are
//    multiples of 16, so the block's rows share a bit width: one uniform switch at block start).
//  * x is staged in (dynamic) shared memory per chunk of up to 16384 / m_stage columns, only as
//    many as K needs (gemv_tc.h smem_layout), raw fp16/bf16 in pair order (x_pair_pos): a lane's
//    4 B registers of a run are one conflict-free 16-byte load. Rows m..m_stage-1 and columns
//    past k are staged as 0. While staging, each thread sums its 8 columns and the lanes of one
//    group combine their sums with shuffles: Σx of every (group, x row), for the offset terms.
//  * Split-K inside the block: warp w takes the 8-run blocks w, w+4, ... of each chunk. Lane
//    (g, t) reads word t (4-bit; FORMAT.md §3.1) of each run of rows g and g+8, 8 runs at once,
//    with the raw scale/offset (and α) words of the block's groups; the next block's are loaded
//    while this one is computed (two register sets).
//  * Per run: decode the codes (magic numbers minus the magic: exact), 2 mma for Σx·q, and for a
//    layer with a residual (a separate instantiation) 2 with A = ±1 when a row of the warp has
//    one. At the end of each group: y += s·Σxq + m·Σx + α·Σ±x in fp32 (gemv_tc.h fold_group).
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
using gemv_tc::kXPad;
using ptx::LdgLoad;
using ptx::mma16816;

// Stage x[:, col0 : col0 + cols) (raw 16-bit values, cols a multiple of 256) in pair order into
// rows of `rs` halves, and Σx of each (group, x row) into xsum[group · ms + row]. Thread i takes
// 8 columns (one 16-byte load); the 8 columns lie in one run and land as 4 aligned 32-bit pairs,
// written in an order rotated by (i >> 3) & 3 so that a warp's stores spread over all banks.
// A warp's 32 items are 256 consecutive columns of one row (cols % 256 == 0), whole groups: its
// gs/8 lanes of a group add their chunk sums with an xor butterfly, and the first writes it.
template <int DT>
__device__ __forceinline__ void stage_x(const Args& a, int col0, int cols, int ms, int rs,
                                        uint16_t* xs, float* xsum) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int per_row = cols / 8;
  const int lanes = a.group_size / 8;  // 4, 8 or 16 lanes a group
  for (int i = threadIdx.x; i < ms * per_row; i += kThreads) {  // warp-uniform trip count
    const int mi = i / per_row;
    const int col = (i % per_row) * 8;
    const int k = col0 + col;
    uint16_t v[8];
    ptx::load_act8(x + int64_t(mi) * a.k, k, a.k, mi < a.m, a.x_vec, v);
    uint16_t* run = xs + mi * rs + (col & ~31);
    const uint32_t p[4] = {uint32_t(v[0]) | (uint32_t(v[1]) << 16), uint32_t(v[2]) | (uint32_t(v[3]) << 16),
                           uint32_t(v[4]) | (uint32_t(v[5]) << 16), uint32_t(v[6]) | (uint32_t(v[7]) << 16)};
    const int rot = (i >> 3) & 3;
#pragma unroll
    for (int e0 = 0; e0 < 4; ++e0) {
      const int e = (e0 + rot) & 3;
      const uint32_t pe = e == 0 ? p[0] : e == 1 ? p[1] : e == 2 ? p[2] : p[3];
      *reinterpret_cast<uint32_t*>(run + gemv_tc::x_pair_pos((col & 31) + 2 * e)) = pe;
    }
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = mma::act_to_f32(v[j], DT);
    float s = gemv_tc::chunk8_sum(f);
    for (int off = lanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((i & (lanes - 1)) == 0) xsum[(col / a.group_size) * ms + mi] = s;
  }
}

// The raw words of 8 runs of the lane's two rows (g, g+8): lo = word lane_word(BITS, t), hi =
// the 3-bit high-plane word, pl = the residual sign word of the row (RES only); gp = the raw
// scale/offset word of each of the block's 8/RPG groups (format.h raw_group_params), ga = α's
// fp16 bits (RES only; 0 for a row without a residual).
template <int BITS, int RPG, bool RES>
struct Words {
  static constexpr int NG = kRunsPerIter / RPG;
  uint32_t lo[2][kRunsPerIter];
  uint32_t hi[2][BITS == 3 ? kRunsPerIter : 1];
  uint32_t pl[2][RES ? kRunsPerIter : 1];
  uint32_t gp[2][NG];
  uint16_t ga[2][RES ? NG : 1];
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

template <int BITS, int RPG, bool RES>
__device__ __forceinline__ void load_block(const Args& a, const Lane& ln, int run0, int runs, int G,
                                           int kw1, Words<BITS, RPG, RES>& w) {
  constexpr int RW = tricks::run_words(BITS);
  const int lw = gemv_tc::lane_word(BITS, ln.t);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t* wp = ln.words[h] + int64_t(run0) * RW + lw;
#pragma unroll
    for (int r = 0; r < kRunsPerIter; ++r) {
      const bool ok = run0 + r < runs;  // uniform across the warp
      w.lo[h][r] = ok ? __ldg(wp + r * RW) : 0u;
      if constexpr (BITS == 3) w.hi[h][r] = ok ? __ldg(wp + r * RW + 2 - lw) : 0u;
    }
#pragma unroll
    for (int j = 0; j < w.NG; ++j)  // groups whole: ok for the group's first run is ok for it
      w.gp[h][j] = run0 + j * RPG < runs ? raw_group_params(a, ln.scales[h], run0 / RPG + j, LdgLoad()) : 0u;
    if constexpr (RES) {
      const bool has = ln.ri[h] >= 0;
      const uint32_t* pp = a.res_plane + int64_t(has ? ln.ri[h] : 0) * kw1 + run0;
      const uint16_t* ap = a.res_alpha + int64_t(has ? ln.ri[h] : 0) * G + run0 / RPG;
#pragma unroll
      for (int r = 0; r < kRunsPerIter; ++r) w.pl[h][r] = (has && run0 + r < runs) ? __ldg(pp + r) : 0u;
#pragma unroll
      for (int j = 0; j < w.NG; ++j) w.ga[h][j] = (has && run0 + j * RPG < runs) ? __ldg(ap + j) : uint16_t(0);
    }
  }
}

// One 8-run block of the lane: decode, mma, fold every group that ends in it (cq/cr carry a
// group's sums). wres: some row of this warp has a residual (RES layers only).
template <int BITS, int DT, int RPG, bool RES>
__device__ __forceinline__ void run_block(const Args& a, const Lane& ln, const Words<BITS, RPG, RES>& w,
                                          int run0, int runs, int chunk_run0, const uint16_t* xrow,
                                          const float* xsum, int ms, bool wres, float y[4],
                                          float cq[4], float cr[4]) {
  const int xc0 = 2 * ln.t;  // this lane's C columns: x rows xc0, xc0 + 1
#pragma unroll
  for (int r = 0; r < kRunsPerIter; ++r) {
    const int R = run0 + r;
    if (R >= runs) break;  // uniform across the warp
    uint32_t q0[4], q1[4];
    gemv_tc::lane_codes<BITS>(w.lo[0][r], BITS == 3 ? w.hi[0][r] : 0u, ln.t, DT, q0);
    gemv_tc::lane_codes<BITS>(w.lo[1][r], BITS == 3 ? w.hi[1][r] : 0u, ln.t, DT, q1);
    // Lanes whose x row is past m_stage read a staged row anyway (their C columns are never
    // stored): no predicate, no zeroing.
    const uint4 b = *reinterpret_cast<const uint4*>(xrow + (R - chunk_run0) * 32 + 8 * ln.t);
    const uint32_t a0[4] = {q0[0], q1[0], q0[1], q1[1]};  // k16 step 0: columns 0..15
    const uint32_t a1[4] = {q0[2], q1[2], q0[3], q1[3]};  // step 1: columns 16..31
    mma16816<DT>(cq, a0, b.x, b.y);
    mma16816<DT>(cq, a1, b.z, b.w);
    if (RES && wres) {
      uint32_t s0[4], s1[4];
      gemv_tc::lane_signs(w.pl[0][r], ln.t, DT, ln.ri[0] >= 0, s0);
      gemv_tc::lane_signs(w.pl[1][r], ln.t, DT, ln.ri[1] >= 0, s1);
      const uint32_t r0[4] = {s0[0], s1[0], s0[1], s1[1]};
      const uint32_t r1[4] = {s0[2], s1[2], s0[3], s1[3]};
      mma16816<DT>(cr, r0, b.x, b.y);
      mma16816<DT>(cr, r1, b.z, b.w);
    }
    if ((r + 1) % RPG == 0) {  // run0 is a multiple of 8 and RPG divides 8: the group ends here
      const int j = r / RPG;                  // the group inside the block
      const int gl = (R - chunk_run0) / RPG;  // and inside the chunk
      float sc[2], zr[2], al[2] = {0.0f, 0.0f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        group_params_of_raw(a, ln.scales[h], w.gp[h][j], sc[h], zr[h]);
        if constexpr (RES) al[h] = half_to_float(w.ga[h][RES ? j : 0]);
      }
      const float xs2[2] = {xc0 < ms ? xsum[gl * ms + xc0] : 0.0f,
                            xc0 + 1 < ms ? xsum[gl * ms + xc0 + 1] : 0.0f};
      gemv_tc::fold_group(y, cq, cr, xs2, sc, zr, al, RES && wres);
#pragma unroll
      for (int i = 0; i < 4; ++i) cq[i] = cr[i] = 0.0f;
    }
  }
}

template <int BITS, int DT, int RPG, bool RES>
__device__ __forceinline__ void tc_tile(const Args& a, int cls, int row0, char* smem) {
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
    ln.ri[h] = RES ? a.res_index[row] : -1;
  }
  const bool wres = RES && __any_sync(0xffffffffu, ln.ri[0] >= 0 || ln.ri[1] >= 0);
  // Every run up to k_pad, so every group is whole: the padding columns' x is staged as 0.
  const int runs = kw1;
  const int ms = gemv_tc::m_stage(a.m), xr = gemv_tc::chunk_cols(a.m) / 32;
  const gemv_tc::SmemLayout L = gemv_tc::smem_layout(a.m, a.k_pad, a.group_size);
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem);
  float* xsum = reinterpret_cast<float*>(smem + L.xsum_offset);
  float4* red = reinterpret_cast<float4*>(smem + L.red_offset);
  const uint16_t* xrow = xs + (ln.g & (ms - 1)) * L.xs_stride;

  float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float cq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  constexpr int kStride = kWarps * kRunsPerIter;  // runs between a warp's blocks
  Words<BITS, RPG, RES> wa, wb;
  for (int c0 = 0; c0 < runs; c0 += xr) {
    const int cend = c0 + xr < runs ? c0 + xr : runs;
    const int first = c0 + warp * kRunsPerIter;
    // This warp's first block goes out before the barrier and the staging.
    if (first < cend) load_block(a, ln, first, cend, G, kw1, wa);
    __syncthreads();  // every warp is done with the previous chunk
    stage_x<DT>(a, c0 * 32, gemv_tc::staged_cols((cend - c0) * 32), ms, L.xs_stride, xs, xsum);
    __syncthreads();
    for (int b = first; b < cend; b += 2 * kStride) {
      if (b + kStride < cend) load_block(a, ln, b + kStride, cend, G, kw1, wb);
      run_block<BITS, DT, RPG, RES>(a, ln, wa, b, cend, c0, xrow, xsum, ms, wres, y, cq, cr);
      if (b + kStride >= cend) break;
      if (b + 2 * kStride < cend) load_block(a, ln, b + 2 * kStride, cend, G, kw1, wa);
      run_block<BITS, DT, RPG, RES>(a, ln, wb, b + kStride, cend, c0, xrow, xsum, ms, wres, y, cq, cr);
    }
  }

  // The 4 warps' tiles, summed in warp order by one thread per output, then the epilogue.
  red[warp * 32 + lane] = make_float4(y[0], y[1], y[2], y[3]);
  __syncthreads();
  const float* redf = reinterpret_cast<const float*>(red);
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (int o = threadIdx.x; o < kRowsPerBlock * a.m; o += kThreads) {
    const int lr = o / a.m, mi = o % a.m;
    const int row = row0 + lr;
    if (row >= a.n) continue;
    const int src = 4 * (lr & 7) + (mi >> 1), i = 2 * (lr >> 3) + (mi & 1);
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += redf[(w * 32 + src) * 4 + i];
    int col;
    const float yv = gemv::epilogue(a, v, row, mi, &col);
    out[int64_t(mi) * a.n + col] = DT == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(yv) : mma::f32_to_f16_bits(yv);
  }
}

// One kernel per (dtype, runs per group, residual or not): the group folds sit at compile-time
// positions of the unrolled 8-run block, and a layer without a residual carries none of its
// registers (about 160 a thread instead of 240: 3 blocks an SM). The bit width is a uniform
// switch per block (mixed classes, one launch).
template <int DT, int RPG, bool RES>
__global__ void __launch_bounds__(kThreads, RES ? 2 : 3) gemv_tc_kernel(const Args a) {
  extern __shared__ __align__(16) char smem[];
  const int row0 = int(blockIdx.x) * kRowsPerBlock;
  const int cls = gemv::class_of_row(a, row0);
  switch (a.classes.bits[cls]) {
    case 2: tc_tile<2, DT, RPG, RES>(a, cls, row0, smem); break;
    case 3: tc_tile<3, DT, RPG, RES>(a, cls, row0, smem); break;
    default: tc_tile<4, DT, RPG, RES>(a, cls, row0, smem); break;
  }
}

template <int DT, int RPG>
void launch_rpg(const Args& a, unsigned blocks, int smem, cudaStream_t s) {
  if (a.res_index) gemv_tc_kernel<DT, RPG, true><<<blocks, kThreads, smem, s>>>(a);
  else gemv_tc_kernel<DT, RPG, false><<<blocks, kThreads, smem, s>>>(a);
}

template <int DT>
void launch_dt(const Args& a, unsigned blocks, int smem, cudaStream_t s) {
  switch (a.group_size / 32) {  // 32, 64 or 128 (checked by cuda::gemv)
    case 1: launch_rpg<DT, 1>(a, blocks, smem, s); break;
    case 2: launch_rpg<DT, 2>(a, blocks, smem, s); break;
    default: launch_rpg<DT, 4>(a, blocks, smem, s); break;
  }
}

}  // namespace

namespace cuda {

void gemv_tc_launch(const gemv::Args& args, int dtype, unsigned blocks, std::uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // At most 37.4 KB (gemv_tc.h smem_layout): under the 48 KB every GPU allows without opt-in.
  const int smem = gemv_tc::smem_layout(args.m, args.k_pad, args.group_size).bytes;
  if (dtype == 2) launch_dt<mma::kDtypeBF16>(args, blocks, smem, s);
  else launch_dt<mma::kDtypeF16>(args, blocks, smem, s);
}

}  // namespace cuda
}  // namespace bitfuse
