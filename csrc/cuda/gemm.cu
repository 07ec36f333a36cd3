// Fused low-bit tensor-core GEMM for M > 8 rows of x (issue #4; any M by masking): one launch
// computes
//   y = x·(Ŵ_b + R̂)ᵀ + t·L_upᵀ + extra + bias   stored through perm, in x's dtype,
// for every bit class of the layer (2/3/4-bit, mixed), reading the packed words of FORMAT.md as
// they are. Index math, the copy plan, the B-fragment decode and the epilogue live in
// bitfuse/gemm.h and bitfuse/mma_tile.h, where the CPU twin (`_C.gemm_host`) runs the same code;
// the tile table is bitfuse/gemm_config.h. What only this file does: the PTX (cp.async, ldmatrix,
// mma), the thread -> work mapping and the pipeline.
//
// Design, in the order the data flows:
//  * Grid: blockIdx.x = N tile (numbered class by class, so a block's rows share one bit width and
//    the block switches once into a BITS-specialised body), blockIdx.y = M tile. N is the fast
//    index: the blocks resident at one time share x's M tiles, which stay in L2, while each block
//    streams its own weights once.
//  * Pipeline: STAGES shared-memory stages filled by cp.async (commit_group per k tile,
//    wait_group<STAGES-2> before use): the x tile (16-byte copies of the rows < M, zero-fill past K), the
//    raw weight words, the per-group scale/offset (and α) windows and the residual sign words.
//    One __syncthreads per k tile both publishes stage kt and retires stage kt-1, which is the
//    one refilled next, so loads for k tile kt+STAGES-1 overlap the mma of k tile kt.
//  * A operand: ldmatrix.x4 from the XOR-swizzled x tile (conflict-free, mma_tile.h).
//  * B operand: never staged dequantized. Each lane reads its own slots of the run (FORMAT.md
//    §3.1 slot order: one 4-bit word, a 2-bit / 3-bit-low half word, plane bytes), unpacks them
//    with the fp16 magic number, dequantizes in fp32 (Ŵ = q·s + m, ± α: bit-identical to the
//    reference) and rounds once to fp16/bf16 for the mma. A decoded fragment serves all of the
//    warp's m16 tiles (4 in every tile of the table).
//  * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}, fp32 accumulators in registers.
//  * M <= 16 (the skinny tile, gemm.h "Skinny tile"; skinny_k_tile below): the operands swap.
//    The packed rows are the A operand, holding the exact integer codes (no dequantization), x
//    the B operand (ldmatrix), and each group's scale and offset are applied afterwards in fp32
//    (y += s·Σx·q + m·Σx, Σx by one more mma), as in the tensor-core GEMV; its scales come from
//    global memory a group ahead instead of staged windows. The pipeline, split-K and the
//    epilogue are the same code as the other tiles'.
//  * Split-K inside the block (WK > 1, small-M tiles): warp-k w takes runs w, w+WK, ... of every
//    k tile; at the end the partials go through shared memory and warp-k 0 adds them in the
//    order 1, 2, ..: deterministic, no atomics.
//  * Epilogue per accumulator (mma_tile.h c_row/c_col say which (x row, packed row) it is):
//    + t·L_upᵀ + extra + bias, cast, store to out[m, perm[row]] (the inverse permutation, fused).
//    The low-rank term is summed from shared memory: per m16 tile index the block stages the t
//    rows and (once, when r fits one chunk) its lr_up rows with coalesced loads into the freed
//    stages, every warp (warps-k >= 1 included) sums its share into the epilogue tiles, and the
//    accumulators are added to those sums (lowrank_tile; gemm.h "Low-rank up-projection").
//  * Split-K across blocks when the grid is small (gemm_config.h plan_split, S = gridDim.z > 1):
//    block (n tile, m tile, s) runs the same pipeline over its own k tiles only, stores its fp32
//    partial tile (raw accumulators, no epilogue) to the workspace, and the last of the S blocks
//    of the tile to arrive sums the S partials in the order s = 0..S-1 and runs the epilogue:
//    split_fixup below, which says why it is done in this kernel and not in a second one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "bitfuse/cuda_api.h"
#include "bitfuse/gemm_config.h"
#include "bitfuse/mma_tile.h"
#include "cuda_check.cuh"
#include "ptx.cuh"

namespace bitfuse {
namespace {

using gemm::Args;
using gemm::BlockTile;
using gemm::WarpPos;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async with zero-fill: `bytes` (<= size) bytes are read, the rest of the size-byte
// destination is written with zeros; bytes = 0 reads nothing. 16-byte copies bypass L1 (.cg:
// every byte is used once per block); 4-byte copies can only be .ca.
struct CpAsync {
  uint32_t base;  // shared address of the stage
  __host__ __device__ void operator()(int size, int smem, const void* src, int bytes) const {
#if defined(__CUDA_ARCH__)
    if (size == 16)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(base + smem), "l"(src),
                   "r"(bytes)
                   : "memory");
    else
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(base + smem), "l"(src),
                   "r"(bytes)
                   : "memory");
#else
    (void)size, (void)smem, (void)src, (void)bytes;
#endif
  }
};
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The A fragment of one m16k16 tile: lane gives the address of one row (mma_tile.h ldsm_row/col).
// The "memory" clobber keeps it after the __syncthreads that publishes the stage.
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t a[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr)
               : "memory");
}

