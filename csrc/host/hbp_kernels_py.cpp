// Bindings of the HBP/CSR GPU products (csrc/cuda/hbp.cu) and the CSR baselines' CPU twin. Like
// gemv_cuda (bindings.cpp): device pointers, shapes, dtype codes and a stream as integers, no
// torch. Every argument is checked here; the layout itself is trusted (HBPMatrix validates it
// with hbp_validate before it goes to the device).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitfuse/hbp.h"
#include "bitfuse/hbp_csr.h"
#include "checks.h"
#ifdef BITFUSE_WITH_CUDA
#include "bitfuse/hbp_cuda.h"
#endif

namespace py = pybind11;

namespace bitfuse {
namespace host {
namespace {

#ifndef BITFUSE_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "bitfuse._C was built without CUDA (BITFUSE_CUDA=0, or no nvcc was found at build time); "
      "reinstall with nvcc available (BITFUSE_CUDA=1 makes a missing nvcc a build error)");
}
#endif

std::string num(int64_t v) { return std::to_string(v); }

int dtype_bytes(int code) { return code == hbp::kF64 ? 8 : code == hbp::kF32 ? 4 : 2; }

// A device pointer argument: non-zero when required, aligned to its element size.
template <typename T = void>
T* pointer(const char* who, std::uintptr_t p, const std::string& name, std::uintptr_t align,
           bool required) {
  if (p == 0) {
    if (required) fail(std::string(who) + ": " + name + " must not be 0");
    return nullptr;
  }
  if (p % align) fail(std::string(who) + ": " + name + " must be " + num(int64_t(align)) + "-byte aligned");
  return reinterpret_cast<T*>(p);
}

void check_strides(const char* who, int64_t a, int64_t b, int64_t c, int64_t d) {
  if (a < 0 || b < 0 || c < 0 || d < 0) fail(std::string(who) + ": strides must be >= 0");
}

void hbp_spmm_cuda(const py::dict& arrays, std::uintptr_t x, std::uintptr_t y,
                   std::uintptr_t partial, std::uintptr_t counter, int64_t n_rows, int64_t n_cols,
                   int64_t tile_cols, int64_t n_tiles, int64_t n_multi, int64_t n_empty,
                   int64_t n_slots, int64_t m, int64_t x_stride_c, int64_t x_stride_j,
                   int64_t y_stride_r, int64_t y_stride_j, int value_dtype, int x_dtype,
                   int y_dtype, int64_t stage_cols, int warps, std::uintptr_t stream) {
  const char* who = "bitfuse hbp_spmm_cuda";
  if (n_rows < 0 || n_cols < 0 || n_tiles < 0 || n_multi < 0 || n_empty < 0 || n_slots < 0 ||
      m < 0 || n_rows > std::numeric_limits<int32_t>::max() || n_cols > std::numeric_limits<int32_t>::max())
    fail(std::string(who) + ": sizes must be >= 0 (and rows, cols < 2^31)");
  if (tile_cols < 1 || tile_cols > hbp::kMaxTileCols)
    fail(std::string(who) + ": tile_cols must be in [1, 32768], got " + num(tile_cols));
  if (value_dtype == hbp::kF16) {
    if (x_dtype != hbp::kF16 && x_dtype != hbp::kBF16)
      fail(std::string(who) + ": fp16 values take fp16 (1) or bf16 (2) x, got dtype code " + num(x_dtype));
    if (y_dtype != hbp::kF32 && !(y_dtype == hbp::kF16 && x_dtype == hbp::kF16))
      fail(std::string(who) + ": fp16 values write fp32 (0) y, or fp16 (1) y for fp16 x; got " + num(y_dtype));
  } else if (value_dtype == hbp::kF32 || value_dtype == hbp::kF64) {
    if (x_dtype != value_dtype || y_dtype != value_dtype)
      fail(std::string(who) + ": fp32/fp64 values take x and y of the same dtype code (" +
           num(value_dtype) + "), got x " + num(x_dtype) + ", y " + num(y_dtype));
  } else {
    fail(std::string(who) + ": value_dtype must be 0 (fp32), 1 (fp16) or 3 (fp64), got " + num(value_dtype));
  }
  if (warps != 1 && warps != 2 && warps != 4 && warps != 8)
    fail(std::string(who) + ": warps must be 1, 2, 4 or 8, got " + num(warps));
  if (stage_cols < 0) fail(std::string(who) + ": stage_cols must be >= 0");
  check_strides(who, x_stride_c, x_stride_j, y_stride_r, y_stride_j);
  auto arr = [&](const char* key, std::uintptr_t align, bool required) -> std::uintptr_t {
    if (!arrays.contains(key)) {
      if (required) fail(std::string(who) + ": arrays has no '" + key + "'");
      return 0;
    }
    const auto p = arrays[key].cast<std::uintptr_t>();
    pointer(who, p, std::string("arrays['") + key + "']", align, required);
    return p;
  };
  const bool tiles = n_tiles > 0;
  hbp::DeviceArgs a;
  a.tile_order = reinterpret_cast<const int32_t*>(arr("tile_order", 4, tiles));
  a.tile_coords = reinterpret_cast<const int32_t*>(arr("tile_coords", 4, tiles));
  a.tile_group_ptr = reinterpret_cast<const int32_t*>(arr("tile_group_ptr", 4, tiles));
  a.tile_work = reinterpret_cast<const int64_t*>(arr("tile_work", 8, tiles));
  a.group_offset = reinterpret_cast<const int64_t*>(arr("group_offset", 8, tiles));
  a.group_rows = reinterpret_cast<const int32_t*>(arr("group_rows", 4, tiles));
  a.group_slot = reinterpret_cast<const int32_t*>(arr("group_slot", 4, tiles));
  a.cols = reinterpret_cast<const uint16_t*>(arr("cols", 2, tiles));
  a.values = reinterpret_cast<const void*>(arr("values", std::uintptr_t(dtype_bytes(value_dtype)), tiles));
  a.multi_rows = reinterpret_cast<const int32_t*>(arr("multi_rows", 4, n_multi > 0));
  a.multi_ptr = reinterpret_cast<const int64_t*>(arr("multi_ptr", 8, n_multi > 0));
  a.empty_rows = reinterpret_cast<const int32_t*>(arr("empty_rows", 4, n_empty > 0));
  a.x = pointer<const void>(who, x, "x_ptr", std::uintptr_t(dtype_bytes(x_dtype)), true);
  a.y = pointer(who, y, "y_ptr", std::uintptr_t(dtype_bytes(y_dtype)), true);
  const int acc_bytes = value_dtype == hbp::kF64 ? 8 : 4;
  a.partial = pointer(who, partial, "partial_ptr", std::uintptr_t(acc_bytes), n_slots > 0 && m > 0);
  a.counter = pointer<int32_t>(who, counter, "counter_ptr", 4, true);
  a.n_rows = n_rows, a.n_cols = n_cols, a.tile_cols = tile_cols, a.n_tiles = n_tiles;
  a.n_multi = n_multi, a.n_empty = n_empty, a.n_slots = n_slots, a.m = m;
  a.x_stride_c = x_stride_c, a.x_stride_j = x_stride_j;
  a.y_stride_r = y_stride_r, a.y_stride_j = y_stride_j;
  a.value_dtype = value_dtype, a.x_dtype = x_dtype, a.y_dtype = y_dtype;
  a.stage_cols = stage_cols, a.warps = warps;
#ifdef BITFUSE_WITH_CUDA
  const std::string err = cuda::hbp_spmm(a, stream);
  if (!err.empty()) throw std::runtime_error(err);
#else
  (void)stream;
  no_cuda();
#endif
}

void csr_spmm_cuda(std::uintptr_t indptr, std::uintptr_t indices, std::uintptr_t values,
                   std::uintptr_t x, std::uintptr_t y, int64_t n_rows, int64_t n_cols, int64_t m,
                   int64_t x_stride_c, int64_t x_stride_j, int64_t y_stride_r, int64_t y_stride_j,
                   int dtype, const std::string& kernel, std::uintptr_t stream) {
  const char* who = "bitfuse csr_spmm_cuda";
  if (n_rows < 0 || n_cols < 0 || m < 0) fail(std::string(who) + ": sizes must be >= 0");
  if (dtype != hbp::kF16 && dtype != hbp::kF32 && dtype != hbp::kF64)
    fail(std::string(who) + ": dtype must be 0 (fp32), 1 (fp16) or 3 (fp64), got " + num(dtype));
  if (kernel != "scalar" && kernel != "vector")
    fail(std::string(who) + ": kernel must be 'scalar' or 'vector', got '" + kernel + "'");
  check_strides(who, x_stride_c, x_stride_j, y_stride_r, y_stride_j);
  hbp::CsrArgs a;
  const auto b = std::uintptr_t(dtype_bytes(dtype));
  a.indptr = pointer<const int32_t>(who, indptr, "indptr_ptr", 4, true);
  a.indices = pointer<const int32_t>(who, indices, "indices_ptr", 4, false);
  a.values = pointer<const void>(who, values, "values_ptr", b, false);
  a.x = pointer<const void>(who, x, "x_ptr", b, true);
  a.y = pointer(who, y, "y_ptr", b, true);
  a.n_rows = n_rows, a.n_cols = n_cols, a.m = m;
  a.x_stride_c = x_stride_c, a.x_stride_j = x_stride_j;
  a.y_stride_r = y_stride_r, a.y_stride_j = y_stride_j;
  a.dtype = dtype;
  a.kernel = kernel == "scalar" ? hbp::kCsrScalar : hbp::kCsrVector;
#ifdef BITFUSE_WITH_CUDA
  const std::string err = cuda::csr_spmm(a, stream);
  if (!err.empty()) throw std::runtime_error(err);
#else
  (void)stream;
  no_cuda();
#endif
}

// CPU twin of the CSR kernels: the same per-row (scalar) or per-lane + butterfly (vector) sums.
template <typename V, typename Acc>
py::array_t<Acc> csr_host(const std::vector<int64_t>& ip, const int32_t* idx, const V* vals,
                          const py::array_t<Acc, py::array::c_style>& x, bool vector) {
  const int64_t n_rows = int64_t(ip.size()) - 1, m = x.shape(1);
  py::array_t<Acc> y({py::ssize_t(n_rows), py::ssize_t(m)});
  Acc* yp = y.mutable_data();
  const Acc* xp = x.data();
  py::gil_scoped_release nogil;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t j = 0; j < m; ++j) {
      const auto xat = [&](int32_t c, int) -> Acc { return xp[int64_t(c) * m + j]; };
      if (!vector) {
        Acc acc[1] = {Acc(0)};
        hbp::csr_row_dot<1>(idx, vals, ip[r], ip[r + 1], xat, acc);
        yp[r * m + j] = acc[0];
      } else {
        Acc lanes[hbp::kGroup];
        for (int l = 0; l < hbp::kGroup; ++l) {
          Acc acc[1] = {Acc(0)};
          hbp::csr_lane_dot<1>(idx, vals, ip[r], ip[r + 1], l, xat, acc);
          lanes[l] = acc[0];
        }
        yp[r * m + j] = hbp::butterfly_host(lanes);
      }
    }
  }
  return y;
}

