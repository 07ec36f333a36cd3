// Python bindings of the HBP host code (numpy in, numpy out; no torch). Every check here turns
// a bad argument into a ValueError/TypeError before any pointer is followed.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "bitfuse/hbp.h"
#include "bitfuse/hbp_kernel.h"
#include "checks.h"

namespace py = pybind11;

namespace bitfuse {
namespace host {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

std::string num(int64_t v) { return std::to_string(v); }

// A C-contiguous 1-D integer array of itemsize 4 or 8 (the only index types accepted).
py::array index_array(const py::array& a, const std::string& name) {
  const auto dt = a.dtype();
  if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8))
    throw py::type_error("bitfuse hbp: " + name + " must be an int32 or int64 array, got " +
                         std::string(py::str(dt)));
  if (a.ndim() != 1) fail("bitfuse hbp: " + name + " must be 1-D, got ndim=" + num(a.ndim()));
  return py::array::ensure(a, py::array::c_style);
}

int64_t at(const py::array& a, int64_t i) {
  return a.itemsize() == 4 ? int64_t(static_cast<const int32_t*>(a.data())[i])
                           : static_cast<const int64_t*>(a.data())[i];
}

void check_dims(int64_t n_rows, int64_t n_cols) {
  if (n_rows < 0 || n_cols < 0 || n_rows > kInt32Max || n_cols > kInt32Max)
    fail("bitfuse hbp: shape must be in [0, 2^31-1] x [0, 2^31-1], got (" + num(n_rows) + ", " +
         num(n_cols) + ")");
}

// Checks the CSR structure; returns indptr as int64 and whether columns are sorted and unique.
template <typename Idx>
bool check_csr(const std::vector<int64_t>& ip, const Idx* idx, int64_t nnz, int64_t n_rows,
               int64_t n_cols) {
  if (ip[0] != 0) fail("bitfuse hbp: indptr[0] must be 0, got " + num(ip[0]));
  if (ip[n_rows] != nnz)
    fail("bitfuse hbp: indptr[-1] = " + num(ip[n_rows]) + " but there are " + num(nnz) +
         " indices");
  if (nnz > kInt32Max) fail("bitfuse hbp: at most 2^31-1 nonzeros, got " + num(nnz));
  bool canonical = true;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (ip[r + 1] < ip[r])
      fail("bitfuse hbp: indptr must be non-decreasing, but indptr[" + num(r + 1) + "] = " +
           num(ip[r + 1]) + " < indptr[" + num(r) + "] = " + num(ip[r]));
    for (int64_t p = ip[r]; p < ip[r + 1]; ++p) {
      const int64_t c = int64_t(idx[p]);
      if (c < 0 || c >= n_cols)
        fail("bitfuse hbp: column index " + num(c) + " at position " + num(p) + " (row " +
             num(r) + ") is out of range for " + num(n_cols) + " columns");
      if (p > ip[r] && c <= int64_t(idx[p - 1])) canonical = false;
    }
  }
  return canonical;
}

std::vector<int64_t> read_indptr(const py::array& indptr_in, int64_t n_rows) {
  const py::array ip = index_array(indptr_in, "indptr");
  if (ip.shape(0) != n_rows + 1)
    fail("bitfuse hbp: indptr must have n_rows + 1 = " + num(n_rows + 1) + " entries, got " +
         num(ip.shape(0)));
  std::vector<int64_t> out(size_t(n_rows + 1));
  for (int64_t i = 0; i <= n_rows; ++i) out[i] = at(ip, i);
  return out;
}

// An index array's pointer and width, read while the GIL is held: py::array::itemsize() goes
// through its dtype object (reference counts), which must not happen with the GIL released.
struct IndexView {
  const void* data;
  bool wide;  // int64 indices (else int32)
};
inline IndexView index_view(const py::array& idx) { return IndexView{idx.data(), idx.itemsize() == 8}; }

template <typename F> auto with_indices(const IndexView& v, F&& f) {
  return v.wide ? f(static_cast<const int64_t*>(v.data)) : f(static_cast<const int32_t*>(v.data));
}
template <typename F> auto with_indices(const py::array& idx, F&& f) {  // with the GIL held
  return with_indices(index_view(idx), std::forward<F>(f));
}