using ptx::mma16816;

template <int DT>
__device__ __forceinline__ uint16_t to_act(float v) {
  return DT == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(v) : mma::f32_to_f16_bits(v);
}

// lr_stage's global loads and shared stores on the device: read-only loads (ld.global.nc: t and
// lr_up are never written by the kernel); a dummy load (real = false) reads a valid address
// whose value is discarded.
struct LrIO {
  char* smem;
  __device__ __forceinline__ float ld(const float* p, bool) const { return __ldg(p); }
  __device__ __forceinline__ uint16_t ld(const uint16_t* p, bool) const { return __ldg(p); }
  __device__ __forceinline__ void st(int off, float v) const {
    *reinterpret_cast<float*>(smem + off) = v;
  }
  __device__ __forceinline__ void st(int off, uint16_t v) const {
    *reinterpret_cast<uint16_t*>(smem + off) = v;
  }
};

// The low-rank sums of m16 tile i of the block into the epilogue tiles (gemm.h, "Low-rank
// up-projection"): every thread of the block must call it (barriers), with the same i. On return
// the tile's sums are complete and visible to the whole block. The lr_up rows are staged once per
// block when r is one chunk (they do not depend on i), else again for every (i, chunk).
template <class T>
__device__ __forceinline__ void lowrank_tile(const Args& a, const BlockTile& bt, const WarpPos& w,
                                             int lane, int i, char* smem, float* epi) {
  LrIO io{smem};
  const bool one_chunk = a.r <= T::LR_CHUNK;
#pragma unroll 1
  for (int c0 = 0; c0 < a.r; c0 += T::LR_CHUNK) {
    const int len = gemm::lr_len(a.r, c0, T::LR_CHUNK);
    if (c0 > 0) __syncthreads();  // every lane is done with the previous chunk's staging
    gemm::lr_stage<T>(a, bt, i, c0, len, !one_chunk || i == 0, threadIdx.x, T::THREADS, io);
    __syncthreads();
    gemm::lr_sums<T>(a, bt, w, lane, i, c0, len, smem, epi);
  }
  __syncthreads();  // the sums of every warp-k share are in the tiles; the staging may be reused
}

// The cp.async pipeline of one block over k tiles [kr.kt0, kr.kt1) (all of K unless split-K):
// compute(stage, stage_addr, kg) runs once per k tile kg, in order, once its stage has landed.
// On return the stages are free (gemm_epilogue reuses them).
//
// Iteration it issues the copies of k tile kt0 + it (one commit group per iteration, empty past
// the end so that the wait_group counts stay uniform) and computes k tile kt0 + kt,
// kt = it - (STAGES - 1) (stage slots count from the block's first k tile):
// the first STAGES - 1 iterations are the prologue. Before computing kt, wait_group leaves at
// most STAGES - 2 younger groups in flight, so this thread's copies of kt have landed, and the
// barrier makes everyone's visible and retires k tile kt - 1, whose stage the copies of this
// iteration (k tile kt + STAGES - 1) overwrite. One copy site and one compute site keep the
// code (and the build) small.
template <class T, int BITS, class Compute>
__device__ __forceinline__ void gemm_pipeline(const Args& a, const BlockTile& bt,
                                              const gemm::KRange& kr, char* smem, const int* s_ri,
                                              bool res, Compute& compute) {
  const int tid = threadIdx.x;
  const bool vec = a.class_vec[bt.cls] != 0;
  const int ktiles = kr.kt1 - kr.kt0;  // this block's k tiles, from kr.kt0 on
  // The skinny tile's interior k tiles take their copies from a hoisted plan (gemm.h
  // SkinnyCopies; its layers with 16-byte weight copies): the same copies at a fraction of the
  // instructions. (Other tiles: an empty plan, never used.)
  using Plan = gemm::SkinnyCopies<T, BITS>;
  const bool hoisted = T::SWAP && vec && Plan::interior(a, kr.kt0);
  Plan plan;
  if constexpr (T::SWAP) {
    if (hoisted) plan.init(a, bt, kr.kt0, s_ri, res, tid);
  }
#pragma unroll 1
  for (int it = 0; it < ktiles + T::STAGES - 1; ++it) {
    const int kt = it - (T::STAGES - 1);
    if (kt >= 0) {
      cp_async_wait<T::STAGES - 2>();
      __syncthreads();
    }
    if (it < ktiles) {
      CpAsync cp{smem_addr(smem + (it % T::STAGES) * T::STAGE_BYTES)};
      if (T::SWAP && hoisted && Plan::interior(a, kr.kt0 + it))
        plan.issue(a, cp);
      else
        gemm::stage_copies<T, BITS>(a, bt, kr.kt0 + it, s_ri, vec, res, tid, T::THREADS, cp);
    }
    cp_async_commit();
    if (kt < 0) continue;
    const char* stage = smem + (kt % T::STAGES) * T::STAGE_BYTES;
    compute(stage, smem_addr(stage), kr.kt0 + kt);
  }
  cp_async_wait<0>();  // only empty groups remain; the stages are reused by the epilogue
  __syncthreads();
}

