// Warp-level index math and bit math of the tensor-core GEMM (csrc/cuda/gemm.cu), shared with its
// CPU twin (csrc/host/gemm_host.cpp), which runs exactly these functions over an emulated shared
// memory and emulated ldmatrix / mma, so the CPU tests exercise what the kernel computes.
//
// Everything is about one instruction, mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}:
//   D (16x8, fp32) = A (16x16, x rows × K) · B (16x8, K × output channels) + C.
// The fragment layouts below are the PTX ISA's ("Matrix Fragments for mma.m16n8k16 with floating
// point type"); groupID = lane >> 2, threadID_in_group = lane & 3. The kernel never computes A's
// layout itself (ldmatrix produces it in hardware), but it must place B where the hardware reads
// it and must know which (row, column) each accumulator is, so these are the ground truth that
// the CPU twin's mma emulation uses and that tests/test_cuda_gemm_host.py re-derives from the ISA.
//
// Why B comes from registers and not from ldmatrix: FORMAT.md §3.1 stores each 32-column run of a
// packed row in "slot order", so lane t of an mma quad finds the 8 codes of its B fragment for two
// k16 steps in its own slots 8t..8t+7 (one 4-bit word, one 16-bit half of a 2-bit / 3-bit-low-plane
// word, one byte of a 1-bit plane). A lane therefore dequantizes its own fragment from the raw words
// that cp.async put in shared memory: no dequantized tile is written back to shared memory and no
// shuffles are needed.
#pragma once

#include <cstdint>
#include <cstring>

#include "bitfuse/dequant_tricks.h"
#include "bitfuse/format.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Full unrolling on the device (the fragment arrays must live in registers); nothing on the host,
// where gcc would warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define BF_UNROLL _Pragma("unroll")
#else
#define BF_UNROLL
#endif

namespace bitfuse {
namespace mma {

constexpr int kTileM = 16, kTileN = 8, kTileK = 16;  // m16n8k16
constexpr int kDtypeF16 = 1, kDtypeBF16 = 2;        // the activation dtype codes of the bindings

// ---------------------------------------------------------------------------------------------
// Fragment ownership (PTX ISA). i is the element index in the ISA's "low to high" order; two
// consecutive elements share one 32-bit register (element 2r in its low half).
// ---------------------------------------------------------------------------------------------
BF_HD constexpr int group_id(int lane) { return lane >> 2; }
BF_HD constexpr int thread_in_group(int lane) { return lane & 3; }

// A, 16x16, elements a0..a7 (registers a0..a3 = element pairs): rows g for i in {0,1,4,5},
// g + 8 otherwise; columns 2t + (i & 1), + 8 for i >= 4.
BF_HD constexpr int a_row(int lane, int i) { return group_id(lane) + ((i & 2) ? 8 : 0); }
BF_HD constexpr int a_col(int lane, int i) {
  return 2 * thread_in_group(lane) + (i & 1) + ((i & 4) ? 8 : 0);
}
// B, 16x8 (k × n), elements b0..b3 (registers b0, b1): k = 2t + (i & 1), + 8 for i >= 2; n = g.
BF_HD constexpr int b_row(int lane, int i) {
  return 2 * thread_in_group(lane) + (i & 1) + ((i & 2) ? 8 : 0);
}
BF_HD constexpr int b_col(int lane, int) { return group_id(lane); }
// C / D, 16x8 fp32, elements c0..c3: rows g (c0, c1) and g + 8 (c2, c3); columns 2t + (i & 1).
BF_HD constexpr int c_row(int lane, int i) { return group_id(lane) + ((i & 2) ? 8 : 0); }
BF_HD constexpr int c_col(int lane, int i) { return 2 * thread_in_group(lane) + (i & 1); }

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 for one 16x16 A fragment
// ---------------------------------------------------------------------------------------------
// Lanes 8j..8j+7 give the addresses of the 8 rows of matrix j (16 bytes each); lane l receives in
// register j the two elements (row l >> 2, columns 2(l & 3), +1) of matrix j. With matrix 0 = rows
// 0-7 / columns 0-7 of the fragment, 1 = rows 8-15 / columns 0-7, 2 = rows 0-7 / columns 8-15 and
// 3 = rows 8-15 / columns 8-15, register j is exactly the ISA's A register a_j: lane l gives row
// l & 15 at column 8·(l >> 4).
BF_HD constexpr int ldsm_row(int lane) { return lane & 15; }
BF_HD constexpr int ldsm_col(int lane) { return 8 * (lane >> 4); }
// What lane receives in register j: the 2 elements starting at element ldsm_src_elem(lane) of the
// 8-element row whose address lane ldsm_src_lane(lane, j) gave. (The CPU twin's ldmatrix.)
BF_HD constexpr int ldsm_src_lane(int lane, int j) { return 8 * j + (lane >> 2); }
BF_HD constexpr int ldsm_src_elem(int lane) { return 2 * (lane & 3); }

// ---------------------------------------------------------------------------------------------
// The shared-memory swizzle of the x (A) tile
// ---------------------------------------------------------------------------------------------
// A row of the tile is BK fp16/bf16 values = BK/8 chunks of 16 bytes. One ldmatrix phase reads 8
// rows at the same column chunk; unswizzled, rows 2^n·16 bytes apart land on the same 4 banks
// (8-way conflict for BK >= 64). XOR-ing the chunk index with the row's low bits spreads those 8
// rows over 8 different 16-byte bank groups of a 128-byte line:
//   >= 8 chunks a row (BK >= 64): chunk c of row r is stored at c ^ (r & 7) (stays inside its 8);
//   4 chunks a row (BK = 32):     two rows share a 128-byte line; c ^ ((r >> 1) & 3).
// cp.async writes and ldmatrix reads go through the same function, so the permutation is
// invisible to everything else.
BF_HD constexpr int swizzle_chunk(int row, int chunk, int chunks_per_row) {
  return chunks_per_row >= 8 ? (chunk ^ (row & 7))
         : chunks_per_row == 4 ? (chunk ^ ((row >> 1) & 3))
                               : chunk;
}
// Byte offset, inside the A tile, of element (row, col) (col % 8 == 0 for a chunk start).
BF_HD constexpr int a_tile_offset(int row, int col, int bk) {
  return (row * (bk / 8) + swizzle_chunk(row, col / 8, bk / 8)) * 16 + (col % 8) * 2;
}

// ---------------------------------------------------------------------------------------------
// B fragment decode from slot-ordered words (FORMAT.md §3.1)
// ---------------------------------------------------------------------------------------------
// A 32-column run of a packed row is two k16 steps. Quad thread t (= lane & 3) of the lanes that
// hold output row g needs, for both steps, the 8 columns 2t + {0, 1, 8, 9, 16, 17, 24, 25}; they
// are its slots 8t..8t+7. The magic-number unpack (dequant_tricks.h) of slot pair (8t+i, 8t+i+4),
// i = 0..3, gives the columns (2t + 8i, 2t + 8i + 1): value v of the lane (v = 0..7) is column
// b_run_col(t, v) of the run, and the register pair i is B register (i & 1) of step i >> 1.
BF_HD constexpr int b_run_col(int t, int v) { return 8 * (v >> 1) + 2 * t + (v & 1); }

// 8 two-bit slots in bits 0..15 -> slots 0..3 in bits 0..7 and slots 4..7 in bits 16..23, so that
// (x >> 2i) & 0x00030003 holds slots i (low half) and i + 4 (high half).
BF_HD constexpr uint32_t spread2(uint32_t h) { return (h & 0xFFu) | ((h & 0xFF00u) << 8); }
// 8 one-bit slots in bits 0..7 -> slots 0..3 in bits 0..3 and slots 4..7 in bits 16..19.
BF_HD constexpr uint32_t spread1(uint32_t b) { return (b & 0x0Fu) | ((b & 0xF0u) << 12); }

// (a & MASK) | c in one instruction. nvcc does not fuse `(a & imm) | imm2` into one LOP3 (LOP3
// takes a single immediate), so the magic is passed in a register and the LOP3 written out.
template <uint32_t MASK>
BF_HD inline uint32_t and_or(uint32_t a, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));  // (a & b) | c
  return d;
#else
  return (a & MASK) | c;
#endif
}

