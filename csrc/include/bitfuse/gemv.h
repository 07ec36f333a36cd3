// The fused GEMV (M <= 8) of csrc/cuda/gemv.cu: its arguments, tile geometry, class lookup and
// epilogue, shared with the host twin `_C.gemv_host` (csrc/host/gemv_host.cpp) that the CPU
// tests run against the torch reference. Semantics are python/bitfuse/kernels/fused_linear.py's:
//   y = x·(Ŵ_b + R̂)ᵀ  + t·L_upᵀ  + extra  + bias,   fp32 throughout, cast to x's dtype,
//   stored through perm (out[:, perm[i]] = packed row i).
// t = x·L_downᵀ·diag(lr_scale) (M, r) fp32 and extra = S·x (M, N) fp32 in original order are
// computed before the launch by the caller.
#pragma once

#include <cstdint>

#include "bitfuse/dequant_tricks.h"
#include "bitfuse/epilogue.h"
#include "bitfuse/format.h"

namespace bitfuse {
namespace gemv {

constexpr int kMaxM = 8;          // rows of x one launch handles
constexpr int kThreads = 128;     // 4 warps a block
constexpr int kRowsPerBlock = 16; // packed rows a block owns; divides FORMAT.md's row_align (16/64)
constexpr int kXFloats = 8192;    // x chunk staged in shared memory: MT × (8192 / MT) fp32 = 32 KB

// Codes one thread takes with one set of 128-bit loads ("unit"): 4 words = 32 4-bit or 64 2-bit
// codes; for 3-bit, 12 words (three 128-bit loads) = 128 codes, the smallest run-aligned span
// that is a whole number of 16-byte vectors (a 3-bit run is 12 bytes).
BF_HD constexpr int unit_codes(int bits) { return bits == 4 ? 32 : bits == 2 ? 64 : 128; }
BF_HD constexpr int unit_words(int bits) { return unit_codes(bits) * bits / 32; }

struct Args {
  const void* x;              // (m, k) fp16 / bf16, row-major contiguous
  void* out;                  // (m, n) same dtype, original output order
  const uint32_t* qweight;    // FORMAT.md §3
  const uint16_t* scales;     // (n, G) fp16 bits; null with compact scales
  const uint16_t* zeros;      // (n, G) fp16 bits; null with compact scales
  const uint8_t* scale_codes;  // (n, G) compact codes (FORMAT.md §5.1), or null: fp16 pairs
  const uint8_t* zero_codes;   // (n, G)
  const uint16_t* scale_rows;  // (n, 3) fp16 row factors
  const int32_t* perm;        // (n) or null
  const int32_t* res_index;   // (n) or null
  const uint32_t* res_plane;  // (Nr, k_pad/32)
  const uint16_t* res_alpha;  // (Nr, G) fp16 bits
  const float* t;             // (m, r) fp32 or null
  const uint16_t* lr_up;      // (n, r) fp16 bits (packed row order), with t
  const float* extra;         // (m, n) fp32 (original order) or null
  const float* bias;          // (n) fp32 (original order) or null
  ClassTable classes;
  int64_t class_word[kMaxClasses];  // first word of each class in qweight
  int class_first[kMaxClasses];     // first packed row of each class
  int class_vec[kMaxClasses];       // 1: the class's rows are 16-byte aligned (128-bit loads)
  int m, n, k, k_pad, group_size, r;
  int x_vec;                        // 1: x is 16-byte aligned and k % 8 == 0 (128-bit x loads)
};

// Class of packed row `row` (rows past the end belong to the last class).
BF_HD inline int class_of_row(const Args& a, int row) {
  int c = 0;
  while (c + 1 < a.classes.count && row >= a.class_first[c + 1]) ++c;
  return c;
}

// 128-bit loads need the class's rows to start on 16-byte boundaries: the buffer itself, the
// class start and the row length (words per row) all multiples of 4 words. True for 4-bit
// always, for 2-bit when k_pad % 64 == 0, for 3-bit when k_pad % 128 == 0 (given aligned starts).
// Otherwise the class is read with 32-bit loads (same unpack), never past the row's end.
BF_HD inline int class_vec_ok(uint64_t qweight_addr, int64_t class_word, int bits, int k_pad) {
  return (qweight_addr % 16 == 0) && (class_word % 4 == 0) && (words_per_row(bits, k_pad) % 4 == 0);
}

// The fused epilogue for one output (packed row `row`, x row `mi`): acc + low-rank up + extra +
// bias, in that order (ARCHITECTURE.md §4). Returns y in fp32; *col is the output column.
BF_HD inline float epilogue(const Args& a, float acc, int row, int mi, int* col) {
  return fused_epilogue(a, acc, row, mi, col);
}

}  // namespace gemv
}  // namespace bitfuse