// res_index of the block's BN rows into shared memory (-1: none, or past the class's end).
template <class T>
__device__ __forceinline__ int* stage_res_index(const Args& a, const BlockTile& bt, char* smem) {
  int* s_ri = reinterpret_cast<int*>(smem + T::RI_OFF);
  const bool res = a.res_index != nullptr;
  for (int i = threadIdx.x; i < T::BN; i += T::THREADS)
    s_ri[i] = (res && bt.row0 + i < bt.row_end) ? a.res_index[bt.row0 + i] : -1;
  __syncthreads();
  return s_ri;
}

// The skinny tile's per-warp state (gemm.h "Skinny tile"): the lane's rows and addresses, the
// group sums (Σx·q, Σ±x·signs, Σx) and the next group's stored scales, loaded ahead.
template <class T, int BITS>
struct SkinnyWarp {
  WarpPos w;
  int lane, nx, run_end, shift, g;  // shift: log2(runs a group); g: the group raw / alpha hold
  bool wres;                    // some row of the warp has a residual (else no sign products)
  int word[T::MW][2];           // skinny_word of the warp's first run of a k tile
  int ldsm[T::RUNS_PER_WARP][T::NX];  // skinny_ldsm_offset of each of its runs, stage-relative
  gemm::SkinnyRows rows[T::MW];
  gemm::SkinnyParams par[T::MW];  // group g's s, m and α of the lane's rows, as loaded
  float cq[T::MW][T::NX][4], cr[T::MW][T::NX][4], xs[T::NX][4];
};

template <class T, int BITS>
__device__ __forceinline__ void skinny_warp(const Args& a, const BlockTile& bt,
                                            const gemm::KRange& kr, const int* s_ri,
                                            SkinnyWarp<T, BITS>& sw) {
  sw.lane = threadIdx.x & 31;
  sw.w = gemm::warp_pos<T>(threadIdx.x >> 5);
  bool mine = false;
  for (int i = sw.lane; i < T::WTN; i += 32) mine = mine || s_ri[sw.w.wn * T::WTN + i] >= 0;
  sw.wres = a.res_index != nullptr && __any_sync(0xffffffffu, mine);
  sw.nx = gemm::warp_n8_tiles<T>(a, bt, sw.w.wm);
  sw.run_end = min(kr.kt1 * T::RUNS, (a.k + 31) / 32);  // runs past K: padding only
  sw.shift = gemm::skinny_rpg_shift(a.group_size);
  sw.g = gemm::skinny_first_group<T>(kr.kt0, sw.w.wk, sw.shift);
  // Defined values for the sums of n8 tiles past M too (never computed, folded into accumulators
  // that are never stored): once a block, not a fold.
#pragma unroll
  for (int j = 0; j < T::NX; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sw.xs[j][e] = 0.0f;
#pragma unroll
      for (int i = 0; i < T::MW; ++i) sw.cq[i][j][e] = sw.cr[i][j][e] = 0.0f;
    }
  // Offsets through ptx::opaque: computed once here, kept in registers (ptxas would otherwise
  // recompute them from threadIdx in every k tile: ~20 instructions a run).
  const int rho0 = gemm::skinny_run<T>(sw.w.wk, 0);
#pragma unroll
  for (int i = 0; i < T::MW; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      sw.word[i][h] = int(ptx::opaque(uint32_t(gemm::skinny_word<T, BITS>(sw.w, i, sw.lane, h, rho0))));
    sw.rows[i] = gemm::skinny_rows<T>(a, bt, s_ri, sw.w, sw.lane, i, ptx::LdgLoad());
    gemm::skinny_raw_params(a, sw.rows[i], sw.g, sw.par[i], ptx::LdgLoad());
  }
#pragma unroll
  for (int jr = 0; jr < T::RUNS_PER_WARP; ++jr)
#pragma unroll
    for (int j = 0; j < T::NX; ++j)
      sw.ldsm[jr][j] = int(ptx::opaque(uint32_t(gemm::skinny_ldsm_offset<T>(sw.w, j, rho0 + jr, sw.lane))));
}

