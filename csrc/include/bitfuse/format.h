// bitfuse packed format, version 2: the index math of docs/FORMAT.md for C++ and CUDA.
//
// docs/FORMAT.md is the definition and python/bitfuse/pack.py the reference implementation;
// every function here mirrors one rule of that document and is tested against pack.py through
// bitfuse._C (tests/test_ext.py). Each helper is __host__ __device__ so that the CUDA kernels
// and the host (CPU) reference that the tests run share one copy of the math.
//
// Conventions: words are 32-bit and little-endian (bit 0 = least significant); a row is one
// packed output channel; k is an input column in [0, k_pad); k_pad is a multiple of 32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define BF_HD __host__ __device__
#else
#define BF_HD
#endif

namespace bitfuse {

constexpr int kWordBits = 32;
// Most bit classes one layer may have. The calibrator makes at most three (b-1, b, b+1); the
// table travels by value in the kernel's parameters, so it has a fixed size.
constexpr int kMaxClasses = 8;

// ---------------------------------------------------------------------------------------------
// Dense codes (FORMAT.md §3)
// ---------------------------------------------------------------------------------------------

// Words in one packed row. Every width packs k_pad codes into whole words with no padding bits
// (32 % b == 0 for b = 1, 2, 4; 3-bit uses three words per 32 codes), so this is exact.
BF_HD inline int words_per_row(int bits, int k_pad) { return k_pad * bits / kWordBits; }

// Slot order (format v2, FORMAT.md §3.1). K is cut into runs of 32 columns; inside a run, column
// c = 16s + 8h + 2t + l is stored in slot 8t + 4l + 2s + h. Why: lane t of an mma quad needs, as
// the B operand of two m16n8k16 steps, exactly the columns {2t, 2t+1, 2t+8, 2t+9} (+16): they are
// its 8 slots 8t..8t+7, i.e. one 4-bit word, one 16-bit half of a 2-bit word, one byte of a 1-bit
// plane; and the magic-number unpack of slots (i, i+4) gives the register pairs in order
// ((2t, 2t+1), (2t+8, 2t+9), (2t+16, 2t+17), (2t+24, 2t+25)). Kernels that walk K linearly (the
// GEMV, the reference) only rename registers. python/bitfuse/pack.py run_slot/run_column are the
// Python twins, and tests/test_ext.py checks that they agree.
constexpr int kRun = 32;
BF_HD constexpr int run_slot(int c) {
  return 8 * ((c >> 1) & 3) + 4 * (c & 1) + 2 * ((c >> 4) & 1) + ((c >> 3) & 1);
}
BF_HD constexpr int run_column(int j) {
  return 16 * ((j >> 1) & 1) + 8 * (j & 1) + 2 * (j >> 3) + ((j >> 2) & 1);
}
// Storage position (slot index along the row) of column k.
BF_HD constexpr int slot_of(int k) { return (k & ~(kRun - 1)) + run_slot(k & (kRun - 1)); }

// 2- and 4-bit: 32/b codes a word in slot order: slot j in word j / (32/b) ...
BF_HD inline int code_word_index(int bits, int j) { return j / (kWordBits / bits); }

// ... at bits [b·(j % (32/b)), +b) of that word: slot 0 of a word is its least significant bits.
BF_HD inline int code_bit_offset(int bits, int j) { return bits * (j % (kWordBits / bits)); }

// 3-bit is split into bit planes so that no code straddles a word and each plane is read with the
// same shift-and-mask as the 2- and 1-bit layouts. Each run of 32 slots (t = j / 32) owns the
// three words 3t, 3t+1, 3t+2. Low two bits of slot j: word 3t + (j % 32) / 16 ... (the helpers
// below take the slot j; a column k maps to j = slot_of(k))
BF_HD inline int plane3_lo_word(int k) { return 3 * (k / 32) + (k % 32) / 16; }
// ... at bits [2·(k % 16), +2) (the 2-bit layout within the run) ...
BF_HD inline int plane3_lo_shift(int k) { return 2 * (k % 16); }
// ... and bit 2 of code k: word 3t + 2, bit k % 32 (the 1-bit layout within the run).
BF_HD inline int plane3_hi_word(int k) { return 3 * (k / 32) + 2; }
BF_HD inline int plane3_hi_shift(int k) { return k % 32; }

// Code of column k of a row whose packed words start at row_words; bits is 2, 3 or 4 (callers
// validate). Words are read as unsigned so that the right shift never drags in a sign bit.
BF_HD inline uint32_t extract_code(const uint32_t* row_words, int bits, int column) {
  const int k = slot_of(column);
  if (bits == 3) {
    const uint32_t lo = (row_words[plane3_lo_word(k)] >> plane3_lo_shift(k)) & 3u;
    const uint32_t hi = (row_words[plane3_hi_word(k)] >> plane3_hi_shift(k)) & 1u;
    return lo | (hi << 2);  // q = lo | (hi << 2)
  }
  const uint32_t mask = (1u << bits) - 1u;
  return (row_words[code_word_index(bits, k)] >> code_bit_offset(bits, k)) & mask;
}

// ---------------------------------------------------------------------------------------------
// 1-bit planes: the binary residual's signs (FORMAT.md §6)
// ---------------------------------------------------------------------------------------------

// Column k of a 1-bit plane row is bit slot_of(k) % 32 of word k / 32, the same slot order as the
// codes (1 -> +alpha, 0 -> -alpha).
BF_HD inline uint32_t sign_bit(const uint32_t* plane_row, int k) {
  return (plane_row[k / kWordBits] >> run_slot(k % kWordBits)) & 1u;
}

// ---------------------------------------------------------------------------------------------
// Bit classes in the flat qweight buffer (FORMAT.md §3-§4)
// ---------------------------------------------------------------------------------------------

// Start word of class c: the classes are concatenated in packed order, each a row-major block of
// rows_c' x wpr_c' words, so class c starts after Σ_{c'<c} rows_c' · wpr_c' words. (c may equal
// the number of classes: that gives the buffer's total length, as pack.class_word_offsets does.)
// 64-bit: a large layer's buffer can exceed 2^31 words only in theory, but the product is cheap.
BF_HD inline int64_t class_word_offset(const int* class_bits, const int* class_rows, int c,
                                       int k_pad) {
  int64_t off = 0;
  for (int i = 0; i < c; ++i) off += int64_t(class_rows[i]) * words_per_row(class_bits[i], k_pad);
  return off;
}

// Packed row -> its class's bit width and the word where the row starts. Classes are contiguous
// runs of packed rows (the permutation of §4 made them so), so a walk over the few classes finds
// the row. Returns -1 (and leaves *bits alone) for a row past the last class.
BF_HD inline int64_t row_word_offset(const int* class_bits, const int* class_rows, int n_classes,
                                     int k_pad, int row, int* bits) {
  int64_t off = 0;
  int first = 0;
  for (int c = 0; c < n_classes; ++c) {
    const int wpr = words_per_row(class_bits[c], k_pad);
    if (row < first + class_rows[c]) {
      *bits = class_bits[c];
      return off + int64_t(row - first) * wpr;
    }
    off += int64_t(class_rows[c]) * wpr;
    first += class_rows[c];
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Dequantization (FORMAT.md §1, §5, §6), shared by the host reference and the CUDA kernel
// ---------------------------------------------------------------------------------------------

// fp16 is passed around as its raw 16 bits so that this header (and the host build) needs no
// half type. The device path uses the hardware conversion; the host path decodes the bits
// exactly (every fp16 value, subnormals and inf/nan included, is exact in fp32).
BF_HD inline float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant · 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  uint32_t bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (mant << 13);           // inf / nan
  else bits = sign | ((exp - 15u + 127u) << 23) | (mant << 13);        // normal: rebias exponent
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// Ŵ_b = q · s + m. `zero` is an offset (the group minimum), not an integer zero point, so the
// dequant is a single fma (FORMAT.md §5).
BF_HD inline float dequant_value(uint32_t q, float scale, float zero) {
  return fmaf(float(q), scale, zero);
}

// The same with the code already a float (the GEMV's magic-number unpack yields float codes).
BF_HD inline float dequant_value_f(float q, float scale, float zero) { return fmaf(q, scale, zero); }

// Up to kMaxClasses bit classes in packed order (FORMAT.md §4).
struct ClassTable {
  int count;
  int bits[kMaxClasses];
  int rows[kMaxClasses];
};

// Compact scales (FORMAT.md §5.1): a group's scale and offset from its two 8-bit codes and the
// row's fp16 factors (step, offset base, offset step). code · factor is exact in fp32 (8 + 11
// significant bits), so the fmaf here and the reference's mul + add round the offset once and
// agree bit for bit (pack.expand_scales).
BF_HD inline void compact_params(uint32_t scale_code, uint32_t zero_code, const uint16_t* factors,
                                 float& scale, float& zero) {
  scale = float(scale_code) * half_to_float(factors[0]);
  zero = fmaf(float(zero_code), half_to_float(factors[2]), half_to_float(factors[1]));
}

// A plain load; kernels pass their own (the GEMV's read-only __ldg) to group_params.
struct PlainLoad {
  template <class V>
  BF_HD V operator()(const V* p) const { return *p; }
};

// Group g of packed row `row` of a layer (any argument struct with scales, zeros, scale_codes,
// zero_codes and scale_rows): its scale and offset in fp32, from whichever form it stores (§5).
// The one place that tells the two forms apart: the dequantize, the GEMV, the GEMM (compact
// form) and their CPU twins all read a group through it.
// A row's part of that: the flat index of its group 0 and, for compact scales, its 3 factors.
// Kernels that read many groups of one row (the tensor-core GEMV) take it once per row.
struct RowScales {
  int64_t base;         // row · G
  uint16_t factors[3];  // compact scales only
};
template <class A, class Load = PlainLoad>
BF_HD inline RowScales row_scales(const A& a, int64_t row, int G, Load ld = Load()) {
  RowScales r{row * G, {0, 0, 0}};
  if (a.scale_codes) {
    const uint16_t* f = a.scale_rows + row * 3;
    r.factors[0] = ld(f), r.factors[1] = ld(f + 1), r.factors[2] = ld(f + 2);
  }
  return r;
}
// A group's two stored values as one word, loaded ahead of use: fp16 scale | fp16 offset << 16,
// or compact scale code | offset code << 16; group_params_of_raw turns it into fp32.
template <class A, class Load = PlainLoad>
BF_HD inline uint32_t raw_group_params(const A& a, const RowScales& r, int g, Load ld = Load()) {
  const int64_t i = r.base + g;
  if (a.scale_codes) return uint32_t(ld(a.scale_codes + i)) | (uint32_t(ld(a.zero_codes + i)) << 16);
  return uint32_t(ld(a.scales + i)) | (uint32_t(ld(a.zeros + i)) << 16);
}
template <class A>
BF_HD inline void group_params_of_raw(const A& a, const RowScales& r, uint32_t raw, float& scale,
                                      float& zero) {
  if (a.scale_codes) {
    compact_params(raw & 0xFFFFu, raw >> 16, r.factors, scale, zero);
  } else {
    scale = half_to_float(uint16_t(raw & 0xFFFFu));
    zero = half_to_float(uint16_t(raw >> 16));
  }
}
template <class A, class Load = PlainLoad>
BF_HD inline void row_group_params(const A& a, const RowScales& r, int g, float& scale, float& zero,
                                   Load ld = Load()) {
  group_params_of_raw(a, r, raw_group_params(a, r, g, ld), scale, zero);
}
template <class A, class Load = PlainLoad>
BF_HD inline void group_params(const A& a, int64_t row, int G, int g, float& scale, float& zero,
                               Load ld = Load()) {
  row_group_params(a, row_scales(a, row, G, ld), g, scale, zero, ld);
}

// Point a layer's argument struct (DequantArgs, gemv::Args, gemm::Args) at its scales: fp16
// pairs, or, when scale_rows is given, compact codes in `scales` / `zeros` (§5.1).
template <class A>
inline void set_scale_pointers(A& a, const void* scales, const void* zeros, const void* scale_rows) {
  if (scale_rows) {
    a.scale_codes = static_cast<const uint8_t*>(scales);
    a.zero_codes = static_cast<const uint8_t*>(zeros);
    a.scale_rows = static_cast<const uint16_t*>(scale_rows);
  } else {
    a.scales = static_cast<const uint16_t*>(scales);
    a.zeros = static_cast<const uint16_t*>(zeros);
  }
}

// Everything the dense dequant reads, as raw pointers. Tensors indexed by packed row: qweight,
// scales, zeros, res_index. fp16 tensors are uint16_t (raw bits).
struct DequantArgs {
  const uint32_t* qweight;    // flat buffer of §3
  const uint16_t* scales;     // (n, G) fp16; null with compact scales
  const uint16_t* zeros;      // (n, G) fp16; null with compact scales
  const uint8_t* scale_codes;  // (n, G) compact scale codes (§5.1), or null: fp16 pairs
  const uint8_t* zero_codes;   // (n, G) compact offset codes
  const uint16_t* scale_rows;  // (n, 3) fp16 row factors: scale step, offset base, offset step
  const int32_t* perm;        // (n): original output channel of each packed row; null = identity
  const int32_t* res_index;   // (n): residual row or -1; null = no residual branch
  const uint32_t* res_plane;  // (Nr, k_pad/32) sign plane
  const uint16_t* res_alpha;  // (Nr, G) fp16
  ClassTable classes;
  int n, k, k_pad, group_size;
};

// One packed row, resolved once and then used for all of its columns.
struct RowView {
  const uint32_t* words;   // the row's packed codes
  int bits;
  const DequantArgs* args;  // for the row's scales and offsets (group_params), either form
  int row, groups;         // the packed row and G
  const uint32_t* plane;   // the row's residual sign plane, or null when it has no residual
  const uint16_t* alpha;   // the row's G residual alphas
  int out_row;             // the output channel it is written to: perm[row] (§4)
};

// Resolve packed row `row` (0 <= row < a.n; callers check the class table sums to n).
BF_HD inline RowView row_view(const DequantArgs& a, int row) {
  RowView r;
  r.bits = 0;
  const int64_t off =
      row_word_offset(a.classes.bits, a.classes.rows, a.classes.count, a.k_pad, row, &r.bits);
  const int G = a.k_pad / a.group_size;
  r.words = a.qweight + off;
  r.args = &a;
  r.row = row;
  r.groups = G;
  const int ri = a.res_index ? a.res_index[row] : -1;
  r.plane = ri >= 0 ? a.res_plane + int64_t(ri) * (a.k_pad / kWordBits) : nullptr;
  r.alpha = ri >= 0 ? a.res_alpha + int64_t(ri) * G : nullptr;
  r.out_row = a.perm ? a.perm[row] : row;
  return r;
}

// The dense weight of one (packed row, column): Ŵ_b + R̂ (FORMAT.md §1), in fp32.
// R̂ = α · (2·sign − 1) on rows with a residual: +α for a set bit, −α for a clear one.
BF_HD inline float dequant_element(const RowView& r, int k, int group_size) {
  const int g = k / group_size;
  float scale, zero;
  group_params(*r.args, r.row, r.groups, g, scale, zero);
  float w = dequant_value(extract_code(r.words, r.bits, k), scale, zero);
  if (r.plane) {
    const float alpha = half_to_float(r.alpha[g]);
    w += sign_bit(r.plane, k) ? alpha : -alpha;
  }
  return w;
}

}  // namespace bitfuse
