// The functions csrc/cuda/*.cu export to the host code. Plain C++ only: the host sources never
// include a CUDA header, so the same bindings compile with or without the CUDA part.
#pragma once

#include <cstdint>
#include <string>

#include "bitfuse/format.h"
#include "bitfuse/gemm.h"
#include "bitfuse/gemv.h"

namespace bitfuse {
namespace cuda {

// Number of usable CUDA devices. Never throws: on failure returns 0 and sets *status to why
// ("no CUDA driver found", the CUDA error string, ...); on success *status is "N device(s)".
int device_count(std::string* status);

// Launch the dense dequantize on `stream` (a cudaStream_t as an integer; 0 = default stream).
// `out` is a device pointer to an (n, k) row-major array of float (out_dtype 0), __half (1) or
// __nv_bfloat16 (2). Arguments are already validated by the caller. Returns "" on success, else
// a message with the CUDA error; it does not synchronize.
std::string dequantize(const DequantArgs& args, void* out, int out_dtype, std::uintptr_t stream);

// Launch the fused GEMV (csrc/cuda/gemv.cu) for args.m <= 8 rows of x, dtype 1 (fp16) or 2
// (bf16) for x and out. Arguments are validated by the caller (bindings.cpp). Returns "" on
// success, else the CUDA error; asynchronous on `stream`.
// With tensor_cores, the same product on the tensor cores (csrc/cuda/gemv_tc.cu, bitfuse/gemv_tc.h:
// same Args, same result up to fp32 summation order; group sizes 32/64/128).
std::string gemv(const gemv::Args& args, int dtype, std::uintptr_t stream, bool tensor_cores = false);
// gemv_tc.cu's launch, for gemv() above (arguments checked there).
void gemv_tc_launch(const gemv::Args& args, int dtype, unsigned blocks, std::uintptr_t stream);

// The launch plan of the tensor-core GEMM for args (shapes and classes; pointers unused) on the
// current device: the tile, S (split-K across blocks: gemm_config.h plan_split from the device's
// SM count; `split` 0 = that choice, >= 1 = asked for), the fp32 workspace bytes and the counters
// S needs (both 0 when S = 1). Returns "" on success, else why (no GPU, GPU too old).
struct GemmPlan {
  int tile = -1, split = 1, sms = 0, tiles = 0, counters = 0;
  int64_t workspace_bytes = 0;
};
std::string gemm_plan(const gemm::Args& args, int split, GemmPlan* plan);

// Launch the tensor-core GEMM (csrc/cuda/gemm.cu) for any args.m >= 1 (meant for m > 8), dtype
// 1 (fp16) or 2 (bf16). The tile comes from bitfuse/gemm_config.h by the device's compute
// capability and m; args' class plan (class_tile, class_vec, ...) and S (`split` as in gemm_plan)
// are filled here; with S > 1, args.partial / args.counters must be what gemm_plan asked for
// (bindings.cpp checks). Arguments are validated by the caller (bindings.cpp). Returns "" on
// success, else why; asynchronous.
std::string gemm(const gemm::Args& args, int dtype, int split, std::uintptr_t stream);

}  // namespace cuda
}  // namespace bitfuse