// One k tile kg of the skinny tile into acc, L consecutive runs of the warp a group (gemm.h
// skinny_warp_group_runs: 1 for groups of 32, 2 for 64 and 128): per run of the warp, the exact
// codes of its MW m16 tiles of packed rows as A, its live n8 tiles of x rows as B (ldmatrix),
// Σx·q and Σx (A = 1.0) summed per group, the residual as a product with A = ±1; folded into acc
// where the warp's group ends, after which the next group's parameters are loaded. The run loop
// is unrolled, so a group's first products write C = 0 (no zeroing after a fold) and the folds
// sit at fixed places.
template <class T, int BITS, int DT, int L>
__device__ __forceinline__ void skinny_k_tile(const Args& a, const char* stage, uint32_t stage_addr,
                                              int kg, SkinnyWarp<T, BITS>& sw,
                                              float (&acc)[T::A1][T::A2][4]) {
  static_assert(T::RUNS_PER_WARP % L == 0, "a warp's runs of a k tile are whole groups of L");
  const uint32_t ones = exact::one_pair(DT);
  const uint32_t one4[4] = {ones, ones, ones, ones};
  const uint32_t* sB = reinterpret_cast<const uint32_t*>(stage + T::B_OFF);
  const uint32_t* sP = reinterpret_cast<const uint32_t*>(stage + T::P_OFF);
  const int t = mma::thread_in_group(sw.lane);
#pragma unroll
  for (int jr = 0; jr < T::RUNS_PER_WARP; ++jr) {
    const int rho = gemm::skinny_run<T>(sw.w.wk, jr);
    const bool first = gemm::skinny_group_first(jr, L);  // compile-time after unrolling
    if (kg * T::RUNS + rho < sw.run_end) {
      uint32_t q[T::MW][8];
#pragma unroll
      for (int i = 0; i < T::MW; ++i) {
        uint32_t lo[2], hi[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int wi = sw.word[i][h] + jr * BITS;  // linear in the run
          lo[h] = sB[wi];
          hi[h] = BITS == 3 ? sB[wi - exact::lane_word(BITS, t) + 2] : 0u;
        }
        gemm::skinny_codes<BITS, DT>(lo, hi, t, q[i]);
      }
      uint32_t b[T::NX][4];
#pragma unroll
      for (int j = 0; j < T::NX; ++j)
        if (j < sw.nx) ldsm_x4(stage_addr + sw.ldsm[jr][j], b[j]);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < T::NX; ++j) {
          if (j >= sw.nx) break;  // n8 tiles wholly past M: nothing to compute
          const bool zc = first && s == 0;  // the group's first product: C = 0
          mma16816<DT>(sw.xs[j], one4, b[j][2 * s], b[j][2 * s + 1], zc);
#pragma unroll
          for (int i = 0; i < T::MW; ++i)
            mma16816<DT>(sw.cq[i][j], &q[i][4 * s], b[j][2 * s], b[j][2 * s + 1], zc);
        }
      if (sw.wres) {
#pragma unroll
        for (int i = 0; i < T::MW; ++i) {
          uint32_t pl[2], r[8];
          bool has[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            pl[h] = sP[gemm::skinny_plane_word<T>(gemm::skinny_row<T>(sw.w, i, sw.lane, h), rho)];
            has[h] = sw.rows[i].ri[h] >= 0;
          }
          gemm::skinny_signs<DT>(pl, has, t, r);
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int j = 0; j < T::NX; ++j) {
              if (j >= sw.nx) break;
              mma16816<DT>(sw.cr[i][j], &r[4 * s], b[j][2 * s], b[j][2 * s + 1], first && s == 0);
            }
        }
      }
    }
    if (gemm::skinny_group_last(jr, L) &&
        gemm::skinny_group_first_run<T>(kg, sw.w.wk, jr, L) < sw.run_end) {
#pragma unroll
      for (int i = 0; i < T::MW; ++i) {
        float sc[2], zr[2], al[2];
        gemm::skinny_params(a, sw.rows[i], sw.par[i], sc, zr, al);
#pragma unroll
        for (int j = 0; j < T::NX; ++j)
          exact::fold_group(acc[i][j], sw.cq[i][j], sw.cr[i][j], sw.xs[j], sc, zr, al, sw.wres);
      }
      sw.g = gemm::skinny_next_group<T>(kg, sw.w.wk, jr, sw.shift);  // its parameters, a group ahead
#pragma unroll
      for (int i = 0; i < T::MW; ++i)
        gemm::skinny_raw_params(a, sw.rows[i], sw.g, sw.par[i], ptx::LdgLoad());
    }
  }
}

// The skinny tile's main loop (T::SWAP): the pipeline with skinny_k_tile as its compute.
template <class T, int BITS, int DT, int L>
__device__ __forceinline__ void skinny_mainloop(const Args& a, const BlockTile& bt,
                                                const gemm::KRange& kr, char* smem,
                                                float (&acc)[T::A1][T::A2][4]) {
  const int* s_ri = stage_res_index<T>(a, bt, smem);
  SkinnyWarp<T, BITS> sw;
  skinny_warp<T, BITS>(a, bt, kr, s_ri, sw);
  auto compute = [&](const char* stage, uint32_t stage_addr, int kg) {
    skinny_k_tile<T, BITS, DT, L>(a, stage, stage_addr, kg, sw, acc);
  };
  gemm_pipeline<T, BITS>(a, bt, kr, smem, s_ri, a.res_index != nullptr, compute);
}

