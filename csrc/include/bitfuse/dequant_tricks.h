// Register-level unpacking of one 32-code run for the CUDA GEMV (csrc/cuda/gemv.cu).
//
// Everything here works on the canonical layout of docs/FORMAT.md §3 (row-major, K-contiguous,
// slot order inside each 32-column run, §3.1): the words are decoded in slot order and each value
// is written to its column's register (pair_column composes the unpack order with run_column). A "run" is 32 consecutive codes of a row,
// starting at a multiple of 32: 4 words (4-bit), 2 words (2-bit) or 3 words (3-bit: low plane
// words 3t, 3t+1 and the high plane word 3t+2). Every helper is __host__ __device__, so the
// host tests (tests/test_cuda_host.py, through bitfuse._C) run exactly the code the kernel runs
// and compare it with bitfuse.pack.
//
// The fp16 magic-number trick. fp16 1024.0 is 0x6400: exponent 10, mantissa 0, so the 10
// mantissa bits count in units of 1. OR-ing a value v < 1024 into the mantissa gives the fp16
// number 1024 + v exactly, with no int->float conversion instruction. A 32-bit word holds two
// fp16 halves, so one AND/OR (a single LOP3 on sm_5x+: nvcc fuses `(a & b) | c` into LOP3.LUT)
// makes two codes at once: ((w >> s) & 0x000F000F) | 0x64006400 is a half2 whose low half comes
// from bits [s, s+4) and whose high half from bits [16+s, 16+s+4). Subtracting 1024 (one HSUB2,
// exact: both operands and the result are integers < 2048) leaves the codes themselves.
//
// Why the codes then go to fp32 and the dequant is an fp32 fma: Ŵ = q·s + m must match the
// reference (FORMAT.md §1: q·s is exact in fp32, so one fma is the reference's value, bit for
// bit). Doing the fma in half2 would round Ŵ to fp16 and the residual add would round again; the
// fp32 path keeps the kernel's Ŵ identical to the torch reference, so the only difference left is
// the order of the fp32 accumulation. The products x·Ŵ are fp32 fmas too (x is staged in shared
// memory as fp32), so no fp16 rounding enters anywhere before the final cast of y.
#pragma once

#include <cstdint>

