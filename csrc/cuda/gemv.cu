// Fused low-bit GEMV for M <= 8 rows of x (issue #4): one launch computes
//   y = x·(Ŵ_b + R̂)ᵀ + t·L_upᵀ + extra + bias   stored through perm, in x's dtype,
// for every bit class of the layer (2/3/4-bit, mixed), on the canonical layout of FORMAT.md.
// Index math, the magic-number unpack and the epilogue live in bitfuse/dequant_tricks.h and
// bitfuse/gemv.h, where the host tests run the same code.
//
// Work decomposition (all constants in gemv.h; MT = M tile 1/2/4/8, BITS per block):
//  * A block (4 warps) owns kRowsPerBlock = 16 consecutive packed rows. Class boundaries are
//    multiples of 16 (FORMAT.md §4; the binding checks), so a block's rows share one bit width:
//    the width is a uniform runtime switch at block start into a BITS-specialised body. One
//    launch covers every class.
//  * x is staged in shared memory as fp32, K in chunks of XC = 8192/MT columns (32 KB whatever
//    MT), converted once there, so the inner loop is pure fp32 fma with no per-use conversion.
//    Rows of the M tile beyond M and columns beyond K are staged as 0: padding codes contribute 0.
//  * Within a chunk a thread takes "units" of codes (gemv.h unit_codes: the span one 128-bit
//    load, or three for 3-bit, covers). KL = min(128, units per chunk) threads share a row (split
//    K: KL >= 64 means 2-4 warps split each row's K, the small-M/large-K case), and 128/KL row
//    groups run side by side; each thread owns RPT = 16·KL/128 rows of the block. Consecutive
//    threads read consecutive units of the same row: every warp load is one contiguous span.
//  * Dequant per 32-code run: fp16 magic numbers → exact codes → fp32 fma with the group's
//    scale/offset → ± α from the residual sign word. Ŵ is bit-identical to the reference.
//  * Reduction, deterministic (no atomics, fixed order): xor-butterfly shuffles inside each
//    thread group of min(KL, 32) lanes, then the per-warp partials go through shared memory and
//    one thread per output sums them in warp order and runs the epilogue.
//  * Shared-memory bank conflicts: lanes read x for consecutive units, U·4 bytes apart (a
//    multiple of 128 B), which would put all 8 lanes of a 128-bit phase on the same banks. The x
//    chunk is stored XOR-swizzled: the 16-byte slot c of a 32-column run goes to c ^ (unit % 8),
//    so 8 consecutive units hit 8 different bank quads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "bitfuse/cuda_api.h"
#include "cuda_check.cuh"
#include "ptx.cuh"
#include "bitfuse/dequant_tricks.h"
#include "bitfuse/gemv.h"
#include "bitfuse/gemv_tc.h"