// The 4 magic pair words (magic + q in each half) of quad thread t from the words it reads of one
// run: lo = word t (4-bit) or word t >> 1 (2-bit, 3-bit low plane), hi = word 2 (3-bit high plane;
// ignored otherwise). `magic` is fp16 1024 (the GEMM's B operand) or bf16 128 (gemv_tc.h's A
// operand holds the codes themselves, in x's dtype). Register i is slots (8t + i, 8t + i + 4).
// One shift and one LOP3 a pair (two LOP3 for 3-bit).
template <int BITS>
BF_HD inline void lane_magic(uint32_t lo, uint32_t hi, int t, uint32_t magic, uint32_t m[4]) {
  if constexpr (BITS == 4) {
    BF_UNROLL for (int i = 0; i < 4; ++i) m[i] = and_or<0x000F000Fu>(lo >> (4 * i), magic);
  } else if constexpr (BITS == 2) {
    const uint32_t l = spread2(lo >> (16 * (t & 1)));  // half (t & 1) of word t >> 1
    BF_UNROLL for (int i = 0; i < 4; ++i) m[i] = and_or<0x00030003u>(l >> (2 * i), magic);
  } else {
    static_assert(BITS == 3, "dense codes are 2, 3 or 4 bits");
    const uint32_t l = spread2(lo >> (16 * (t & 1)));
    const uint32_t h = spread1((hi >> (8 * t)) & 0xFFu) << 2;  // byte t, at bit 2 of a code
    BF_UNROLL for (int i = 0; i < 4; ++i)
      m[i] = and_or<0x00030003u>(l >> (2 * i), and_or<0x00040004u>(h >> i, magic));
  }
}

