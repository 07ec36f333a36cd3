// Device discovery for cuda_device_count() / cuda_status(). The CUDA runtime is linked
// statically, so this module imports on machines with no libcudart; every failure here (no
// driver, a driver older than this runtime, no GPU) is reported, never raised or crashed on.
#include <cuda_runtime.h>

#include <string>

#include "bitfuse/cuda_api.h"

namespace bitfuse {
namespace cuda {

int device_count(std::string* status) {
  int driver = 0;
  // cudaDriverGetVersion reports 0 (with success) when no driver library can be loaded.
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
    cudaGetLastError();
    *status = "no CUDA driver found";
    return 0;
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so it does not surface at a later CUDA call
    int runtime = 0;
    cudaRuntimeGetVersion(&runtime);
    *status = std::string("CUDA unusable: ") + cudaGetErrorString(e) + " (driver " +
              std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
              ", bitfuse built with runtime " + std::to_string(runtime / 1000) + "." +
              std::to_string(runtime % 1000 / 10) + ")";
    return 0;
  }
  *status = std::to_string(count) + (count == 1 ? " device" : " devices");
  return count;
}

}  // namespace cuda
}  // namespace bitfuse