// The main loop of one block: rows [bt.row0, bt.row_end) of one class (width BITS) × x rows
// [bt.m0, bt.m0 + BM), over k tiles [kr.kt0, kr.kt1), into this lane's accumulators: per run,
// each lane decodes its B fragments (fp32 dequant, one rounding to x's dtype) and multiplies them
// with the ldmatrix'd x fragments of the warp's live m16 tiles. The skinny tile has its own.
template <class T, int BITS, int DT>
__device__ __forceinline__ void gemm_mainloop(const Args& a, const BlockTile& bt,
                                              const gemm::KRange& kr, char* smem,
                                              float (&acc)[T::A1][T::A2][4]) {
#pragma unroll
  for (int i = 0; i < T::A1; ++i)
#pragma unroll
    for (int j = 0; j < T::A2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  if constexpr (T::SWAP) {
    // Groups of 32, 64 or 128 (select_tile picks this tile for no other): a warp's run count a
    // group, the only thing the unrolled loop needs at compile time, is 1, 2 or 2.
    constexpr int L1 = gemm::skinny_warp_group_runs<T>(1), L2 = gemm::skinny_warp_group_runs<T>(4);
    static_assert(gemm::skinny_warp_group_runs<T>(2) == L2, "groups of 64 and 128 fold alike");
    if (a.group_size == 32) skinny_mainloop<T, BITS, DT, L1>(a, bt, kr, smem, acc);
    else skinny_mainloop<T, BITS, DT, L2>(a, bt, kr, smem, acc);
  } else {
    const int lane = threadIdx.x & 31;
    const WarpPos w = gemm::warp_pos<T>(threadIdx.x >> 5);
    const bool res = a.res_index != nullptr;
    const int* s_ri = stage_res_index<T>(a, bt, smem);
    const int mtiles = gemm::warp_m_tiles<T>(a, bt, w.wm);
    auto compute = [&](const char* stage, uint32_t stage_addr, int kg) {
#pragma unroll 1
      for (int jr = 0; jr < T::RUNS_PER_WARP; ++jr) {
        const int rho = gemm::warp_run<T>(w.wk, jr);
        if (kg * T::BK + 32 * rho >= a.k) break;  // runs past K hold only padding (x = 0)
        uint32_t b[T::NT][4];
        gemm::decode_b<T, BITS, DT>(a, bt, kg, stage, s_ri, w, lane, rho, res, b);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int i = 0; i < T::MT; ++i) {
            if (i >= mtiles) break;  // m16 tiles wholly past M: nothing to compute
            uint32_t af[4];
            ldsm_x4(stage_addr + gemm::a_ldsm_offset<T>(w, i, rho, s, lane), af);
#pragma unroll
            for (int j = 0; j < T::NT; ++j) mma16816<DT>(acc[i][j], af, b[j][2 * s], b[j][2 * s + 1]);
          }
        }
      }
    };
    gemm_pipeline<T, BITS>(a, bt, kr, smem, s_ri, res, compute);
  }
}