#include "bitfuse/format.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace bitfuse {
namespace tricks {

constexpr uint32_t kMagic1024x2 = 0x64006400u;  // half2(1024, 1024)

// ---------------------------------------------------------------------------------------------
// Pairs: a run is decoded as 16 half2 "pairs"; pair p (0..15) gives two codes of the run.
// ---------------------------------------------------------------------------------------------

// 4-bit: word i of the run holds codes 8i..8i+7 at bits [4c, 4c+4). Shifting by 4j and masking
// 0x000F000F takes code j (low half, bits 0..3) and code j+4 (high half, bits 16..19), so pair
// p = 4i + j is the codes (8i + j, 8i + j + 4). The brief's `(w >> 4j) & 0x000F000F | 0x64006400`.
BF_HD inline uint32_t magic4(uint32_t w, int j) { return ((w >> (4 * j)) & 0x000F000Fu) | kMagic1024x2; }

// 2-bit: word i of the run holds codes 16i..16i+15 at bits [2c, 2c+2). The same trick with mask
// 0x00030003 and shift 2j: pair p = 8i + j is the codes (16i + j, 16i + j + 8).
// (A variant masks 0x3, 0xC, 0x30, 0xC0 after only two shifts and gets 1024 + 4^i·q, undone by
// scaling s by 4^-i, exact in fp32; it saves shifts but not LOP3s. Left for GPU measurement.)
BF_HD inline uint32_t magic2(uint32_t w, int j) { return ((w >> (2 * j)) & 0x00030003u) | kMagic1024x2; }

// 3-bit planes: the low plane words are the 2-bit layout, so pair p = 8i + j of the low word i
// (i = 0, 1) is again the codes (16i + j, 16i + j + 8). Bit 2 of those codes lives in the high
// plane word h at bits 16i + j and 16i + j + 8: 8 apart, while the pair's halves are 16 apart.
// plane3_hi_spread moves the byte pair of word i so that code 16i + c (c < 8) sits at bit c and
// code 16i + 8 + c at bit 16 + c, pre-shifted left by 2 (the bit-2 position of a code):
// then (spread >> j) & 0x00040004 lands bit 2 of both codes of pair j in place, and
//   ((lo >> 2j) & 0x00030003) | ((spread >> j) & 0x00040004) | 0x64006400
// is half2(1024 + q, 1024 + q') with q = lo | hi << 2 (two LOP3s and two shifts per pair; the
// spread costs four ops per 16 codes). The magic trick fits the planes directly: no code is
// assembled in integer registers first.
BF_HD inline uint32_t plane3_hi_spread(uint32_t h, int i) {
  const uint32_t b = h >> (16 * i);  // codes 16i..16i+15 now at bits 0..15
  return (((b & 0xFFu) | ((b & 0xFF00u) << 8)) << 2);
}
BF_HD inline uint32_t magic3(uint32_t lo, uint32_t spread, int j) {
  return ((lo >> (2 * j)) & 0x00030003u) | ((spread >> j) & 0x00040004u) | kMagic1024x2;
}

// Words in one run of 32 codes: 4, 2 or 3 (b bits a code, 32 codes, 32-bit words).
BF_HD constexpr int run_words(int bits) { return bits; }

// The half2 of pair p (0..15) of the run whose words start at `w`.
template <int BITS>
BF_HD inline uint32_t run_pair(const uint32_t* w, int p) {
  if constexpr (BITS == 4) {
    return magic4(w[p >> 2], p & 3);
  } else if constexpr (BITS == 2) {
    return magic2(w[p >> 3], p & 7);
  } else {
    static_assert(BITS == 3, "dense codes are 2, 3 or 4 bits");
    return magic3(w[p >> 3], plane3_hi_spread(w[2], p >> 3), p & 7);
  }
}

// Slot (0..31, within the run) of the low (hi = 0) or high (hi = 1) half of pair p: the order in
// which codes come out of the words.
BF_HD constexpr int pair_slot(int bits, int p, int hi) {
  return bits == 4 ? 8 * (p >> 2) + (p & 3) + 4 * hi : 16 * (p >> 3) + (p & 7) + 8 * hi;
}
// Column (0..31, within the run) of that half; the host test checks it against pack.py.
BF_HD constexpr int pair_column(int bits, int p, int hi) { return run_column(pair_slot(bits, p, hi)); }

// Host-testable runtime-bits form of run_pair (the kernel uses the template).
BF_HD inline uint32_t run_pair_rt(const uint32_t* w, int bits, int p) {
  return bits == 4 ? run_pair<4>(w, p) : bits == 2 ? run_pair<2>(w, p) : run_pair<3>(w, p);
}

// half2 bits holding (1024 + q0, 1024 + q1) -> the exact codes as fp32.
BF_HD inline void magic_to_codes(uint32_t h2, float* q0, float* q1) {
#if defined(__CUDA_ARCH__)
  __half2 h = *reinterpret_cast<const __half2*>(&h2);
  h = __hsub2(h, __half2half2(__ushort_as_half(0x6400)));  // exact: integers below 2048
  const float2 f = __half22float2(h);
  *q0 = f.x;
  *q1 = f.y;
#else
  *q0 = half_to_float(uint16_t(h2 & 0xFFFFu)) - 1024.0f;
  *q1 = half_to_float(uint16_t(h2 >> 16)) - 1024.0f;
#endif
}

// ---------------------------------------------------------------------------------------------
// One run dequantized: w[c] = q_c · s + m (+ α·(2·sign_c − 1)), c = 0..31 in column order.
// ---------------------------------------------------------------------------------------------
// The pair loop fully unrolls, so "column order" is only register naming: the kernel multiplies
// w[c] by x[k0 + c] with compile-time indices. `plane` is the run's residual sign word (bit j is
// the sign of slot j, i.e. of column run_column(j): FORMAT.md §6, shift/mask: one bit per column
// gives nothing to pair up); has_res = false ignores plane and alpha.
template <int BITS>
BF_HD inline void run_dequant(const uint32_t* words, float scale, float zero, bool has_res,
                              uint32_t plane, float alpha, float* w) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int p = 0; p < 16; ++p) {
    float q0, q1;
    magic_to_codes(run_pair<BITS>(words, p), &q0, &q1);
    w[pair_column(BITS, p, 0)] = dequant_value_f(q0, scale, zero);
    w[pair_column(BITS, p, 1)] = dequant_value_f(q1, scale, zero);
  }
  if (has_res) {
    const float na = -alpha;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < 32; ++j) w[run_column(j)] += ((plane >> j) & 1u) ? alpha : na;
  }
}

}  // namespace tricks
}  // namespace bitfuse
