// The fused epilogue every bitfuse kernel applies to one output, in ARCHITECTURE.md §4 order:
// acc (the dense product, fp32) + low-rank up (t·L_upᵀ) + extra (the sparse product) + bias.
// One definition for the GEMV (gemv.h) and the GEMM (gemm.h), whose Args differ in type but
// share these fields: perm, t, r, lr_up (fp16 bits), extra, n, bias.
#pragma once

#include <cstdint>

#include "bitfuse/format.h"

namespace bitfuse {

// Packed row `row`, x row `mi`. Returns y in fp32; *col is the output column perm[row] (or row).
template <class Args>
BF_HD inline float fused_epilogue(const Args& a, float acc, int row, int mi, int* col) {
  const int c = a.perm ? a.perm[row] : row;
  float y = acc;
  if (a.t) {
    float lr = 0.0f;
    const float* tm = a.t + int64_t(mi) * a.r;
    const uint16_t* up = a.lr_up + int64_t(row) * a.r;
    for (int j = 0; j < a.r; ++j) lr = fmaf(tm[j], half_to_float(up[j]), lr);
    y += lr;
  }
  if (a.extra) y += a.extra[int64_t(mi) * a.n + c];
  if (a.bias) y += a.bias[c];
  *col = c;
  return y;
}

// What fused_epilogue does after the low-rank term, for kernels that compute that term
// elsewhere (the GEMM sums it from shared memory, gemm.h lr_sums) and pass y = acc + lr (or acc
// without a low-rank branch): + extra + bias, in fused_epilogue's order. Must stay the same
// statements as fused_epilogue's tail (tests/test_cuda_gemm_host.py checks the two bit for bit).
template <class Args>
BF_HD inline float epilogue_tail(const Args& a, float y, int row, int mi, int* col) {
  const int c = a.perm ? a.perm[row] : row;
  if (a.extra) y += a.extra[int64_t(mi) * a.n + c];
  if (a.bias) y += a.bias[c];
  *col = c;
  return y;
}

}  // namespace bitfuse
