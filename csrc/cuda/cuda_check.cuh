// Error text and pointer checks shared by the CUDA entry points (dequant.cu, gemv.cu).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "bitfuse/cuda_api.h"

namespace bitfuse {
namespace cuda_check {

inline std::string error_text(const std::string& what, cudaError_t e) {
  return what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Reject host or unregistered pointers up front: launching on them would be an illegal access,
// which poisons the whole CUDA context, where this is an ordinary error. `who` names the entry
// point in the message ("bitfuse gemv_cuda").
inline std::string device_pointer(const void* p, const char* name, const char* who) {
  cudaPointerAttributes attr;
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so it does not surface at a later call
    std::string status;  // "no CUDA driver found", ...: says more than the bare error code
    cuda::device_count(&status);
    return error_text(std::string(who) + ": CUDA is not usable here (" + status + ")", e);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return std::string(who) + ": " + name + " is not CUDA device memory";
  return "";
}

}  // namespace cuda_check
}  // namespace bitfuse