py::array csr_spmm_host(const py::array& indptr_in, const py::array& indices_in,
                        const py::array& values_in, const py::array& x_in,
                        const std::string& kernel) {
  if (kernel != "scalar" && kernel != "vector")
    fail("bitfuse csr_spmm_host: kernel must be 'scalar' or 'vector', got '" + kernel + "'");
  const auto idx = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(indices_in);
  const auto ipa = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(indptr_in);
  if (!idx || !ipa || ipa.ndim() != 1 || ipa.size() < 1 || idx.ndim() != 1)
    fail("bitfuse csr_spmm_host: indptr and indices must be 1-D integer arrays");
  std::vector<int64_t> ip(ipa.data(), ipa.data() + ipa.size());
  const int64_t n_rows = int64_t(ip.size()) - 1;
  if (x_in.ndim() != 2) fail("bitfuse csr_spmm_host: x must be 2-D (n_cols, m)");
  const int64_t n_cols = x_in.shape(0);
  const auto vdt = values_in.dtype();
  if (vdt.kind() != 'f' || values_in.ndim() != 1 || values_in.size() != idx.size())
    fail("bitfuse csr_spmm_host: values must be a 1-D float array with one entry per index");
  if (ip[0] != 0 || ip[n_rows] != idx.size()) fail("bitfuse csr_spmm_host: indptr must run from 0 to nnz");
  for (int64_t r = 0; r < n_rows; ++r)
    if (ip[r + 1] < ip[r]) fail("bitfuse csr_spmm_host: indptr must be non-decreasing");
  for (py::ssize_t p = 0; p < idx.size(); ++p)
    if (idx.data()[p] < 0 || idx.data()[p] >= n_cols)
      fail("bitfuse csr_spmm_host: column index " + num(idx.data()[p]) + " out of range");
  const bool vec = kernel == "vector";
  const py::array vals = py::array::ensure(values_in, py::array::c_style);
  switch (vdt.itemsize()) {
    case 2:
    case 4: {
      const auto x = py::array_t<float, py::array::c_style>::ensure(x_in);
      if (!x || !x_in.dtype().is(py::dtype::of<float>()))
        throw py::type_error("bitfuse csr_spmm_host: x must be float32 for fp16/fp32 values");
      if (vdt.itemsize() == 2)
        return csr_host<hbp::Half, float>(ip, idx.data(), static_cast<const hbp::Half*>(vals.data()), x, vec);
      return csr_host<float, float>(ip, idx.data(), static_cast<const float*>(vals.data()), x, vec);
    }
    case 8: {
      const auto x = py::array_t<double, py::array::c_style>::ensure(x_in);
      if (!x || !x_in.dtype().is(py::dtype::of<double>()))
        throw py::type_error("bitfuse csr_spmm_host: x must be float64 for fp64 values");
      return csr_host<double, double>(ip, idx.data(), static_cast<const double*>(vals.data()), x, vec);
    }
  }
  throw py::type_error("bitfuse csr_spmm_host: values must be float16, float32 or float64");
}

}  // namespace

