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

template <typename F> auto with_indices(const py::array& idx, F&& f) {
  return idx.itemsize() == 4 ? f(static_cast<const int32_t*>(idx.data()))
                             : f(static_cast<const int64_t*>(idx.data()));
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
  hbp::TileShape ts = hbp::choose_tiles(n_rows, n_cols, nnz, vb, smem_bytes);
  if (tile_rows != 0) {
    if (tile_rows < 0 || tile_rows % hbp::kGroup || tile_rows > kInt32Max)
      fail("bitfuse hbp: tile_rows must be a positive multiple of 32, got " + num(tile_rows));
    ts.rows = tile_rows;
  }
  if (tile_cols != 0) {
    if (tile_cols < 1 || tile_cols > hbp::kMaxTileCols)
      fail("bitfuse hbp: tile_cols must be in [1, 32768], got " + num(tile_cols));
    ts.cols = tile_cols;
  }
  hbp::Layout L;
  {
    py::gil_scoped_release nogil;
    L = with_indices(idx, [&](auto p) { return hbp::build(ip.data(), p, n_rows, n_cols, ts, meth); });
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
  d["multi_ptr"] = to_numpy(L.multi_ptr);
  return d;
}

// Fetches layout[key] as a C-contiguous array of exactly dtype T and `size` elements.
template <typename T>
py::array_t<T> field(const py::dict& d, const char* key, int64_t size) {
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

template <typename T> const T* ptr(const py::array_t<T, py::array::c_style>& a) { return a.data(); }

template <typename V, typename Acc>
py::array_t<Acc> run_spmm(hbp::View<V> v, const py::array& x_in) {
  if (x_in.ndim() != 2 || x_in.shape(0) != v.n_cols)
    fail("bitfuse hbp: x must have shape (" + num(v.n_cols) + ", m), got ndim=" + num(x_in.ndim()));
  if (!x_in.dtype().is(py::dtype::of<Acc>()))
    throw py::type_error("bitfuse hbp: x must be " + std::string(py::str(py::dtype::of<Acc>())) +
                         " for these values, got " + std::string(py::str(x_in.dtype())));
  const auto x = py::array_t<Acc, py::array::c_style>::ensure(x_in);
  const int64_t m = x.shape(1);
  py::array_t<Acc> y({py::ssize_t(v.n_rows), py::ssize_t(m)});
  std::vector<Acc> partial(size_t(v.n_slots * m));
  Acc* yp = y.mutable_data();
  py::gil_scoped_release nogil;
  hbp::spmm_host<V, Acc>(v, x.data(), m, yp, partial.data());
  return y;
}

// Structural checks over tiles, groups and partial rows (O(groups), not O(nnz)): after them no
// index the product follows can leave its array. Columns are checked in the loop.
py::array spmm(const py::dict& d, const py::array& x) {
  const int64_t n_rows = d["n_rows"].cast<int64_t>(), n_cols = d["n_cols"].cast<int64_t>();
  const int64_t tile_cols = d["tile_cols"].cast<int64_t>();
  check_dims(n_rows, n_cols);
  if (tile_cols < 1 || tile_cols > hbp::kMaxTileCols) fail("bitfuse hbp: bad tile_cols");
  const auto tgp = field<int32_t>(d, "tile_group_ptr", -1);
  const int64_t n_tiles = tgp.size() - 1;
  if (n_tiles < 0) fail("bitfuse hbp: tile_group_ptr is empty");
  const auto tc = field<int32_t>(d, "tile_coords", 2 * n_tiles);
  const auto goff = field<int64_t>(d, "group_offset", -1);
  const int64_t n_groups = goff.size() - 1;
  if (n_groups < 0) fail("bitfuse hbp: group_offset is empty");
  const auto grows = field<int32_t>(d, "group_rows", hbp::kGroup * n_groups);
  const auto gslot = field<int32_t>(d, "group_slot", hbp::kGroup * n_groups);
  const int64_t stored = goff.data()[n_groups];
  const auto cols = field<uint16_t>(d, "cols", stored);
  const auto mrows = field<int32_t>(d, "multi_rows", -1);
  const auto mptr = field<int64_t>(d, "multi_ptr", mrows.size() + 1);
  const int64_t n_slots = mptr.data()[mrows.size()];
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t ct = tc.data()[2 * t + 1];
    if (tgp.data()[t] < 0 || tgp.data()[t + 1] < tgp.data()[t] || tgp.data()[t + 1] > n_groups ||
        ct < 0 || ct * tile_cols >= n_cols)
      fail("bitfuse hbp: corrupt layout (tile " + num(t) + ")");
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    if (goff.data()[g] < 0 || goff.data()[g + 1] < goff.data()[g] || goff.data()[g] % hbp::kGroup)
      fail("bitfuse hbp: corrupt layout (group_offset " + num(g) + ")");
    for (int l = 0; l < hbp::kGroup; ++l) {
      const int64_t r = grows.data()[g * hbp::kGroup + l], s = gslot.data()[g * hbp::kGroup + l];
      if (r < -1 || r >= n_rows || s < -1 || s >= n_slots)
        fail("bitfuse hbp: corrupt layout (group " + num(g) + ")");
    }
  }
  for (py::ssize_t i = 0; i < mrows.size(); ++i)
    if (mrows.data()[i] < 0 || mrows.data()[i] >= n_rows || mptr.data()[i] < 0 ||
        mptr.data()[i + 1] < mptr.data()[i])
      fail("bitfuse hbp: corrupt layout (multi row " + num(i) + ")");
  if (mptr.data()[0] != 0) fail("bitfuse hbp: corrupt layout (multi_ptr[0] != 0)");

  const py::array vals = py::reinterpret_borrow<py::array>(py::array::ensure(d["values"]));
  if (!vals || vals.size() != stored || vals.dtype().kind() != 'f')
    fail("bitfuse hbp: layout['values'] must be a float array of " + num(stored) + " elements");
  auto view = [&](auto* values) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(values)>>;
    return hbp::View<V>{n_rows, n_cols, tile_cols, n_tiles, n_groups, int64_t(mrows.size()),
                        n_slots, tc.data(), tgp.data(), goff.data(), grows.data(), gslot.data(),
                        cols.data(), values, mrows.data(), mptr.data()};
  };
  const py::array v = py::array::ensure(vals, py::array::c_style);
  switch (v.itemsize()) {
    case 2: return run_spmm<uint16_t, float>(view(static_cast<const uint16_t*>(v.data())), x);
    case 4: return run_spmm<float, float>(view(static_cast<const float*>(v.data())), x);
    case 8: return run_spmm<double, double>(view(static_cast<const double*>(v.data())), x);
  }
  fail("bitfuse hbp: values must be float16, float32 or float64");
}

}  // namespace