template <typename T> py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(py::ssize_t(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

// None when (indptr, indices) is already canonical (sorted, unique columns per row); otherwise
// (indptr int64, indices int32, order int64, seg int64): canonical entry k is the sum of the
// input values at order[seg[k]:seg[k+1]] (duplicates summed, columns ascending).
py::object canonicalize(const py::array& indptr_in, const py::array& indices_in, int64_t n_rows,
                        int64_t n_cols) {
  check_dims(n_rows, n_cols);
  const auto ip = read_indptr(indptr_in, n_rows);
  const py::array idx = index_array(indices_in, "indices");
  const int64_t nnz = idx.shape(0);
  const bool ok = with_indices(idx, [&](auto p) { return check_csr(ip, p, nnz, n_rows, n_cols); });
  if (ok) return py::none();
  std::vector<int64_t> new_ip(size_t(n_rows + 1), 0), seg;
  std::vector<int64_t> order(static_cast<size_t>(nnz));
  std::vector<int32_t> new_idx;
  seg.reserve(size_t(nnz) + 1);
  new_idx.reserve(size_t(nnz));
  std::iota(order.begin(), order.end(), 0);
  for (int64_t r = 0; r < n_rows; ++r) {
    auto b = order.begin() + ip[r], e = order.begin() + ip[r + 1];
    // Positions ascending by column; stable, so duplicates keep their input order.
    std::stable_sort(b, e, [&](int64_t x, int64_t y) { return at(idx, x) < at(idx, y); });
    for (int64_t p = ip[r]; p < ip[r + 1]; ++p) {
      const int64_t c = at(idx, order[p]);
      if (p == ip[r] || c != int64_t(new_idx.back())) {
        seg.push_back(p);
        new_idx.push_back(int32_t(c));
      }
    }
    new_ip[r + 1] = int64_t(new_idx.size());
  }
  seg.push_back(nnz);
  return py::make_tuple(to_numpy(new_ip), to_numpy(new_idx), to_numpy(order), to_numpy(seg));
}

hbp::Method parse_method(const std::string& m) {
  if (m == "hash") return hbp::kHash;
  if (m == "sort") return hbp::kSort;
  if (m == "dp") return hbp::kDP;
  fail("bitfuse hbp: method must be 'hash', 'sort' or 'dp', got '" + m + "'");
}

py::dict build(const py::array& indptr_in, const py::array& indices_in, const py::array& values_in,
               int64_t n_rows, int64_t n_cols, int64_t tile_rows, int64_t tile_cols,
               int64_t smem_bytes, const std::string& method) {
  check_dims(n_rows, n_cols);
  const hbp::Method meth = parse_method(method);
  const auto dt = values_in.dtype();
  if (dt.kind() != 'f' || (dt.itemsize() != 2 && dt.itemsize() != 4 && dt.itemsize() != 8))
    throw py::type_error("bitfuse hbp: values must be float16, float32 or float64, got " +
                         std::string(py::str(dt)));
  const py::array values = py::array::ensure(values_in, py::array::c_style);
  const int vb = int(dt.itemsize());
  const auto ip = read_indptr(indptr_in, n_rows);
  const py::array idx = index_array(indices_in, "indices");
  const int64_t nnz = idx.shape(0);
  if (values.ndim() != 1 || values.shape(0) != nnz)
    fail("bitfuse hbp: values must be 1-D with one entry per index (" + num(nnz) + ")");
  const bool ok = with_indices(idx, [&](auto p) { return check_csr(ip, p, nnz, n_rows, n_cols); });
  if (!ok)
    fail("bitfuse hbp: column indices must be sorted and unique within each row; "
         "canonicalize first (HBPMatrix.from_csr does: duplicates are summed)");
  if (smem_bytes < 256) fail("bitfuse hbp: smem_bytes must be >= 256, got " + num(smem_bytes));
  if (tile_cols != 0 && (tile_cols < 1 || tile_cols > hbp::kMaxTileCols))
    fail("bitfuse hbp: tile_cols must be in [1, 32768], got " + num(tile_cols));
  hbp::TileShape ts = hbp::choose_tiles(n_rows, n_cols, nnz, vb, smem_bytes, tile_cols);
  if (tile_rows != 0) {
    if (tile_rows < 0 || tile_rows % hbp::kGroup || tile_rows > kInt32Max)
      fail("bitfuse hbp: tile_rows must be a positive multiple of 32, got " + num(tile_rows));
    ts.rows = tile_rows;
  }
  const IndexView iv = index_view(idx);
  if (tile_rows == 0) {  // the height from the tiles really occupied (hypersparse: taller)
    py::gil_scoped_release nogil;
    ts.rows = with_indices(iv, [&](auto p) { return hbp::tall_tile_rows(ip.data(), p, n_rows, ts); });
  }
  hbp::Layout L;
  {
    py::gil_scoped_release nogil;
    L = with_indices(iv, [&](auto p) { return hbp::build(ip.data(), p, n_rows, n_cols, ts, meth); });
  }
  // Gather the values into the interleaved order: raw bytes, padding = +0.0 in every format.
  py::array vals(dt, py::ssize_t(L.src.size()));
  {
    const char* in = static_cast<const char*>(values.data());
    char* out = static_cast<char*>(vals.mutable_data());
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < L.src.size(); ++i) {
      if (L.src[i] >= 0) std::memcpy(out + i * vb, in + L.src[i] * vb, size_t(vb));
      else std::memset(out + i * vb, 0, size_t(vb));
    }
  }
  const py::ssize_t n_groups = py::ssize_t(L.group_width.size());
  py::dict d;
  d["n_rows"] = L.n_rows;
  d["n_cols"] = L.n_cols;
  d["nnz"] = L.nnz;
  d["tile_rows"] = L.tile_rows;
  d["tile_cols"] = L.tile_cols;
  d["tile_coords"] = to_numpy(L.tile_coords).reshape({py::ssize_t(L.tile_work.size()), py::ssize_t(2)});
  d["tile_group_ptr"] = to_numpy(L.tile_group_ptr);
  d["tile_order"] = to_numpy(L.tile_order);
  d["tile_work"] = to_numpy(L.tile_work);
  d["group_offset"] = to_numpy(L.group_offset);
  d["group_width"] = to_numpy(L.group_width);
  d["group_rows"] = to_numpy(L.group_rows).reshape({n_groups, py::ssize_t(hbp::kGroup)});
  d["group_slot"] = to_numpy(L.group_slot).reshape({n_groups, py::ssize_t(hbp::kGroup)});
  d["cols"] = to_numpy(L.cols);
  d["values"] = vals;
  d["multi_rows"] = to_numpy(L.multi_rows);
  d["order_seconds"] = L.order_seconds;  // diagnostics (the preprocessing benchmark), not format
  d["multi_ptr"] = to_numpy(L.multi_ptr);
  d["empty_rows"] = to_numpy(L.empty_rows);
  return d;
}

// Fetches layout[key] as a C-contiguous array of exactly dtype T and `size` elements.
template <typename T>
py::array_t<T, py::array::c_style> field(const py::dict& d, const char* key, int64_t size) {
  if (!d.contains(key)) fail(std::string("bitfuse hbp: layout has no '") + key + "'");
  py::array a = py::reinterpret_borrow<py::array>(py::array::ensure(d[key]));
  if (!a || !a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string("bitfuse hbp: layout['") + key + "'] must be " +
                         std::string(py::str(py::dtype::of<T>())));
  if (size >= 0 && a.size() != size)
    fail(std::string("bitfuse hbp: layout['") + key + "'] must have " + num(size) +
         " elements, got " + num(a.size()));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

// A layout checked for the products: every index the CPU twin or the CUDA kernel follows stays
// inside its array (O(stored slots), once per product on the CPU, once per upload for CUDA).
struct Checked {
  int64_t n_rows, n_cols, tile_cols, n_tiles, n_groups, n_multi, n_slots, n_empty;
  py::array_t<int32_t, py::array::c_style> tc, tgp, tord, grows, gslot, mrows, empty;
  py::array_t<int64_t, py::array::c_style> goff, mptr, twork;
  py::array_t<uint16_t, py::array::c_style> cols;
  py::array vals;

  // The layout part of the kernel arguments, as host pointers (for the CPU twin).
  hbp::DeviceArgs args() const {
    hbp::DeviceArgs a;
    a.tile_order = tord.data(), a.tile_coords = tc.data(), a.tile_group_ptr = tgp.data();
    a.tile_work = twork.data(), a.group_offset = goff.data(), a.group_rows = grows.data();
    a.group_slot = gslot.data(), a.cols = cols.data(), a.values = vals.data();
    a.multi_rows = mrows.data(), a.multi_ptr = mptr.data(), a.empty_rows = empty.data();
    a.n_rows = n_rows, a.n_cols = n_cols, a.tile_cols = tile_cols, a.n_tiles = n_tiles;
    a.n_multi = n_multi, a.n_empty = n_empty, a.n_slots = n_slots;
    a.value_dtype = vals.itemsize() == 2 ? hbp::kF16 : vals.itemsize() == 4 ? hbp::kF32 : hbp::kF64;
    return a;
  }
};

Checked validate(const py::dict& d) {
  Checked c;
  c.n_rows = d["n_rows"].cast<int64_t>(), c.n_cols = d["n_cols"].cast<int64_t>();
  c.tile_cols = d["tile_cols"].cast<int64_t>();
  check_dims(c.n_rows, c.n_cols);
  if (c.tile_cols < 1 || c.tile_cols > hbp::kMaxTileCols) fail("bitfuse hbp: bad tile_cols");
  c.tgp = field<int32_t>(d, "tile_group_ptr", -1);
  c.n_tiles = c.tgp.size() - 1;
  if (c.n_tiles < 0) fail("bitfuse hbp: tile_group_ptr is empty");
  c.tc = field<int32_t>(d, "tile_coords", 2 * c.n_tiles);
  c.tord = field<int32_t>(d, "tile_order", c.n_tiles);
  c.twork = field<int64_t>(d, "tile_work", c.n_tiles);
  c.goff = field<int64_t>(d, "group_offset", -1);
  c.n_groups = c.goff.size() - 1;
  if (c.n_groups < 0) fail("bitfuse hbp: group_offset is empty");
  c.grows = field<int32_t>(d, "group_rows", hbp::kGroup * c.n_groups);
  c.gslot = field<int32_t>(d, "group_slot", hbp::kGroup * c.n_groups);
  const int64_t stored = c.goff.data()[c.n_groups];
  c.cols = field<uint16_t>(d, "cols", stored);
  c.mrows = field<int32_t>(d, "multi_rows", -1);
  c.n_multi = c.mrows.size();
  c.mptr = field<int64_t>(d, "multi_ptr", c.n_multi + 1);
  c.n_slots = c.mptr.data()[c.n_multi];
  c.empty = field<int32_t>(d, "empty_rows", -1);
  c.n_empty = c.empty.size();
  const int32_t* tgp = c.tgp.data();
  const int64_t* goff = c.goff.data();
  std::vector<char> seen(size_t(c.n_tiles), 0);
  for (int64_t i = 0; i < c.n_tiles; ++i) {
    const int64_t t = c.tord.data()[i];
    if (t < 0 || t >= c.n_tiles || seen[size_t(t)]++)
      fail("bitfuse hbp: corrupt layout (tile_order is not a permutation of the tiles)");
  }
  if (goff[0] != 0) fail("bitfuse hbp: corrupt layout (group_offset[0] != 0)");
  for (int64_t t = 0; t < c.n_tiles; ++t) {
    const int64_t ct = c.tc.data()[2 * t + 1];
    if (tgp[t] < 0 || tgp[t + 1] < tgp[t] || tgp[t + 1] > c.n_groups || ct < 0 ||
        ct * c.tile_cols >= c.n_cols)
      fail("bitfuse hbp: corrupt layout (tile " + num(t) + ")");
    const int64_t width = hbp::tile_width(ct * c.tile_cols, c.tile_cols, c.n_cols);
    for (int64_t g = tgp[t]; g < tgp[t + 1]; ++g) {
      if (goff[g] < 0 || goff[g + 1] < goff[g] || goff[g] % hbp::kGroup || goff[g + 1] % hbp::kGroup ||
          goff[g + 1] > stored)
        fail("bitfuse hbp: corrupt layout (group_offset " + num(g) + ")");
      for (int64_t e = goff[g]; e < goff[g + 1]; ++e) {
        const uint16_t col = c.cols.data()[e];
        if (col != hbp::kPadCol && int64_t(col) >= width)
          fail("bitfuse hbp: corrupt layout (column " + num(col) + " outside its tile of width " +
               num(width) + ")");
      }
    }
  }
  for (int64_t g = 0; g < c.n_groups; ++g) {
    for (int l = 0; l < hbp::kGroup; ++l) {
      const int64_t r = c.grows.data()[g * hbp::kGroup + l], s = c.gslot.data()[g * hbp::kGroup + l];
      if (r < -1 || r >= c.n_rows || s < -1 || s >= c.n_slots)
        fail("bitfuse hbp: corrupt layout (group " + num(g) + ")");
    }
  }
  for (int64_t i = 0; i < c.n_multi; ++i)
    if (c.mrows.data()[i] < 0 || c.mrows.data()[i] >= c.n_rows || c.mptr.data()[i] < 0 ||
        c.mptr.data()[i + 1] < c.mptr.data()[i])
      fail("bitfuse hbp: corrupt layout (multi row " + num(i) + ")");
  if (c.mptr.data()[0] != 0) fail("bitfuse hbp: corrupt layout (multi_ptr[0] != 0)");
  for (int64_t i = 0; i < c.n_empty; ++i)
    if (c.empty.data()[i] < 0 || c.empty.data()[i] >= c.n_rows)
      fail("bitfuse hbp: corrupt layout (empty_rows " + num(i) + ")");
  c.vals = py::reinterpret_borrow<py::array>(py::array::ensure(d["values"]));
  if (!c.vals || c.vals.size() != stored || c.vals.dtype().kind() != 'f' || c.vals.itemsize() == 16)
    fail("bitfuse hbp: layout['values'] must be a float16/32/64 array of " + num(stored) + " elements");
  c.vals = py::array::ensure(c.vals, py::array::c_style);
  return c;
}

template <typename Acc>
py::array_t<Acc> run_spmm(const Checked& c, const py::array& x_in, int64_t programs, int mt) {
  if (x_in.ndim() != 2 || x_in.shape(0) != c.n_cols)
    fail("bitfuse hbp: x must have shape (" + num(c.n_cols) + ", m), got ndim=" + num(x_in.ndim()));
  if (!x_in.dtype().is(py::dtype::of<Acc>()))
    throw py::type_error("bitfuse hbp: x must be " + std::string(py::str(py::dtype::of<Acc>())) +
                         " for these values, got " + std::string(py::str(x_in.dtype())));
  const auto x = py::array_t<Acc, py::array::c_style>::ensure(x_in);
  const int64_t m = x.shape(1);
  py::array_t<Acc> y({py::ssize_t(c.n_rows), py::ssize_t(m)});
  Acc* yp = y.mutable_data();
  // Poison: the product must write every element itself (empty rows included), as on the GPU.
  std::fill(yp, yp + c.n_rows * m, std::numeric_limits<Acc>::quiet_NaN());
  std::vector<Acc> partial(size_t(std::max<int64_t>(1, c.n_slots * m)));
  hbp::DeviceArgs a = c.args();
  a.x = x.data(), a.x_stride_c = m, a.x_stride_j = 1;
  a.y = yp, a.y_stride_r = m, a.y_stride_j = 1;
  a.partial = partial.data(), a.m = m;
  a.x_dtype = a.y_dtype = sizeof(Acc) == 8 ? hbp::kF64 : hbp::kF32;  // fp16 values: fp32 x (exact)
  a.stage_cols = c.tile_cols;  // stage wherever it pays, as the GPU would with enough memory
  py::gil_scoped_release nogil;
  hbp::kernel_twin(a, programs, 8, mt);
  return y;
}

py::array spmm(const py::dict& d, const py::array& x, int64_t programs, int mt) {
  if (programs < 1) fail("bitfuse hbp: programs must be >= 1, got " + num(programs));
  if (mt != 0 && mt != 1 && mt != 8) fail("bitfuse hbp: mt must be 0 (auto), 1 or 8, got " + num(mt));
  const Checked c = validate(d);
  if (mt == 0) mt = x.ndim() == 2 && x.shape(1) == 1 ? 1 : 8;  // as the GPU launcher picks
  if (c.vals.itemsize() == 8) return run_spmm<double>(c, x, programs, mt);
  return run_spmm<float>(c, x, programs, mt);
}

int code_bytes(int code) { return code == hbp::kF64 ? 8 : code == hbp::kF32 ? 4 : 2; }

// The twin with the GPU's exact arguments: raw x and y buffers (1-D numpy arrays of the dtype
// codes' item sizes: fp16/bf16 as 2-byte items), element strides, launch choices.
void spmm_twin(const py::dict& d, const py::array& x, int x_dtype, int64_t x_stride_c,
               int64_t x_stride_j, py::array y, int y_dtype, int64_t y_stride_r,
               int64_t y_stride_j, int64_t m, int64_t programs, int warps, int64_t stage_cols,
               int mt) {
  const Checked c = validate(d);
  const char* who = "bitfuse hbp_spmm_twin";
  if (m < 0 || x_stride_c < 0 || x_stride_j < 0 || y_stride_r < 0 || y_stride_j < 0 || stage_cols < 0)
    fail(std::string(who) + ": m, strides and stage_cols must be >= 0");
  if (x_dtype < 0 || x_dtype > 3 || y_dtype < 0 || y_dtype > 3) fail(std::string(who) + ": bad dtype code");
  if (x.ndim() != 1 || !(x.flags() & py::array::c_style) || x.itemsize() != code_bytes(x_dtype))
    fail(std::string(who) + ": x must be a contiguous 1-D buffer of " + num(code_bytes(x_dtype)) + "-byte items");
  if (y.ndim() != 1 || !(y.flags() & py::array::c_style) || !y.writeable() || y.itemsize() != code_bytes(y_dtype))
    fail(std::string(who) + ": y must be a writeable contiguous 1-D buffer of " + num(code_bytes(y_dtype)) + "-byte items");
  if (m > 0 && c.n_cols > 0 && (c.n_cols - 1) * x_stride_c + (m - 1) * x_stride_j >= x.size())
    fail(std::string(who) + ": x is too small for these strides");
  if (m > 0 && c.n_rows > 0 && (c.n_rows - 1) * y_stride_r + (m - 1) * y_stride_j >= y.size())
    fail(std::string(who) + ": y is too small for these strides");
  const int acc = c.vals.itemsize() == 8 ? 8 : 4;
  std::vector<char> partial(size_t(std::max<int64_t>(1, c.n_slots * m) * acc));
  hbp::DeviceArgs a = c.args();
  a.x = x.data(), a.x_stride_c = x_stride_c, a.x_stride_j = x_stride_j, a.x_dtype = x_dtype;
  a.y = y.mutable_data(), a.y_stride_r = y_stride_r, a.y_stride_j = y_stride_j, a.y_dtype = y_dtype;
  a.partial = partial.data(), a.m = m, a.stage_cols = stage_cols;
  if (a.value_dtype == hbp::kF16 ? !(y_dtype == hbp::kF32 || (y_dtype == hbp::kF16 && x_dtype == hbp::kF16))
                                 : y_dtype != a.value_dtype)
    fail(std::string(who) + ": y dtype code " + num(y_dtype) + " does not go with these values");
  py::gil_scoped_release nogil;
  hbp::kernel_twin(a, programs, warps, mt);
}

}  // namespace

void register_hbp_ops(py::module_& m) {
  m.def("hbp_tile_shape",
        [](int64_t n_rows, int64_t n_cols, int64_t nnz, int value_bytes, int64_t smem_bytes) {
          const auto t = hbp::choose_tiles(n_rows, n_cols, nnz, value_bytes, smem_bytes);
          return py::make_tuple(t.rows, t.cols);
        },
        py::arg("n_rows"), py::arg("n_cols"), py::arg("nnz"), py::arg("value_bytes"),
        py::arg("smem_bytes"), "(tile_rows, tile_cols) from the shape alone (docs/HBP.md §1); the build "
        "may make hypersparse matrices' tiles taller after counting the tiles occupied.");
  m.def("hbp_canonicalize", &canonicalize, py::arg("indptr"), py::arg("indices"),
        py::arg("n_rows"), py::arg("n_cols"),
        "Validate a CSR structure. None if columns are sorted and unique per row, else "
        "(indptr, indices, order, seg) describing the sorted, duplicate-summed form.");
  m.def("hbp_build", &build, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("n_rows"), py::arg("n_cols"), py::arg("tile_rows") = 0, py::arg("tile_cols") = 0,
        py::arg("smem_bytes") = 48 * 1024, py::arg("method") = "hash",
        "Build the HBP layout (dict of numpy arrays, docs/HBP.md) from a canonical CSR.");
  m.def("hbp_spmm", &spmm, py::arg("layout"), py::arg("x"), py::arg("programs") = 1,
        py::arg("mt") = 0,
        "y (n_rows, m) = A @ x for x (n_cols, m): float32 x for fp16/fp32 values, float64 for "
        "fp64. CPU twin of the CUDA kernel (same schedule over `programs` programs, `mt` = 1 or 8 "
        "right-hand sides per work item, 0 = as the GPU picks: 1 for one column, else 8): serial, deterministic, and "
        "bit-identical to the GPU result whatever programs and mt.");
  m.def("hbp_spmm_twin", &spmm_twin, py::arg("layout"), py::arg("x"), py::arg("x_dtype"),
        py::arg("x_stride_c"), py::arg("x_stride_j"), py::arg("y"), py::arg("y_dtype"),
        py::arg("y_stride_r"), py::arg("y_stride_j"), py::arg("m"), py::arg("programs"),
        py::arg("warps"), py::arg("stage_cols"), py::arg("mt"),
        "The CPU twin of hbp_spmm_cuda with the GPU's arguments: x and y raw 1-D buffers "
        "(fp16/bf16 as uint16), dtype codes and element strides as there, `programs` blocks of "
        "`warps` warps, x staged for tiles up to stage_cols wide, mt = 1 or 8 right-hand sides "
        "per item. Writes y in place.");
  m.def("hbp_float_to_half",
        [](const py::array_t<float, py::array::c_style | py::array::forcecast>& f) {
          py::array_t<uint16_t> out(f.size());
          for (py::ssize_t i = 0; i < f.size(); ++i) out.mutable_data()[i] = hbp::float_to_half_bits(f.data()[i]);
          return out;
        },
        py::arg("values"), "fp16 bits of float32 values as the kernels' y store rounds them (RNE).");
  m.def("hbp_validate", [](const py::dict& d) { validate(d); }, py::arg("layout"),
        "Check that every index of a layout stays inside its array (ValueError naming the "
        "problem); HBPMatrix runs it before a layout goes to a GPU, where nothing is checked.");
  m.def("hbp_schedule",
        [](int64_t n_items, int64_t programs) {
          if (n_items < 0 || programs < 1) fail("bitfuse hbp: need n_items >= 0 and programs >= 1");
          const auto s = hbp::make_schedule(n_items, programs);
          return py::make_tuple(s.per, s.first_dynamic);
        },
        py::arg("n_items"), py::arg("programs"),
        "(static items per program, first item handed out by the counter): the persistent "
        "schedule of the CUDA kernel and the CPU twin (bitfuse/hbp.h make_schedule).");
  m.def("hbp_static_item", &hbp::static_item, py::arg("program"), py::arg("k"),
        py::arg("programs"), "Item taken by `program` at its k-th static step.");
  m.def("hbp_stage_pays", &hbp::stage_pays, py::arg("tile_slots"), py::arg("width"),
        py::arg("mt"), py::arg("smem_elems"),
        "Whether the CUDA kernel stages a tile's x slice in shared memory (bitfuse/hbp.h).");
}

}  // namespace host
}  // namespace bitfuse