// The epilogue of one block, after its main loop (whatever the class's width: one copy per
// kernel): the in-block split-K sum, then per m16 tile the low-rank sums, + the accumulators,
// + extra + bias, cast and store through perm (or, with split-K across blocks, the raw partial).
template <class T, int DT>
__device__ __forceinline__ void gemm_epilogue(const Args& a, const BlockTile& bt,
                                              const gemm::KRange& kr, char* smem,
                                              float (&acc)[T::A1][T::A2][4]) {
  const int lane = threadIdx.x & 31;
  const WarpPos w = gemm::warp_pos<T>(threadIdx.x >> 5);
  const int mtiles = gemm::warp_m_tiles<T>(a, bt, w.wm);
  // With a low-rank branch (and no split-K across blocks, whose reducing block adds it) every warp
  // takes the epilogue loop below: it has barriers, and the warps-k >= 1 do their share of the
  // low-rank sums. Block-uniform.
  const bool lowrank = a.t != nullptr && a.split <= 1;
  if constexpr (T::WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
    if (w.wk > 0) {
#pragma unroll
      for (int i = 0; i < T::A1; ++i)
#pragma unroll
        for (int j = 0; j < T::A2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            red[gemm::red_index<T>(w.wk, w.wmn, (i * T::A2 + j) * 4 + e, lane)] = acc[i][j][e];
    }
    __syncthreads();
    if (w.wk > 0 && !lowrank) return;
    if (w.wk == 0) {
#pragma unroll 1
      for (int p = 1; p < T::WK; ++p)  // fixed order: deterministic
#pragma unroll
        for (int i = 0; i < T::A1; ++i)
#pragma unroll
          for (int j = 0; j < T::A2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc[i][j][e] += red[gemm::red_index<T>(p, w.wmn, (i * T::A2 + j) * 4 + e, lane)];
    }
  }

  // Epilogue, one m16 tile at a time through the warp's staging tile in shared memory: one
  // compact loop instead of an unrolled copy per accumulator (that copy made the build 4x
  // slower), and stores that walk consecutive packed rows. With a low-rank branch the tile first
  // receives the low-rank sums (lowrank_tile), and the accumulators are added to them in their
  // fragment layout: acc + lr, the same fp32 addition as fused_epilogue's y = acc; y += lr.
  float* epi = reinterpret_cast<float*>(smem + T::EPI_OFF) + w.wmn * T::EPI_FLOATS;
  uint16_t* out = static_cast<uint16_t*>(a.out);
  const int loop_tiles = lowrank ? gemm::block_m_tiles<T>(a, bt) : mtiles;
#pragma unroll 1
  for (int i = 0; i < loop_tiles; ++i) {
    if (lowrank) lowrank_tile<T>(a, bt, w, lane, i, smem, epi);
    if (w.wk > 0 || i >= mtiles) continue;  // only the low-rank share, or no rows < m here
    if constexpr (T::SWAP) {
      // n8 tiles 2i, 2i + 1 of x rows are this m16 tile; (c0, c1) are two x rows: scalar slots
#pragma unroll
      for (int mw = 0; mw < T::MW; ++mw)
#pragma unroll
        for (int jx = 0; jx < T::NX; ++jx) {
          if ((jx >> 1) != i) continue;  // a runtime i: selects, no local memory
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float* slot = epi + gemm::skinny_epi_slot<T>(mw, jx, lane, e);
            *slot = lowrank ? acc[mw][jx][e] + *slot : acc[mw][jx][e];
          }
        }
    } else {
#pragma unroll
      for (int j = 0; j < T::NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {  // (c0, c1) and (c2, c3) are column pairs: one float2
          float2 v = make_float2(acc[0][j][e], acc[0][j][e + 1]);
#pragma unroll
          for (int ii = 1; ii < T::MT; ++ii)  // acc[i] with a runtime i: selects, no local memory
            if (ii == i) v = make_float2(acc[ii][j][e], acc[ii][j][e + 1]);
          float2* slot = reinterpret_cast<float2*>(epi + gemm::epi_slot<T>(j, lane, e));
          if (lowrank) {
            const float2 lr = *slot;
            v.x += lr.x, v.y += lr.y;
          }
          *slot = v;
        }
    }
    __syncwarp();
#pragma unroll 1
    for (int o = lane; o < 16 * T::WTN; o += 32) {
      const int mi = bt.m0 + gemm::epi_x_row<T>(w, i, o);
      const int row = bt.row0 + gemm::epi_packed_row<T>(w, o);
      if (mi >= a.m || row >= bt.row_end) continue;
      if (a.split > 1) {  // split-K: the raw partial, in packed order; split_fixup does the rest
        a.partial[gemm::partial_index(a, kr.s, mi, row)] = epi[gemm::epi_src<T>(o)];
        continue;
      }
      int col;
      const float y = epilogue_tail(a, epi[gemm::epi_src<T>(o)], row, mi, &col);
      out[int64_t(mi) * a.n + col] = to_act<DT>(y);  // the inverse permutation, fused
    }
    __syncwarp();  // the staging tile is rewritten by the next m16 tile
  }
}

// Split-K reduction (S = a.split > 1), after every block of the grid has stored its partial:
// the last of the S blocks of this output tile to arrive sums the S partials in the order
// s = 0..S-1 (gemm::split_sum: bitwise the same whichever block is last) and runs the epilogue
// (low-rank up, extra, bias, cast, store through perm) once per output.
//
// Why here, in the last block, and not in a second, reduce-and-epilogue kernel: at the sizes
// split-K is for (M <= 64, N = 4096: ~2-9 MB of weights) the whole GEMM is a few microseconds of
// DRAM time, and a second launch adds its launch latency and a dependent kernel boundary
// (a drain of the first grid, a ramp of the second) of the same order: it would eat much of
// what filling the SMs wins. The cost of doing it here is a per-tile counter that must be 0 when
// a launch starts: the caller allocates it zeroed once per layer (backend_cuda), and the last
// block resets its own tile's counter, so the next launch on the stream finds zeros with no
// host-side work: no memset, no sync, CUDA-graph safe (the HBP kernel's pattern, hbp.cu). The
// same layer launched on two streams at once would share counters: unsupported (as HBP's).
//
// Memory order (the threadfence-reduction pattern of the CUDA programming guide): every thread
// fences its partial stores (device scope) before the barrier, thread 0 then counts the block
// in; the block that takes the count to S has seen every other block's count, hence (fences)
// their partials, and reads them with L1-bypassing loads after a fence of its own.
template <class T, int DT>
__device__ __forceinline__ void split_fixup(const Args& a, const BlockTile& bt, char* smem) {
  int* s_last = reinterpret_cast<int*>(smem + T::RI_OFF);  // res_index cache: not needed any more
  __threadfence();
  __syncthreads();  // also: every warp is done with shared memory before s_last is written
  if (threadIdx.x == 0) {
    int* counter = a.counters + gemm::split_counter(blockIdx.x, blockIdx.y, gridDim.x);
    __threadfence();
    const int last = atomicAdd(counter, 1) == a.split - 1;
    if (last) atomicExch(counter, 0);  // every block of the tile has counted: reset for the next launch
    __threadfence();
    *s_last = last;
  }
  __syncthreads();
  if (!*s_last) return;
  // The outputs by m16 tile (gemm.h fixup_output), each after the tile's low-rank sums: lanes walk
  // consecutive packed rows (coalesced partial reads), and read the sums that lowrank_tile's
  // closing barrier made visible; the next tile's sums are written only after its staging
  // barrier, when every thread is done with these.
  const int lane = threadIdx.x & 31;
  const WarpPos w = gemm::warp_pos<T>(threadIdx.x >> 5);
  const bool lowrank = a.t != nullptr;
  float* epi = reinterpret_cast<float*>(smem + T::EPI_OFF) + w.wmn * T::EPI_FLOATS;
  uint16_t* out = static_cast<uint16_t*>(a.out);
#pragma unroll 1
  for (int i = 0; i < gemm::block_m_tiles<T>(a, bt); ++i) {
    if (lowrank) lowrank_tile<T>(a, bt, w, lane, i, smem, epi);
#pragma unroll 1
    for (int q = gemm::lr_rows<T>(w.wk); q < gemm::lr_rows<T>(w.wk) + T::LR_QS; ++q) {
      int mi, row;
      if (!gemm::fixup_output<T>(a, bt, w, lane, i, q, &mi, &row)) continue;
      float y = gemm::split_sum(a, mi, row);
      if (lowrank) y += epi[gemm::lr_slot<T>(q, lane)];  // acc + lr, as fused_epilogue
      int col;
      y = epilogue_tail(a, y, row, mi, &col);
      out[int64_t(mi) * a.n + col] = to_act<DT>(y);  // the inverse permutation, fused
    }
  }
}

// One kernel per (tile, dtype); the bit width is a per-block switch. Device code for an
// architecture contains only the tiles its row of gemm_config.h uses (the rest compile empty).
// Only the main loop is inside the BITS switch: the epilogue (with the low-rank staging) and the
// split-K reduction are one copy per kernel, not one per width (a third of the code to build).
template <int ID, int DT>
__global__ void __launch_bounds__(gemm::tile_threads(ID), gemm::tile_min_blocks(ID)) gemm_kernel(const Args a) {
#if defined(__CUDA_ARCH__)
  if constexpr (__CUDA_ARCH__ >= 800 && gemm::tile_built_for(ID, __CUDA_ARCH__ / 10)) {
    using T = typename gemm::TileOf<ID>::type;
    extern __shared__ __align__(16) char smem[];
    const BlockTile bt = gemm::block_tile(a, T::BN, T::BM, blockIdx.x, blockIdx.y);
    const gemm::KRange kr = gemm::split_range((a.k + T::BK - 1) / T::BK, a.split, blockIdx.z);
    float acc[T::A1][T::A2][4];
    switch (a.classes.bits[bt.cls]) {  // uniform per block
      case 2: gemm_mainloop<T, 2, DT>(a, bt, kr, smem, acc); break;
      case 3: gemm_mainloop<T, 3, DT>(a, bt, kr, smem, acc); break;
      default: gemm_mainloop<T, 4, DT>(a, bt, kr, smem, acc); break;
    }
    gemm_epilogue<T, DT>(a, bt, kr, smem, acc);
    if (a.split > 1) split_fixup<T, DT>(a, bt, smem);
  }
#endif
}

// Compute capability, opt-in shared memory per block and the architecture of the GEMM device code
// the driver loaded for the current device, cached per device.
//
// code_cc is what the tile must be chosen by, not cc: each architecture's device code contains
// only its own row's tiles (tile_built_for(ID, __CUDA_ARCH__ / 10)) and the others compile to an
// empty body, so a tile picked by the device's cc is an empty kernel whenever the loaded code was
// built for another architecture: sm_86 SASS running on an sm_87 Orin (rows 0 vs 1), sm_80 SASS
// on an sm_86 GPU, or the compute_86/89 PTX of a BITFUSE_CUDA_ARCHS=86 / 89 build JIT-compiled
// on an H100 (__CUDA_ARCH__ stays 860/890; row 0 vs 3). That launch "succeeds" and leaves `out`
// as torch.empty left it. cudaFuncAttributes::ptxVersion is the virtual architecture the loaded
// code was compiled from, i.e. __CUDA_ARCH__ / 10 (what CUB's PtxVersion relies on too).
struct DeviceInfo {
  int device = 0, cc = 0, smem_optin = 0, code_cc = 0, sms = 0;
};
std::string device_info(DeviceInfo* info) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cc_cache[kMaxDevices];
  static std::atomic<int> smem_cache[kMaxDevices];
  static std::atomic<int> code_cache[kMaxDevices];
  static std::atomic<int> sms_cache[kMaxDevices];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse gemm_cuda: cudaGetDevice failed", e);
  info->device = dev;
  if (dev < kMaxDevices && cc_cache[dev].load() > 0) {
    info->cc = cc_cache[dev].load();
    info->smem_optin = smem_cache[dev].load();
    info->code_cc = code_cache[dev].load();
    info->sms = sms_cache[dev].load();
    return "";
  }
  int major = 0, minor = 0, optin = 0, sms = 0;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse gemm_cuda: device query failed", e);
  info->cc = 10 * major + minor;
  info->smem_optin = optin;
  info->sms = sms;
  // Every gemm_kernel instantiation comes from the same fatbinary, so one stands for all.
  cudaFuncAttributes fa{};
  e = cudaFuncGetAttributes(&fa, gemm_kernel<0, mma::kDtypeF16>);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky; do not let it surface at a later call
    return cuda_check::error_text("bitfuse gemm_cuda: no GEMM device code loads on this sm_" +
                                      std::to_string(info->cc) + " GPU (see bitfuse._C.cuda_archs())",
                                  e);
  }
  info->code_cc = fa.ptxVersion;
  if (dev < kMaxDevices) {
    smem_cache[dev].store(optin);
    code_cache[dev].store(info->code_cc);
    sms_cache[dev].store(sms);
    cc_cache[dev].store(info->cc);  // last: a nonzero cc marks the entry complete
  }
  return "";
}