void register_hbp_kernel_ops(py::module_& m) {
  m.def("hbp_spmm_cuda", &hbp_spmm_cuda, py::arg("arrays"), py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("partial_ptr"), py::arg("counter_ptr"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("tile_cols"), py::arg("n_tiles"), py::arg("n_multi"), py::arg("n_empty"),
        py::arg("n_slots"), py::arg("m"), py::arg("x_stride_c"), py::arg("x_stride_j"),
        py::arg("y_stride_r"), py::arg("y_stride_j"), py::arg("value_dtype"), py::arg("x_dtype"),
        py::arg("y_dtype"), py::arg("stage_cols"), py::arg("warps"), py::arg("stream"),
        "HBP SpMV/SpMM on the GPU (csrc/cuda/hbp.cu). `arrays` maps layout names (tile_order, "
        "tile_coords, tile_group_ptr, tile_work, group_offset, group_rows, group_slot, cols, "
        "values, multi_rows, multi_ptr, empty_rows) to device addresses. x (c, j) at "
        "x_ptr[c·x_stride_c + j·x_stride_j], y (r, j) likewise; partial: n_slots·m fp32 (fp64 "
        "for fp64 values); counter: 2 int32, zero before the first call, zero again after each. "
        "Dtype codes 0 fp32, 1 fp16, 2 bf16, 3 fp64: fp16 values take fp16/bf16 x and write "
        "fp32 y (or fp16 for fp16 x); fp32 and fp64 all alike. Asynchronous on `stream`. "
        "RuntimeError when built without CUDA or when CUDA fails; ValueError for bad arguments.");
  m.def("csr_spmm_cuda", &csr_spmm_cuda, py::arg("indptr_ptr"), py::arg("indices_ptr"),
        py::arg("values_ptr"), py::arg("x_ptr"), py::arg("y_ptr"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("m"), py::arg("x_stride_c"), py::arg("x_stride_j"),
        py::arg("y_stride_r"), py::arg("y_stride_j"), py::arg("dtype"), py::arg("kernel"),
        py::arg("stream"),
        "CSR baseline on the GPU: 'scalar' (thread per row) or 'vector' (warp per row). int32 "
        "indptr/indices; values, x and y of one dtype code (0 fp32, 1 fp16, 3 fp64; fp16 "
        "accumulates in fp32). Indices are trusted. Asynchronous on `stream`.");
  m.def("csr_spmm_host", &csr_spmm_host, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("x"), py::arg("kernel"),
        "CPU twin of csr_spmm_cuda (same sums in the same order): x (n_cols, m) float32 for "
        "fp16/fp32 values, float64 for fp64; returns y (n_rows, m) in that dtype.");
}

}  // namespace host
}  // namespace bitfuse
