// HBP SpMV/SpMM on CUDA (docs/HBP.md §3, issue #6), and the CSR baselines of its benchmark.
//
// HBP product, one launch (+ one for split rows):
//  * Persistent grid: SMs × resident blocks (from the occupancy API for this kernel, block size
//    and shared memory), never a fixed thread count. Work items are (tile, chunk of MT right-hand
//    sides), heaviest tile first (tile_order). Each block takes `per` items statically, round
//    robin, then tickets from an atomic counter (the competitive part); bitfuse/hbp.h
//    make_schedule / static_item / item_rank hold that math, shared with the CPU twin.
//  * Counter reset on the device, no host sync: the counter is two int32, [next ticket, blocks
//    done]. A block that draws a ticket past the end increments "done"; the last block to do so
//    has seen every ticket drawn (each block's last ticket precedes its "done" increment), so it
//    zeroes both words, and the next launch on the stream starts from 0. Nothing on the host
//    touches the counter after it is allocated zeroed, so calls are CUDA-graph safe.
//  * The per-item work is bitfuse/hbp_kernel.h's Product, __host__ __device__: the CPU twin
//    (csrc/host/hbp_spmv.cpp) runs the same member functions serially, so the CPU tests execute
//    this kernel's body and a GPU result must equal the twin's bit for bit.
//  * A block stages the tile's x slice x[c0 : c0 + width, j0 : j0 + MT] in shared memory, in the
//    accumulate type, when that pays (hbp.h stage_pays: it fits in 48 KiB, and the tile has at
//    least as many stored slots as columns); hypersparse tiles read x through L1 instead of
//    loading a slice they barely use.
//  * Warp w of the block takes groups g0 + w, g0 + w + W, ... of the tile; lane l of a group
//    reads slot off + 32·j + l (coalesced 32-wide loads at every step j), 4 steps per batch, and
//    accumulates MT sums with one fma each (hbp.h lane_dot).
//  * Lanes write y[row] directly, or the partial slot of a split row; the second launch sums each
//    split row's slots in column order (reduce_pieces): deterministic, no atomics on y.
//  * Rows with no nonzero are written 0 by the grid (layout empty_rows), so y needs no memset.
//  * fp16 values: fp32 accumulation, fp16 or bf16 x, fp16 or fp32 y (the outlier branch reads
//    fp16/bf16 activations and writes fp32). fp32: all fp32. fp64: all fp64.
//
// CSR baselines: scalar (thread per row) and vector (warp per row, deterministic xor-butterfly
// reduction); per-row sums in bitfuse/hbp_csr.h.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "bitfuse/cuda_api.h"
#include "bitfuse/hbp_cuda.h"
#include "bitfuse/hbp_kernel.h"
#include "cuda_check.cuh"

namespace bitfuse {
namespace {

using hbp::BF16;
using hbp::CsrArgs;
using hbp::DeviceArgs;
using hbp::Half;

constexpr int kMaxWarps = 8;

using hbp::AccOf;
using hbp::load_x;
using hbp::store_y;

template <typename V, typename X, int MT>
__global__ void __launch_bounds__(kMaxWarps * 32) hbp_kernel(const __grid_constant__ DeviceArgs a) {
  using Acc = typename AccOf<V>::type;
  const hbp::Product<V, X, MT> P{a};
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* xs = reinterpret_cast<Acc*>(smem_raw);  // [width][MT]
  __shared__ int64_t s_item;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;

  const int64_t n_zero = a.n_empty * a.m;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_zero;
       i += int64_t(gridDim.x) * blockDim.x)
    P.zero_empty(i);

  const int64_t n_chunks = P.n_chunks();
  const int64_t n_items = a.n_tiles * n_chunks;
  const hbp::Schedule sch = hbp::make_schedule(n_items, gridDim.x);
  for (int64_t k = 0;; ++k) {
    if (threadIdx.x == 0)
      s_item = k < sch.per ? hbp::static_item(blockIdx.x, k, gridDim.x)
                           : sch.first_dynamic + int64_t(atomicAdd(a.counter, 1));
    __syncthreads();
    const int64_t it = s_item;
    if (it >= n_items) break;  // uniform over the block
    const hbp::Item w = P.item(it, n_chunks);
    if (w.stage) {
      P.stage(w, xs, threadIdx.x, blockDim.x);
      __syncthreads();
    }
    const int64_t g1 = a.tile_group_ptr[w.tile + 1];
    for (int64_t g = a.tile_group_ptr[w.tile] + warp; g < g1; g += nwarps) P.group_lane(w, xs, g, lane);
    __syncthreads();  // xs and s_item are rewritten for the next item
  }
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(a.counter + 1, 1) == int(gridDim.x) - 1) {  // the last block out
      __threadfence();  // its reset is ordered after every block's last ticket
      atomicExch(a.counter, 0);
      atomicExch(a.counter + 1, 0);
    }
  }
}