// The launch plan of a tile: class geometry and S (gemm_config.h plan_split, from the device's
// real SM count and the table's resident blocks), and what S needs from the caller.
struct Planner {
  Args a;
  int code_cc, sms, request;
  cuda::GemmPlan plan;

  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    gemm::plan_classes<T>(a, reinterpret_cast<uint64_t>(a.qweight));
    a.split = gemm::plan_split<T>(a, sms, gemm::tile_blocks_per_sm(code_cc, ID), request);
    plan.tile = ID;
    plan.split = a.split;
    plan.sms = sms;
    plan.tiles = a.class_tile[a.classes.count] * ((a.m + T::BM - 1) / T::BM);
    plan.workspace_bytes = gemm::split_workspace_bytes(a.split, a.m, a.n);
    plan.counters = a.split > 1 ? plan.tiles : 0;
  }
};

struct Launcher {
  Args a;
  int dtype;
  cudaStream_t stream;
  int device, smem_optin, code_cc, sms, request;
  std::string err;

  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    gemm::plan_classes<T>(a, reinterpret_cast<uint64_t>(a.qweight));
    const int n_tiles = a.class_tile[a.classes.count];
    const int m_tiles = (a.m + T::BM - 1) / T::BM;
    // The same call as Planner's, so S is what the caller sized the workspace for.
    a.split = gemm::plan_split<T>(a, sms, gemm::tile_blocks_per_sm(code_cc, ID), request);
    if (a.split > 1 && (a.partial == nullptr || a.counters == nullptr)) {
      err = "bitfuse gemm_cuda: split-K (S=" + std::to_string(a.split) +
            ") needs a workspace and counters (see gemm_cuda_plan)";
      return;
    }
    if (m_tiles > 65535) {
      err = "bitfuse gemm_cuda: m=" + std::to_string(a.m) + " needs more than 65535 blocks of " +
            std::to_string(T::BM) + " rows; split x";
      return;
    }
    if (T::SMEM_BYTES > smem_optin) {
      err = "bitfuse gemm_cuda: the tile needs " + std::to_string(T::SMEM_BYTES) +
            " bytes of shared memory per block, this GPU allows " + std::to_string(smem_optin);
      return;
    }
    const bool bf16 = dtype == mma::kDtypeBF16;
    auto kernel = bf16 ? gemm_kernel<ID, mma::kDtypeBF16> : gemm_kernel<ID, mma::kDtypeF16>;
    // More than 48 KB of dynamic shared memory needs an opt-in, once per kernel and device.
    static std::atomic<uint64_t> opted[2];
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    cudaError_t e = cudaSuccess;
    if (!bit || !(opted[bf16].load() & bit)) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM_BYTES);
      if (e != cudaSuccess) {
        err = cuda_check::error_text("bitfuse gemm_cuda: cudaFuncSetAttribute failed", e);
        return;
      }
      opted[bf16].fetch_or(bit);
    }
    kernel<<<dim3(unsigned(n_tiles), unsigned(m_tiles), unsigned(a.split)), T::THREADS, T::SMEM_BYTES,
             stream>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess) err = cuda_check::error_text("bitfuse gemm_cuda: kernel launch failed", e);
  }
};