namespace bitfuse {
namespace {

using ptx::LdgLoad;
using gemv::Args;
using gemv::kRowsPerBlock;
using gemv::kThreads;
using gemv::kXFloats;

// x and out are fp16 (dtype 1) or bf16 (dtype 2): a uniform runtime branch at the two places
// that touch them (staging and the final store) rather than a template parameter, which halves
// the instantiations (the inner loop only ever sees fp32).
__device__ __forceinline__ float act_to_float(uint16_t v, int dtype) {
  return dtype == 2 ? __uint_as_float(uint32_t(v) << 16) : __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ uint16_t float_to_act(float v, int dtype) {
  return dtype == 2 ? __bfloat16_as_ushort(__float2bfloat16_rn(v))
                    : __half_as_ushort(__float2half_rn(v));
}

// Physical float4 slot of logical column `col` (a multiple of 4) in the swizzled x chunk.
template <int U>
__device__ __forceinline__ int x_slot(int col) {
  return (col >> 2) ^ ((col / U) & 7);
}

// Stage x[:, c0 : c0 + XC] into xs (fp32, swizzled), 8 columns (one 16-byte load) at a time.
template <int MT, int XC, int U>
__device__ __forceinline__ void stage_x(const Args& a, int dtype, int c0, float* xs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  constexpr int kGroups = MT * XC / 8;
  for (int i = threadIdx.x; i < kGroups; i += kThreads) {
    const int mi = i / (XC / 8);
    const int col = (i % (XC / 8)) * 8;
    const int k = c0 + col;
    uint16_t raw[8];
    ptx::load_act8(x + int64_t(mi) * a.k, k, a.k, mi < a.m, a.x_vec, raw);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = act_to_float(raw[j], dtype);
    float4* xs4 = reinterpret_cast<float4*>(xs + mi * XC);
    xs4[x_slot<U>(col)] = make_float4(v[0], v[1], v[2], v[3]);
    xs4[x_slot<U>(col + 4)] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// Shared memory of one block: the x chunk, then the per-thread partial sums of every row slot.
constexpr int kAccFloats = 32 * kThreads;  // RPT·MT <= 32 for every (MT, BITS): see gemv_tile
struct __align__(16) Smem {
  float xs[kXFloats];
  float acc[kAccFloats];
};

// The block's rows, all of width BITS.
template <int MT, int BITS>
__device__ __forceinline__ void gemv_tile(const Args& a, int dtype, int cls, int row0, Smem& sm) {
  constexpr int U = gemv::unit_codes(BITS);       // codes per unit
  constexpr int UW = gemv::unit_words(BITS);      // words per unit (4 or 12)
  constexpr int RUNS = U / 32;                    // 32-code runs per unit
  constexpr int RW = tricks::run_words(BITS);     // words per run
  constexpr int XC = kXFloats / MT;               // x columns per chunk
  constexpr int UPC = XC / U;                     // units per chunk
  constexpr int KL = UPC < kThreads ? UPC : kThreads;  // threads along K of one row
  constexpr int RP = kThreads / KL;               // rows in parallel
  constexpr int RPT = kRowsPerBlock / RP;         // row slots per thread
  constexpr int UPT = UPC / KL;                   // units per thread per chunk
  constexpr int ITEMS = RPT * UPT;                // (row slot, unit) items per thread per chunk
  constexpr int IB = 4 / RUNS;                    // items per batch: 4 runs = 128 codes, loaded
                                                  // with 4 (4-bit), 2 (2-bit), 3 (3-bit) LDG.128
  constexpr int LG = KL < 32 ? KL : 32;           // lanes of one row inside a warp
  constexpr int NPART = KL / LG;                  // warps sharing one row
  static_assert(RPT >= 1 && UPT >= 1 && XC % U == 0, "tile geometry");
  static_assert(RPT * MT * kThreads <= kAccFloats, "partial sums must fit shared memory");
  static_assert(ITEMS % IB == 0, "batches never straddle the item range");

  const int tid = threadIdx.x;
  const int kl = tid % KL;
  const int rg = tid / KL;
  const int wpr = words_per_row(BITS, a.k_pad);
  const int G = a.k_pad / a.group_size;
  const int KW1 = a.k_pad / 32;
  const bool vec = a.class_vec[cls] != 0;
  const uint32_t* cls_words = a.qweight + a.class_word[cls];
  const int cls_first = a.class_first[cls];
  float* acc = sm.acc;  // [RPT][MT][kThreads]: each thread owns its column, no races
  for (int i = 0; i < RPT * MT; ++i) acc[i * kThreads + tid] = 0.0f;

  for (int c0 = 0; c0 < a.k; c0 += XC) {
    __syncthreads();  // the previous chunk's readers are done with xs
    stage_x<MT, XC, U>(a, dtype, c0, sm.xs);
    __syncthreads();
    // Items (row slot s, unit u), IB at a time: all of a batch's 128-bit loads are issued before
    // any of them is used, so every thread keeps 64 bytes of weights in flight. Consecutive
    // threads take consecutive units of one row: each warp load is one contiguous span.
#pragma unroll 1
    for (int it0 = 0; it0 < ITEMS; it0 += IB) {
      uint32_t w[IB][UW];
      int row[IB], kb[IB];
#pragma unroll
      for (int b = 0; b < IB; ++b) {
        const int it = it0 + b, s = it / UPT, u = it % UPT;
        row[b] = row0 + rg + RP * s;
        kb[b] = c0 + (kl + KL * u) * U;
        const bool live = row[b] < a.n && kb[b] < a.k;
        const uint32_t* rw = cls_words + int64_t(row[b] - cls_first) * wpr + (kb[b] / 32) * RW;
        if (live && vec) {
          // 128-bit loads: the class's rows are 16-byte aligned and k_pad is a multiple of U.
#pragma unroll
          for (int v = 0; v < UW / 4; ++v) {
            const uint4 q4 = __ldg(reinterpret_cast<const uint4*>(rw) + v);
            w[b][4 * v] = q4.x, w[b][4 * v + 1] = q4.y, w[b][4 * v + 2] = q4.z, w[b][4 * v + 3] = q4.w;
          }
        } else {
          // 32-bit loads that stop at the row's end (a partial last unit when k_pad % U != 0).
          const int w0 = (kb[b] / 32) * RW;
#pragma unroll
          for (int v = 0; v < UW; ++v) w[b][v] = live && w0 + v < wpr ? __ldg(rw + v) : 0u;
        }
      }
#pragma unroll
      for (int b = 0; b < IB; ++b) {
        if (row[b] >= a.n || kb[b] >= a.k) continue;
        const int s = (it0 + b) / UPT;
        const int ri = a.res_index ? a.res_index[row[b]] : -1;
        float sum[MT];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) sum[mi] = 0.0f;
#pragma unroll
        for (int run = 0; run < RUNS; ++run) {
          const int k0 = kb[b] + 32 * run;
          if (k0 >= a.k) break;  // k0 < k <= k_pad: the run lies inside the row
          const int g = k0 / a.group_size;
          float scale, zero;  // either scale form (FORMAT.md §5), read-only loads
          group_params(a, row[b], G, g, scale, zero, LdgLoad());
          float wd[32];
          if (ri >= 0) {
            const uint32_t plane = __ldg(a.res_plane + int64_t(ri) * KW1 + k0 / 32);
            const float alpha = half_to_float(__ldg(a.res_alpha + int64_t(ri) * G + g));
            tricks::run_dequant<BITS>(&w[b][run * RW], scale, zero, true, plane, alpha, wd);
          } else {
            tricks::run_dequant<BITS>(&w[b][run * RW], scale, zero, false, 0u, 0.0f, wd);
          }
          const int col = k0 - c0;  // multiple of 32 inside the chunk
          const int base = col >> 2;
          const int key = (col / U) & 7;
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            const float4* xs4 = reinterpret_cast<const float4*>(sm.xs + mi * XC);
            float t = sum[mi];
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              const float4 xv = xs4[base + (c ^ key)];
              t = fmaf(xv.x, wd[4 * c], t);
              t = fmaf(xv.y, wd[4 * c + 1], t);
              t = fmaf(xv.z, wd[4 * c + 2], t);
              t = fmaf(xv.w, wd[4 * c + 3], t);
            }
            sum[mi] = t;
          }
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) acc[(s * MT + mi) * kThreads + tid] += sum[mi];
      }
    }
  }

  // Deterministic reduction: a butterfly over the LG lanes of a row, then the NPART warp
  // partials of each output summed in warp order by one thread.
  __syncthreads();  // xs is reused for the warp partials
  float* red = sm.xs;  // [kRowsPerBlock][MT][NPART]
#pragma unroll 1
  for (int s = 0; s < RPT; ++s) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      float v = acc[(s * MT + mi) * kThreads + tid];
#pragma unroll
      for (int off = LG / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (kl % LG == 0) red[((rg + RP * s) * MT + mi) * NPART + kl / LG] = v;
    }
  }
  __syncthreads();
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (int o = tid; o < kRowsPerBlock * MT; o += kThreads) {
    const int lr = o / MT, mi = o % MT;
    const int rr = row0 + lr;
    if (rr >= a.n || mi >= a.m) continue;
    float v = 0.0f;
#pragma unroll
    for (int p = 0; p < NPART; ++p) v += red[o * NPART + p];
    int col;
    const float y = gemv::epilogue(a, v, rr, mi, &col);
    out[int64_t(mi) * a.n + col] = float_to_act(y, dtype);  // the inverse permutation, fused
  }
}

template <int MT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const Args a, int dtype) {
  __shared__ Smem sm;
  const int row0 = blockIdx.x * kRowsPerBlock;
  const int cls = gemv::class_of_row(a, row0);
  switch (a.classes.bits[cls]) {  // uniform per block
    case 2: gemv_tile<MT, 2>(a, dtype, cls, row0, sm); break;
    case 3: gemv_tile<MT, 3>(a, dtype, cls, row0, sm); break;
    default: gemv_tile<MT, 4>(a, dtype, cls, row0, sm); break;
  }
}

