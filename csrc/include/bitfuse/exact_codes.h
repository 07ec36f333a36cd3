// Exact-code fragments for mma.m16n8k16 "swap AB" products (W·xᵀ with W as the A operand), and
// the per-group fold that applies the scales afterwards. Shared by the tensor-core GEMV
// (gemv_tc.h / gemv_tc.cu, M <= 8) and the GEMM's skinny tile (gemm.h, M <= 16), and by their CPU
// twins, which run these functions lane by lane.
//
// The idea: instead of dequantizing every weight (q·s + m, then a rounding to fp16/bf16 for the
// tensor core), the A operand holds the integer codes q themselves, which are exact in fp16 and
// bf16 (0..15), so each mma sums x·q exactly in fp32, and per group and row
//   Σ_k x_k·(q_k·s + m) = s·Σ_k x_k·q_k + m·Σ_k x_k
// costs two fp32 fmas (fold_group) instead of a dequantization per weight. The binary residual
// is one more product whose A holds ±1 (lane_signs), times α. Which words a lane reads and why
// the slot order of FORMAT.md §3.1 is already an A fragment: gemv_tc.h's header comment.
#pragma once

#include <cstdint>

#include "bitfuse/dequant_tricks.h"
#include "bitfuse/mma_tile.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bitfuse {
namespace exact {

// The magic pair constant in the activation dtype: fp16 1024 (0x6400: 10 mantissa bits in units of
// 1) or bf16 128 (0x4300: 7 mantissa bits in units of 1). Codes < 16 OR-ed into the mantissa give
// magic + q exactly in both.
BF_HD constexpr uint32_t magic_pair(int dtype) {
  return dtype == mma::kDtypeBF16 ? 0x43004300u : tricks::kMagic1024x2;
}
BF_HD constexpr uint32_t one_pair(int dtype) {  // (1.0, 1.0)
  return dtype == mma::kDtypeBF16 ? 0x3F803F80u : 0x3C003C00u;
}

// The words a lane reads for one run of one row (relative to the run's first word): w0 = word t
// (4-bit) or word t >> 1 (2-bit, 3-bit low plane); 3-bit also reads word 2 (the high plane).
BF_HD constexpr int lane_word(int bits, int t) { return bits == 4 ? t : t >> 1; }

// magic + q (two codes a register) minus the magic: the exact codes as an fp16x2 / bf16x2.
BF_HD inline uint32_t codes_from_magic(uint32_t m, int dtype) {
#if defined(__CUDA_ARCH__)
  if (dtype == mma::kDtypeBF16) {
    __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&m);
    const uint32_t mg = magic_pair(dtype);
    h = __hsub2(h, *reinterpret_cast<const __nv_bfloat162*>(&mg));  // exact: integers < 256
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __half2 h = *reinterpret_cast<const __half2*>(&m);
  h = __hsub2(h, __half2half2(__ushort_as_half(0x6400)));  // exact: integers < 2048
  return *reinterpret_cast<const uint32_t*>(&h);
#else
  // The mantissa's low bits are the code itself; integers 0..15 in fp16 / bf16 bits.
  const uint32_t base = magic_pair(dtype);
  const uint32_t q0 = (m & 0xFFFFu) - (base & 0xFFFFu), q1 = (m >> 16) - (base >> 16);
  auto enc = [dtype](uint32_t q) -> uint32_t {
    return dtype == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(float(q)) : mma::f32_to_f16_bits(float(q));
  };
  return enc(q0) | (enc(q1) << 16);
#endif
}

// The 4 code pairs (register i = slots (8t+i, 8t+i+4) = columns (2t + 8i, +1)) of lane t in one
// run of one row: lo = the run's word lane_word(BITS, t), hi = its word 2 (3-bit only).
template <int BITS>
BF_HD inline void lane_codes(uint32_t lo, uint32_t hi, int t, int dtype, uint32_t c[4]) {
#if defined(__CUDA_ARCH__)
  if (BITS == 4 && dtype == mma::kDtypeF16) {
    // fp16, 4-bit, with one shift in place of three: pairs 1 and 3 are masked where they lie
    // (bits 4..7 and 20..23), giving 1024 + 16·q exactly (<= 1264), and one HFMA2 takes them to
    // q: (1024 + 16q)·2^-4 − 64, every step exact. Pairs 0 and 2 are the usual magic minus 1024.
    const uint32_t magic = tricks::kMagic1024x2, lo8 = lo >> 8;
    const uint32_t m[4] = {mma::and_or<0x000F000Fu>(lo, magic), mma::and_or<0x00F000F0u>(lo, magic),
                           mma::and_or<0x000F000Fu>(lo8, magic), mma::and_or<0x00F000F0u>(lo8, magic)};
    const __half2 sixteenth = __half2half2(__ushort_as_half(0x2C00));  // 2^-4
    const __half2 minus64 = __half2half2(__ushort_as_half(0xD400));    // -64
    BF_UNROLL for (int i = 0; i < 4; ++i) {
      __half2 h = *reinterpret_cast<const __half2*>(&m[i]);
      h = (i & 1) ? __hfma2(h, sixteenth, minus64) : __hsub2(h, __half2half2(__ushort_as_half(0x6400)));
      c[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
    return;
  }
#endif
  uint32_t m[4];
  mma::lane_magic<BITS>(lo, hi, t, magic_pair(dtype), m);
  BF_UNROLL for (int i = 0; i < 4; ++i) c[i] = codes_from_magic(m[i], dtype);
}

// ±1 pairs of lane t's residual signs (byte t of the run's plane word: bit i is slot 8t + i; set
// = +α, FORMAT.md §6), in the same register order as lane_codes; all 0 for a row without a
// residual (has = false), so that its α = 0 multiplies zeros (an infinite x stays infinite in the
// other rows' sums and is not turned into NaN by 0·inf). u holds the inverted slot bits i and
// 4 + i at bits i and 16 + i; shifting by 15 − i puts them on the two halves' sign bits.
BF_HD inline void lane_signs(uint32_t plane_word, int t, int dtype, bool has, uint32_t s[4]) {
  const uint32_t u = mma::spread1(~(plane_word >> (8 * t)) & 0xFFu);
  const uint32_t sign = has ? 0x80008000u : 0u, one = has ? one_pair(dtype) : 0u;
  BF_UNROLL for (int i = 0; i < 4; ++i) s[i] = ((u << (15 - i)) & sign) | one;
}

// One group of one lane folded into its accumulators y[0..3] (C layout: rows g, g, g+8, g+8;
// x rows 2t, 2t+1, 2t, 2t+1): y += s·Σxq + m·Σx (+ α·Σ±x). sc/zr/al are the two rows' scale,
// offset and α (rows g, g+8); cq, cr the group's mma sums (codes, signs); xsum the group's Σx of
// x rows 2t and 2t+1.
BF_HD inline void fold_group(float y[4], const float cq[4], const float cr[4], const float xsum[2],
                             const float sc[2], const float zr[2], const float al[2], bool res) {
  BF_UNROLL for (int i = 0; i < 4; ++i) {  // three fmas into y, no separate products
    const int r = i >> 1;
    y[i] = fmaf(zr[r], xsum[i & 1], fmaf(sc[r], cq[i], y[i]));
    if (res) y[i] = fmaf(al[r], cr[i], y[i]);
  }
}

}  // namespace exact
}  // namespace bitfuse