// Split rows: thread per (row, right-hand side), partial slots summed in column order.
template <typename V>
__global__ void hbp_reduce_kernel(const __grid_constant__ DeviceArgs a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.n_multi * a.m) return;
  hbp::Product<V, V, 1>{a}.reduce(i);  // (X and MT do not enter the reduction)
}

template <typename V, int MT>
__global__ void csr_scalar_kernel(const CsrArgs a) {
  using Acc = typename AccOf<V>::type;
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.n_rows) return;
  const V* vals = static_cast<const V*>(a.values);
  const V* x = static_cast<const V*>(a.x);
  const int64_t p0 = a.indptr[r], p1 = a.indptr[r + 1];
  for (int64_t j0 = 0; j0 < a.m; j0 += MT) {
    const int64_t mt = a.m - j0 < MT ? a.m - j0 : MT;
    const V* xb = x + j0 * a.x_stride_j;
    const int64_t sc = a.x_stride_c, sj = a.x_stride_j;
    const auto xat = [xb, sc, sj, mt](int32_t c, int i) -> Acc {
      return i < mt ? Acc(load_x(xb + int64_t(c) * sc + i * sj)) : Acc(0);
    };
    Acc acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = Acc(0);
    hbp::csr_row_dot<MT>(a.indices, vals, p0, p1, xat, acc);
#pragma unroll
    for (int i = 0; i < MT; ++i)
      if (i < mt) store_y(a.y, r * a.y_stride_r + (j0 + i) * a.y_stride_j, acc[i], a.dtype);
  }
}

template <typename V, int MT>
__global__ void csr_vector_kernel(const CsrArgs a) {
  using Acc = typename AccOf<V>::type;
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (r >= a.n_rows) return;  // whole warps leave together
  const V* vals = static_cast<const V*>(a.values);
  const V* x = static_cast<const V*>(a.x);
  const int64_t p0 = a.indptr[r], p1 = a.indptr[r + 1];
  for (int64_t j0 = 0; j0 < a.m; j0 += MT) {
    const int64_t mt = a.m - j0 < MT ? a.m - j0 : MT;
    const V* xb = x + j0 * a.x_stride_j;
    const int64_t sc = a.x_stride_c, sj = a.x_stride_j;
    const auto xat = [xb, sc, sj, mt](int32_t c, int i) -> Acc {
      return i < mt ? Acc(load_x(xb + int64_t(c) * sc + i * sj)) : Acc(0);
    };
    Acc acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = Acc(0);
    hbp::csr_lane_dot<MT>(a.indices, vals, p0, p1, lane, xat, acc);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[i] = acc[i] + __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)  // every lane holds every total: lane i stores column i
      if (i < mt && lane == i) store_y(a.y, r * a.y_stride_r + (j0 + i) * a.y_stride_j, acc[i], a.dtype);
  }
}

// Resident blocks per SM and SM count, cached per (device, kernel, block size, shared memory):
// the occupancy query is host-only work (no stream operation), so it is legal during capture.
int grid_capacity(const void* fn, int threads, size_t smem, std::string* err) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return *err = cuda_check::error_text("bitfuse hbp_spmm_cuda: cudaGetDevice", e), 0;
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, fn, threads, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, smem);
  if (e != cudaSuccess) return *err = cuda_check::error_text("bitfuse hbp_spmm_cuda: occupancy query", e), 0;
  const int blocks = sms * (per_sm > 0 ? per_sm : 1);
  cache[key] = blocks;
  return blocks;
}