void register_hbp_ops(py::module_& m) {
  m.def("hbp_tile_shape",
        [](int64_t n_rows, int64_t n_cols, int64_t nnz, int value_bytes, int64_t smem_bytes) {
          const auto t = hbp::choose_tiles(n_rows, n_cols, nnz, value_bytes, smem_bytes);
          return py::make_tuple(t.rows, t.cols);
        },
        py::arg("n_rows"), py::arg("n_cols"), py::arg("nnz"), py::arg("value_bytes"),
        py::arg("smem_bytes"), "(tile_rows, tile_cols) the HBP build picks (docs/HBP.md §1).");
  m.def("hbp_canonicalize", &canonicalize, py::arg("indptr"), py::arg("indices"),
        py::arg("n_rows"), py::arg("n_cols"),
        "Validate a CSR structure. None if columns are sorted and unique per row, else "
        "(indptr, indices, order, seg) describing the sorted, duplicate-summed form.");
  m.def("hbp_build", &build, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("n_rows"), py::arg("n_cols"), py::arg("tile_rows") = 0, py::arg("tile_cols") = 0,
        py::arg("smem_bytes") = 48 * 1024, py::arg("method") = "hash",
        "Build the HBP layout (dict of numpy arrays, docs/HBP.md) from a canonical CSR.");
  m.def("hbp_spmm", &spmm, py::arg("layout"), py::arg("x"),
        "y (n_rows, m) = A @ x for x (n_cols, m): float32 x for fp16/fp32 values, float64 for "
        "fp64. CPU, serial, deterministic.");
}

}  // namespace host
}  // namespace bitfuse
