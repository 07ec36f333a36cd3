// mma.m16n8k16 emulated on the CPU for the twins of the tensor-core kernels (gemm_host.cpp,
// gemv_host.cpp): the fragment layouts are mma_tile.h's, i.e. the PTX ISA's.
#pragma once

#include <cstdint>

#include "bitfuse/mma_tile.h"

namespace bitfuse {
namespace host {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}, emulated from the ISA fragment layouts:
// c[lane][0..3] += A·B with A from a[lane][0..3], B from (b0, b1)[lane].
inline void emu_mma(int dtype, float* const c[32], const uint32_t a[32][4], const uint32_t b0[32],
             const uint32_t b1[32]) {
  float A[16][16], B[16][8], D[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      const uint32_t r = a[l][i >> 1];
      A[mma::a_row(l, i)][mma::a_col(l, i)] = mma::act_to_f32(uint16_t(i & 1 ? r >> 16 : r), dtype);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t r = i < 2 ? b0[l] : b1[l];
      B[mma::b_row(l, i)][mma::b_col(l, i)] = mma::act_to_f32(uint16_t(i & 1 ? r >> 16 : r), dtype);
    }
    for (int i = 0; i < 4; ++i) D[mma::c_row(l, i)][mma::c_col(l, i)] = c[l][i];
  }
  // The products of two fp16/bf16 values are exact; the hardware's order and width of the sum
  // are unspecified, so the emulation sums in double and rounds once to fp32 per mma (the tests'
  // bound allows any fp32 accumulation order).
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      double d = D[r][n];
      for (int k = 0; k < 16; ++k) d += double(A[r][k]) * double(B[k][n]);
      D[r][n] = float(d);
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) c[l][i] = D[mma::c_row(l, i)][mma::c_col(l, i)];
}

}  // namespace host
}  // namespace bitfuse
