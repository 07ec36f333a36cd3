// Device helpers shared by the kernels that use them (gemv.cu, gemv_tc.cu, gemm.cu): read-only
// loads and the one mma instruction bitfuse issues.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bitfuse/mma_tile.h"

namespace bitfuse {
namespace ptx {

// Read-only loads (LDG.NC) for group_params: the scales are never written during a launch.
struct LdgLoad {
  template <class V>
  __device__ V operator()(const V* p) const { return __ldg(p); }
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32, D = C in place (c += A·B). DT is the
// operands' dtype code (mma::kDtypeF16 / kDtypeBF16). zero_c: C = 0 instead (c = A·B), without
// a separate zeroing of c (the skinny GEMM starts each group's sums so; zero_c is a constant
// there, so one of the two forms is compiled).
template <int DT>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                         bool zero_c = false) {
  if (zero_c) {
    if constexpr (DT == mma::kDtypeBF16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
          : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
          : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
    }
    return;
  }
  if constexpr (DT == mma::kDtypeBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// v, through an instruction the compiler cannot see into: a value computed once per block (a
// lane's shared-memory offsets) is then kept in its register instead of being recomputed from
// threadIdx in every iteration of a hot loop, which ptxas otherwise prefers.
__device__ __forceinline__ uint32_t opaque(uint32_t v) {
  uint32_t r;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(r) : "r"(v));
  return r;
}

// x[row][k .. k+8) as raw fp16/bf16 bits, for the GEMVs' staging: one 16-byte load when `vec`
// (the caller's x_vec: x 16-byte aligned, k a multiple of 8) and all 8 lie before kmax, else
// element loads; 0 past kmax and for a row that does not exist (live = false).
__device__ __forceinline__ void load_act8(const uint16_t* row, int k, int kmax, bool live, bool vec,
                                          uint16_t v[8]) {
  if (live && vec && k + 8 <= kmax) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
    const uint16_t* e = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = e[j];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (live && k + j < kmax) ? row[k + j] : uint16_t(0);
  }
}

}  // namespace ptx
}  // namespace bitfuse
