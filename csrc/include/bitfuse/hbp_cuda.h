// The HBP and CSR products csrc/cuda/hbp.cu exports to the host code (plain C++: the host
// sources never include a CUDA header). Arguments are validated by the caller
// (csrc/host/hbp_kernels_py.cpp). Each returns "" on success, else a message with the CUDA
// error; all are asynchronous on `stream` (a cudaStream_t as an integer) and never synchronize.
#pragma once

#include <cstdint>
#include <string>

#include "bitfuse/hbp.h"
#include "bitfuse/hbp_csr.h"

namespace bitfuse {
namespace cuda {

// y = A·x on the HBP layout (docs/HBP.md §3, csrc/cuda/hbp.cu). One launch, plus a second one
// that sums split rows when n_multi > 0. The competitive counter (args.counter, 2 int32, zero
// before the first call) is back to zero when the launch ends: no host reset, no sync.
std::string hbp_spmm(const hbp::DeviceArgs& args, std::uintptr_t stream);

// The scalar (thread per row) or vector (warp per row) CSR baseline.
std::string csr_spmm(const hbp::CsrArgs& args, std::uintptr_t stream);

}  // namespace cuda
}  // namespace bitfuse