void launch(const Args& a, int dtype, unsigned blocks, cudaStream_t s) {
  // M tile: the smallest of 1/2/4/8 that holds m (four instantiations in all).
  if (a.m <= 1) gemv_kernel<1><<<blocks, kThreads, 0, s>>>(a, dtype);
  else if (a.m <= 2) gemv_kernel<2><<<blocks, kThreads, 0, s>>>(a, dtype);
  else if (a.m <= 4) gemv_kernel<4><<<blocks, kThreads, 0, s>>>(a, dtype);
  else gemv_kernel<8><<<blocks, kThreads, 0, s>>>(a, dtype);
}

}  // namespace

namespace cuda {

std::string gemv(const gemv::Args& args, int dtype, std::uintptr_t stream, bool tensor_cores) {
  std::string err = cuda_check::device_pointer(args.qweight, "qweight_ptr", "bitfuse gemv_cuda");
  if (err.empty()) err = cuda_check::device_pointer(args.x, "x_ptr", "bitfuse gemv_cuda");
  if (err.empty()) err = cuda_check::device_pointer(args.out, "out_ptr", "bitfuse gemv_cuda");
  if (!err.empty()) return err;
  if (args.n == 0 || args.m == 0) return "";
  if (dtype != 1 && dtype != 2) return "bitfuse gemv_cuda: dtype must be 1 (fp16) or 2 (bf16)";
  if (tensor_cores && !gemv_tc::takes_group_size(args.group_size))
    return "bitfuse gemv_cuda: the tensor-core GEMV takes group sizes 32, 64 and 128, got " +
           std::to_string(args.group_size);
  // Both kernels give a block 16 packed rows (gemv.h / gemv_tc.h kRowsPerBlock).
  const unsigned blocks = unsigned((args.n + kRowsPerBlock - 1) / kRowsPerBlock);
  if (tensor_cores) gemv_tc_launch(args, dtype, blocks, stream);
  else launch(args, dtype, blocks, reinterpret_cast<cudaStream_t>(stream));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse gemv_cuda: kernel launch failed", e);
  return "";
}

}  // namespace cuda
}  // namespace bitfuse
