// The tensor-core GEMV (csrc/cuda/gemv_tc.cu) for M <= 8 rows of x: its geometry and the
// per-lane bit math, shared with the CPU twin `_C.gemv_host(..., tensor_cores=True)`
// (csrc/host/gemv_host.cpp). Same Args and semantics as the SIMT GEMV (gemv.h):
//   y = x·(Ŵ_b + R̂)ᵀ + t·L_upᵀ + extra + bias, stored through perm, in x's dtype.
//
// Why a second GEMV. The SIMT GEMV dequantizes every weight to fp32 and multiplies it with an
// fp32 fma: about 5 instructions a weight at M = 1 and 12 at M = 8 (SASS of gemv.cu, counted by
// benchmarks/static/sass_count.py). A memory-bound 4-bit GEMV on an H100 (3.35 TB/s, 132 SMs)
// may spend about 4.4 warp-lane instructions a weight, an H200 3.1, an AGX Orin 6.5: the SIMT
// loop is issue-bound there before it is bandwidth-bound. This kernel swaps the operands
// (yᵀ = W·xᵀ, "swap AB"): W is the 16×16 A operand of mma.m16n8k16 and the M <= 8 rows of x are
// its n8 columns, so the products run on the tensor cores whatever M is, and the scales move out
// of the inner loop:
//
//   Σ_k x_k·(q_k·s_g + m_g) = s_g·Σ_k x_k·q_k + m_g·Σ_k x_k          (per group g, per row)
//
// A holds the exact integer codes q (0..15 are exact in fp16 and bf16), so each mma computes
// Σ x·q with exact products and fp32 accumulation; the group sums Σ x are computed once per block
// while x is staged (chunk8_sum + a butterfly), and two fp32 fmas a row and group apply s and m.
// The binary residual is a third mma whose A holds ±1 (the sign plane), times α per group.
// Nothing is rounded before the fp32 sums: unlike the GEMM (which rounds Ŵ to x's dtype
// for its B operand), the only differences from the fp32 reference are summation order and the
// factoring (tests/_tolerance.factored_magnitude bounds it: |q·s| + |m| + |α| in place of |Ŵ|).
//
// Where each code goes. FORMAT.md §3.1's slot order puts a lane's B fragment (GEMM) in its own
// slots 8t..8t+7 of a run; an A fragment is the same thing for two rows (g and g+8): register a0
// = row g's pair (2t, 2t+1), a1 = row g+8's, a2 / a3 = the pairs (2t+8, 2t+9). So lane (g, t)
// loads word t of each run of rows g and g+8 (4-bit; the 16-bit half t & 1 of word t >> 1 for
// 2-bit and the 3-bit low plane, plus byte t of the high-plane word) and decodes it with the
// GEMM's magic-number unpack (mma_tile.h lane_magic), minus the magic: no shuffles, no shared
// memory for weights. The B operand is x, staged once per block in shared memory in "pair order"
// (x_pair_pos) so that a lane's 4 B registers of a run (both k16 steps) are one 16-byte load.
#pragma once

#include <cstdint>

#include "bitfuse/exact_codes.h"
#include "bitfuse/format.h"
#include "bitfuse/gemv.h"
#include "bitfuse/mma_tile.h"

namespace bitfuse {
namespace gemv_tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16;  // one m16 A tile; class boundaries are multiples of 16
constexpr int kRunsPerIter = 8;    // runs (32 codes) a warp loads at once: 64 bytes a lane (4-bit)
constexpr int kXHalves = 16384;    // staged x chunk: m_stage rows × XC columns of fp16/bf16 (32 KB)
constexpr int kXPad = 32;          // halves of padding a staged row (64 B: rows g, g+1 on other banks)

// Group sizes the kernel takes: a group is 1, 2 or 4 runs of its unrolled 8-run block.
BF_HD constexpr bool takes_group_size(int gs) { return gs == 32 || gs == 64 || gs == 128; }

// Rows of x staged (1, 2, 4 or 8: the smallest power of two >= m) and the chunk width in columns.
BF_HD constexpr int m_stage(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; }
BF_HD constexpr int chunk_cols(int m) { return kXHalves / m_stage(m); }
// Columns staged for a chunk of `cols` columns: rounded up to 256, so that the staging threads of
// one warp cover whole 256-column spans (whole groups, for the Σx shuffles) and every warp takes
// part in an iteration either fully or not at all.
BF_HD constexpr int staged_cols(int cols) { return (cols + 255) / 256 * 256; }

// Dynamic shared memory of a launch: the staged x (m_stage rows × (XS + kXPad) halves, XS the
// widest staged chunk), the group sums (m_stage × XS / group floats), the warps' C tiles.
struct SmemLayout {
  int xs_stride;    // halves a staged row
  int xsum_offset;  // bytes
  int red_offset;   // bytes
  int bytes;
};
BF_HD inline SmemLayout smem_layout(int m, int k_pad, int group_size) {
  const int ms = m_stage(m);
  const int xs = chunk_cols(m) < staged_cols(k_pad) ? chunk_cols(m) : staged_cols(k_pad);
  SmemLayout l;
  l.xs_stride = xs + kXPad;
  l.xsum_offset = ms * l.xs_stride * 2;                       // a multiple of 64
  l.red_offset = (l.xsum_offset + (ms * xs / group_size) * 4 + 15) / 16 * 16;  // float4 stores
  l.bytes = l.red_offset + kWarps * 32 * 4 * 4;
  return l;
}

// Position of column c (0..31) of a run in the staged x: lane t's 8 columns
// 2t + {0, 1, 8, 9, 16, 17, 24, 25} at 8t..8t+7, as B registers b0, b1 of step 0, then of step 1.
BF_HD constexpr int x_pair_pos(int c) {
  return 8 * ((c >> 1) & 3) + 2 * (((c >> 3) & 1) | (((c >> 4) & 1) << 1)) + (c & 1);
}

// The exact-code A fragments (magic_pair .. lane_signs) and the group fold (fold_group) are
// bitfuse/exact_codes.h's, shared with the GEMM's skinny tile (gemm.h).
using exact::codes_from_magic;
using exact::fold_group;
using exact::lane_codes;
using exact::lane_signs;
using exact::lane_word;
using exact::magic_pair;
using exact::one_pair;

// Σx of each (group, x row) of a chunk, for the offset terms m·Σx. The kernel sums them while it
// stages x: the thread that stages 8 columns adds them in column order (chunk8_sum), and the
// gs/8 consecutive lanes of one group combine their sums by an xor butterfly (lane i adds lane
// i ^ off's value to its own, off = gs/16 .. 1); the twin runs xsum_tree on the same partials.
BF_HD inline float chunk8_sum(const float v[8]) {
  float s = v[0];
  BF_UNROLL for (int j = 1; j < 8; ++j) s += v[j];
  return s;
}
BF_HD inline float xsum_tree(float* part, int lanes) {  // part[0..lanes) is overwritten
  for (int off = lanes / 2; off > 0; off /= 2) {
    float next[16];
    for (int i = 0; i < lanes; ++i) next[i] = part[i] + part[i ^ off];
    for (int i = 0; i < lanes; ++i) part[i] = next[i];
  }
  return part[0];
}

}  // namespace gemv_tc
}  // namespace bitfuse