// The tile for m rows on the current device, by the loaded code's architecture (see DeviceInfo),
// which is the device's own in the usual build; the shared-memory check in Launcher::run still
// uses the device's real limit.
std::string pick_tile(int m, int group_size, DeviceInfo* info, int* id) {
  std::string err = device_info(info);
  if (!err.empty()) return err;
  *id = gemm::select_tile(info->code_cc, m, group_size);
  if (*id < 0)
    return "bitfuse gemm_cuda: needs an sm_80 or newer GPU (cp.async, bf16 mma) and device code "
           "built for sm_80 or newer; this GPU is sm_" + std::to_string(info->cc) +
           ", the loaded GEMM code sm_" + std::to_string(info->code_cc);
  return "";
}

}  // namespace

namespace cuda {

std::string gemm_plan(const gemm::Args& args, int split, GemmPlan* plan) {
  *plan = GemmPlan{};
  if (args.n == 0 || args.m == 0) return "";
  DeviceInfo info;
  int id = -1;
  const std::string err = pick_tile(args.m, gemm::tile_group_size(args), &info, &id);
  if (!err.empty()) return err;
  Planner p{args, info.code_cc, info.sms, split, GemmPlan{}};
  gemm::with_tile(id, p);
  *plan = p.plan;
  return "";
}

std::string gemm(const gemm::Args& args, int dtype, int split, std::uintptr_t stream) {
  const char* who = "bitfuse gemm_cuda";
  std::string err = cuda_check::device_pointer(args.qweight, "qweight_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(args.x, "x_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(args.out, "out_ptr", who);
  if (err.empty() && args.partial) err = cuda_check::device_pointer(args.partial, "workspace_ptr", who);
  if (err.empty() && args.counters) err = cuda_check::device_pointer(args.counters, "counters_ptr", who);
  if (!err.empty()) return err;
  if (dtype != mma::kDtypeF16 && dtype != mma::kDtypeBF16)
    return "bitfuse gemm_cuda: dtype must be 1 (fp16) or 2 (bf16)";
  if (args.n == 0 || args.m == 0) return "";
  err = gemm::group_index_error(args);
  if (!err.empty()) return std::string(who) + err;
  DeviceInfo info;
  int id = -1;
  err = pick_tile(args.m, gemm::tile_group_size(args), &info, &id);
  if (!err.empty()) return err;
  Launcher l{args,           dtype,     reinterpret_cast<cudaStream_t>(stream),
             info.device,    info.smem_optin, info.code_cc, info.sms, split, ""};
  gemm::with_tile(id, l);
  return l.err;
}

}  // namespace cuda
}  // namespace bitfuse