template <typename V, typename X, int MT>
std::string launch_hbp(DeviceArgs a, cudaStream_t s) {
  using Acc = typename AccOf<V>::type;
  const int threads = 32 * a.warps;
  a.stage_cols = hbp::cap_stage_cols(a.stage_cols, MT, int(sizeof(Acc)));  // the twin caps alike
  const size_t smem = size_t(a.stage_cols) * MT * sizeof(Acc);
  const void* fn = reinterpret_cast<const void*>(&hbp_kernel<V, X, MT>);
  std::string err;
  const int capacity = grid_capacity(fn, threads, smem, &err);
  if (!err.empty()) return err;
  const int64_t n_items = a.n_tiles * hbp::n_chunks_of(a.m, MT);
  const int64_t zero_blocks = (a.n_empty * a.m + threads - 1) / threads;
  int64_t blocks = n_items > zero_blocks ? n_items : zero_blocks;
  if (blocks > capacity) blocks = capacity;
  if (blocks < 1) blocks = 1;
  hbp_kernel<V, X, MT><<<unsigned(blocks), threads, smem, s>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse hbp_spmm_cuda: kernel launch failed", e);
  if (a.n_multi > 0) {
    const int64_t n = a.n_multi * a.m;
    hbp_reduce_kernel<V><<<unsigned((n + 255) / 256), 256, 0, s>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_check::error_text("bitfuse hbp_spmm_cuda: reduce launch failed", e);
  }
  return "";
}

template <typename V, typename X>
std::string launch_hbp_mt(const DeviceArgs& a, cudaStream_t s) {
  return a.m == 1 ? launch_hbp<V, X, 1>(a, s) : launch_hbp<V, X, 8>(a, s);
}

template <typename V>
std::string launch_csr(const CsrArgs& a, cudaStream_t s) {
  const int threads = 256;
  const int64_t rows_per_block = a.kernel == hbp::kCsrScalar ? threads : threads / 32;
  const int64_t blocks = (a.n_rows + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return "bitfuse csr_spmm_cuda: too many rows for one launch";
  const bool one = a.m == 1;
  if (a.kernel == hbp::kCsrScalar) {
    if (one) csr_scalar_kernel<V, 1><<<unsigned(blocks), threads, 0, s>>>(a);
    else csr_scalar_kernel<V, 8><<<unsigned(blocks), threads, 0, s>>>(a);
  } else {
    if (one) csr_vector_kernel<V, 1><<<unsigned(blocks), threads, 0, s>>>(a);
    else csr_vector_kernel<V, 8><<<unsigned(blocks), threads, 0, s>>>(a);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_check::error_text("bitfuse csr_spmm_cuda: kernel launch failed", e);
  return "";
}

}  // namespace

namespace cuda {

std::string hbp_spmm(const DeviceArgs& a, std::uintptr_t stream) {
  const char* who = "bitfuse hbp_spmm_cuda";
  std::string err = cuda_check::device_pointer(a.x, "x_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(a.y, "y_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(a.counter, "counter_ptr", who);
  if (err.empty() && a.n_tiles > 0) err = cuda_check::device_pointer(a.values, "values", who);
  if (!err.empty()) return err;
  if (a.m == 0 || a.n_rows == 0) return "";
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.value_dtype == hbp::kF16)
    return a.x_dtype == hbp::kBF16 ? launch_hbp_mt<Half, BF16>(a, s) : launch_hbp_mt<Half, Half>(a, s);
  if (a.value_dtype == hbp::kF32) return launch_hbp_mt<float, float>(a, s);
  if (a.value_dtype == hbp::kF64) return launch_hbp_mt<double, double>(a, s);
  return std::string(who) + ": unsupported value dtype code " + std::to_string(a.value_dtype);
}

std::string csr_spmm(const CsrArgs& a, std::uintptr_t stream) {
  const char* who = "bitfuse csr_spmm_cuda";
  std::string err = cuda_check::device_pointer(a.x, "x_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(a.y, "y_ptr", who);
  if (err.empty()) err = cuda_check::device_pointer(a.indptr, "indptr_ptr", who);
  if (!err.empty()) return err;
  if (a.m == 0 || a.n_rows == 0) return "";
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case hbp::kF16: return launch_csr<Half>(a, s);
    case hbp::kF32: return launch_csr<float>(a, s);
    case hbp::kF64: return launch_csr<double>(a, s);
  }
  return std::string(who) + ": unsupported dtype code " + std::to_string(a.dtype);
}

}  // namespace cuda
}  // namespace bitfuse
