// Dense dequantize: the packed codes (+ binary residual) of a layer as an (n, k) weight in the
// original output order. This is the build-proving kernel, written for clarity: all index math
// comes from bitfuse/format.h, the same code the host reference (dequantize_host) runs and the
// tests check against pack.py. The tuned GEMV/GEMM kernels come later (issue #4).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "bitfuse/cuda_api.h"
#include "cuda_check.cuh"
#include "bitfuse/format.h"

namespace bitfuse {
namespace {

// Codes handled by one thread. 8 consecutive codes are one 4-bit word, half a 2-bit word or a
// quarter of a 3-bit run, so a thread never needs more than one word per plane. Consecutive
// threads take consecutive chunks of the same row, so a warp covers 256 consecutive columns:
// its word loads fall in one contiguous span and its stores in 256 contiguous outputs.
constexpr int kCodesPerThread = 8;
constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void dequant_kernel(const DequantArgs a, T* __restrict__ out) {
  const int chunks = a.k_pad / kCodesPerThread;  // k_pad is a multiple of 32
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= int64_t(a.n) * chunks) return;
  const int row = int(t / chunks);
  const int k0 = int(t % chunks) * kCodesPerThread;
  if (k0 >= a.k) return;  // the whole chunk is padding (k <= column < k_pad): never stored

  const RowView r = row_view(a, row);
  // The inverse permutation is fused into the store: packed row `row` lands on row perm[row].
  T* dst = out + int64_t(r.out_row) * a.k;
#pragma unroll
  for (int j = 0; j < kCodesPerThread; ++j) {
    const int k = k0 + j;
    if (k < a.k) dst[k] = from_float<T>(dequant_element(r, k, a.group_size));
  }
}

}  // namespace

namespace cuda {

std::string dequantize(const DequantArgs& args, void* out, int out_dtype, std::uintptr_t stream) {
  std::string err = cuda_check::device_pointer(args.qweight, "qweight_ptr", "bitfuse dequantize_cuda");
  if (err.empty()) err = cuda_check::device_pointer(out, "out_ptr", "bitfuse dequantize_cuda");
  if (!err.empty()) return err;
  const int64_t threads = int64_t(args.n) * (args.k_pad / kCodesPerThread);
  if (threads == 0) return "";
  const unsigned blocks = unsigned((threads + kThreads - 1) / kThreads);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  // Only the output type is a template parameter: three instantiations per arch.
  switch (out_dtype) {
    case 0: dequant_kernel<float><<<blocks, kThreads, 0, s>>>(args, static_cast<float*>(out)); break;
    case 1: dequant_kernel<__half><<<blocks, kThreads, 0, s>>>(args, static_cast<__half*>(out)); break;
    case 2:
      dequant_kernel<__nv_bfloat16><<<blocks, kThreads, 0, s>>>(args, static_cast<__nv_bfloat16*>(out));
      break;
    default: return "bitfuse dequantize_cuda: out_dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse dequantize_cuda: kernel launch failed", e);
  return "";
}

}  // namespace cuda
}  // namespace bitfuse
