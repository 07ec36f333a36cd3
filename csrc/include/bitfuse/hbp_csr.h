// CSR baselines for the HBP benchmark (csrc/cuda/hbp.cu): a scalar kernel (one thread per row)
// and a vector kernel (one warp per row, lanes strided over the row, xor-butterfly reduction).
// Their per-row sums are __host__ __device__ here so the CPU twin (_C.csr_spmm_host) runs the
// same order and the GPU tests can demand bit-identical results.
#pragma once

#include <cstdint>

#include "bitfuse/hbp.h"

namespace bitfuse {
namespace hbp {

enum CsrKernel : int { kCsrScalar = 0, kCsrVector = 1 };

// Device pointers and shapes of a CSR product y = A·x (int32 indptr and indices; x and y
// strided like DeviceArgs). Values, x and y share one dtype (fp16/fp32/fp64).
struct CsrArgs {
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  const void* values = nullptr;
  int64_t n_rows = 0, n_cols = 0;
  const void* x = nullptr;
  int64_t x_stride_c = 0, x_stride_j = 0;
  void* y = nullptr;
  int64_t y_stride_r = 0, y_stride_j = 0;
  int64_t m = 1;
  int dtype = kF32;
  int kernel = kCsrVector;
};

// Scalar kernel: acc[i] += v_p · x(c_p, i) for p in [p0, p1), in order.
template <int MT, typename V, typename Acc, typename XAt>
BF_HD inline void csr_row_dot(const int32_t* indices, const V* vals, int64_t p0, int64_t p1,
                              const XAt& xat, Acc (&acc)[MT]) {
  for (int64_t p = p0; p < p1; ++p) {
    const int32_t c = indices[p];
    const Acc a = Acc(to_acc(vals[p]));
    BF_UNROLL
    for (int i = 0; i < MT; ++i) acc[i] = madd(a, xat(c, i), acc[i]);
  }
}

// Vector kernel, lane `lane` of the row's warp: the elements p0 + lane, p0 + lane + 32, ...
template <int MT, typename V, typename Acc, typename XAt>
BF_HD inline void csr_lane_dot(const int32_t* indices, const V* vals, int64_t p0, int64_t p1,
                               int lane, const XAt& xat, Acc (&acc)[MT]) {
  for (int64_t p = p0 + lane; p < p1; p += kGroup) {
    const int32_t c = indices[p];
    const Acc a = Acc(to_acc(vals[p]));
    BF_UNROLL
    for (int i = 0; i < MT; ++i) acc[i] = madd(a, xat(c, i), acc[i]);
  }
}

// The warp's xor butterfly, run on the host over the 32 lane partials: at each step every lane
// adds its partner's value (v[l] + v[l ^ off]; IEEE addition commutes, so all lanes end equal),
// exactly as __shfl_xor_sync does on the GPU.
template <typename Acc>
inline Acc butterfly_host(Acc (&v)[kGroup]) {
  for (int off = kGroup / 2; off > 0; off >>= 1) {
    Acc next[kGroup];
    for (int l = 0; l < kGroup; ++l) next[l] = v[l] + v[l ^ off];
    for (int l = 0; l < kGroup; ++l) v[l] = next[l];
  }
  return v[0];
}

}  // namespace hbp
}  // namespace bitfuse