// The 4 magic half2 words (1024 + q in each half) of quad thread t in the run whose BITS words
// start at `run` (4-bit: 4 words; 2-bit: 2; 3-bit: low-plane words 0, 1 and high plane word 2).
template <int BITS>
BF_HD inline void b_magic(const uint32_t* run, int t, uint32_t m[4]) {
  lane_magic<BITS>(run[BITS == 4 ? t : t >> 1], BITS == 3 ? run[2] : 0u, t, tricks::kMagic1024x2, m);
}

// Round two fp32 values to the activation dtype (round to nearest even, as the hardware's
// cvt.rn does) and pack them as the low / high half of one register.
BF_HD inline uint16_t f32_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return uint16_t(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to infinity
  const int e = int(ax >> 23);
  uint32_t mant, sh;
  if (ax < 0x38800000u) {  // below 2^-14: an fp16 subnormal, in units of 2^-24
    if (e < 102) return uint16_t(sign);  // below 2^-25: rounds to zero
    mant = (ax & 0x7FFFFFu) | 0x800000u;
    sh = uint32_t(126 - e);  // 14..24
    uint32_t h = mant >> sh;
    const uint32_t rem = mant & ((1u << sh) - 1u), half = 1u << (sh - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal
    return uint16_t(sign | h);
  }
  uint32_t h = (uint32_t(e - 127 + 15) << 10) | ((ax & 0x7FFFFFu) >> 13);
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may bump the exponent
  return uint16_t(sign | h);
#endif
}
BF_HD inline uint16_t f32_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
#endif
}
// Activation-dtype bits -> fp32 (exact).
BF_HD inline float act_to_f32(uint16_t v, int dtype) {
  if (dtype == kDtypeBF16) {
    const uint32_t b = uint32_t(v) << 16;
    float f;
#if defined(__CUDA_ARCH__)
    f = __uint_as_float(b);
#else
    std::memcpy(&f, &b, 4);
#endif
    return f;
  }
  return half_to_float(v);
}
template <int DT>
BF_HD inline uint32_t pack2(float lo, float hi) {
  if constexpr (DT == kDtypeBF16)
    return uint32_t(f32_to_bf16_bits(lo)) | (uint32_t(f32_to_bf16_bits(hi)) << 16);
  else
    return uint32_t(f32_to_f16_bits(lo)) | (uint32_t(f32_to_f16_bits(hi)) << 16);
}

// The lane's 8 dequantized weights of one run, in fp32, value v = column b_run_col(t, v):
//   Ŵ = q·s + m (one fma, exact as the reference: FORMAT.md §1), then ± α from the sign byte (the
//   run's residual-plane byte t: bit i is slot 8t + i). Rows without a residual pass res = false,
//   or alpha = 0 (adding ±0 leaves Ŵ unchanged).
template <int BITS>
BF_HD inline void b_values(const uint32_t* run, int t, float scale, float zero, bool res,
                           uint32_t sign_byte, float alpha, float w[8]) {
  uint32_t m[4];
  b_magic<BITS>(run, t, m);
  BF_UNROLL for (int i = 0; i < 4; ++i) {
    float q0, q1;
    tricks::magic_to_codes(m[i], &q0, &q1);
    w[2 * i] = dequant_value_f(q0, scale, zero);
    w[2 * i + 1] = dequant_value_f(q1, scale, zero);
    if (res) {
      w[2 * i] += ((sign_byte >> i) & 1u) ? alpha : -alpha;
      w[2 * i + 1] += ((sign_byte >> (i + 4)) & 1u) ? alpha : -alpha;
    }
  }
}

// The B registers of one run for both k16 steps: b[0], b[1] = (b0, b1) of step 0 and b[2], b[3]
// of step 1. Each fp32 Ŵ is rounded once to the activation dtype here, because the tensor core
// multiplies fp16/bf16 operands; that rounding (relative 2^-11 / 2^-8 of each weight) is the one
// extra error of this kernel against the fp32 reference, and the tests' bound carries it
// explicitly (tests/_tolerance.matmul_bound(..., operand_dtype=dtype): 2·u·Σ|x||Ŵ| covers one
// rounding of every product's weight, u the dtype's unit roundoff); the products themselves are
// exact in the tensor core and are accumulated in fp32.
template <int BITS, int DT>
BF_HD inline void b_fragment(const uint32_t* run, int t, float scale, float zero, bool res,
                             uint32_t sign_byte, float alpha, uint32_t b[4]) {
  float w[8];
  b_values<BITS>(run, t, scale, zero, res, sign_byte, alpha, w);
  BF_UNROLL for (int i = 0; i < 4; ++i) b[i] = pack2<DT>(w[2 * i], w[2 * i + 1]);
}

// Half hidx (0 = low) of a window of 32-bit words: fp16 per-group tensors are staged as the
// aligned words that cover the needed halves (cp.async moves 4, 8 or 16 bytes, and a row of an
// (n, G) fp16 tensor is only 2-byte aligned when G is odd).
BF_HD inline uint16_t window_half(const uint32_t* words, int hidx) {
  return uint16_t(words[hidx >> 1] >> (16 * (hidx & 1)));
}

}  // namespace mma
}  // namespace bitfuse
