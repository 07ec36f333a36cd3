// Host (CPU) functions on numpy arrays: the index math of bitfuse/format.h exposed for the tests,
// and dequantize_host, the CPU twin of the CUDA dequantize kernel (same DequantArgs, same
// row_view / dequant_element, only the loop differs).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bitfuse/format.h"
#include "checks.h"

namespace py = pybind11;

namespace bitfuse {
namespace host {
namespace {

std::string dtype_str(const py::array& a) { return std::string(py::str(a.dtype())); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous int32 view of `a`. int32 and uint32 (same bits) are accepted, nothing else:
// a silent cast from int64 or float could hide a caller bug.
py::array_t<int32_t> as_int32(const py::array& a, const std::string& name) {
  const auto dt = a.dtype();
  if ((dt.kind() != 'i' && dt.kind() != 'u') || dt.itemsize() != 4)
    fail("bitfuse: " + name + " must be an int32 array, got " + dtype_str(a));
  return py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

// A C-contiguous float16 array; its elements are read as raw fp16 bits (uint16_t).
py::array as_half(const py::array& a, const std::string& name) {
  if (a.dtype().kind() != 'f' || a.dtype().itemsize() != 2)
    fail("bitfuse: " + name + " must be a float16 array, got " + dtype_str(a));
  return py::array::ensure(a, py::array::c_style);
}

py::array as_uint8(const py::array& a, const std::string& name) {
  if (a.dtype().kind() != 'u' || a.dtype().itemsize() != 1)
    fail("bitfuse: " + name + " must be a uint8 array (compact codes), got " + dtype_str(a));
  return py::array::ensure(a, py::array::c_style);
}

void check_shape(const py::array& a, const std::string& name, std::vector<py::ssize_t> shape) {
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    want += shape.size() == 1 ? ",)" : ")";
    fail("bitfuse: " + name + " must have shape " + want + ", got " + shape_str(a));
  }
}

template <typename T> const T* data_of(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// words: (rows, words_per_row) int32 -> (rows, k_pad) uint8 codes, via extract_code.
py::array_t<uint8_t> unpack_codes(const py::array& words_in, int bits, int k_pad) {
  check_bits(bits);
  check_k_pad(k_pad);
  const auto words = as_int32(words_in, "words");
  const int wpr = words_per_row(bits, k_pad);
  if (words.ndim() != 2 || words.shape(1) != wpr)
    fail("bitfuse: " + std::to_string(bits) + "-bit words for k_pad=" + std::to_string(k_pad) +
         " must have shape (rows, " + std::to_string(wpr) + "), got " + shape_str(words));
  const py::ssize_t rows = words.shape(0);
  py::array_t<uint8_t> out({rows, py::ssize_t(k_pad)});
  const uint32_t* w = data_of<uint32_t>(words);
  uint8_t* o = out.mutable_data();
  for (py::ssize_t r = 0; r < rows; ++r)
    for (int k = 0; k < k_pad; ++k)
      o[r * k_pad + k] = uint8_t(extract_code(w + r * wpr, bits, k));
  return out;
}

// words: (rows, k_pad/32) int32 1-bit plane -> (rows, k_pad) bool, via sign_bit.
py::array_t<bool> unpack_signs(const py::array& words_in, int k_pad) {
  check_k_pad(k_pad);
  const auto words = as_int32(words_in, "words");
  const int wpr = k_pad / kWordBits;
  if (words.ndim() != 2 || words.shape(1) != wpr)
    fail("bitfuse: a sign plane for k_pad=" + std::to_string(k_pad) +
         " must have shape (rows, " + std::to_string(wpr) + "), got " + shape_str(words));
  const py::ssize_t rows = words.shape(0);
  py::array_t<bool> out({rows, py::ssize_t(k_pad)});
  const uint32_t* w = data_of<uint32_t>(words);
  bool* o = out.mutable_data();
  for (py::ssize_t r = 0; r < rows; ++r)
    for (int k = 0; k < k_pad; ++k) o[r * k_pad + k] = sign_bit(w + r * wpr, k) != 0;
  return out;
}

// Start word of every class plus the total at the end, like pack.class_word_offsets.
std::vector<int64_t> class_word_offsets(const std::vector<int>& class_bits,
                                        const std::vector<int>& class_rows, int k_pad) {
  check_k_pad(k_pad);
  if (class_bits.size() != class_rows.size())
    fail("bitfuse: class_bits " + list_str(class_bits) + " and class_rows " +
         list_str(class_rows) + " differ in length");
  for (size_t c = 0; c < class_bits.size(); ++c) {
    check_bits(class_bits[c]);
    if (class_rows[c] < 0) fail("bitfuse: class_rows must be >= 0, got " + list_str(class_rows));
  }
  std::vector<int64_t> offs;
  for (size_t c = 0; c <= class_bits.size(); ++c)
    offs.push_back(class_word_offset(class_bits.data(), class_rows.data(), int(c), k_pad));
  return offs;
}

// CPU reference of dequantize_cuda: (n, k) float32 in original row order, residual included.
py::array_t<float> dequantize_host(const py::array& qweight_in, const py::array& scales_in,
                                   const py::array& zeros_in, std::optional<py::array> perm_in,
                                   std::optional<py::array> res_index_in,
                                   std::optional<py::array> res_plane_in,
                                   std::optional<py::array> res_alpha_in,
                                   const std::vector<int>& class_bits,
                                   const std::vector<int>& class_rows, int n, int k, int k_pad,
                                   int group_size, std::optional<py::array> scale_rows_in) {
  DequantArgs a{};
  a.classes = make_class_table(class_bits, class_rows, n, k, k_pad, group_size);
  a.n = n;
  a.k = k;
  a.k_pad = k_pad;
  a.group_size = group_size;
  const py::ssize_t G = k_pad / group_size;

  // Keep the converted arrays alive for the whole loop.
  const auto qweight = as_int32(qweight_in, "qweight");
  const int64_t total =
      class_word_offset(class_bits.data(), class_rows.data(), int(class_bits.size()), k_pad);
  check_shape(qweight, "qweight", {py::ssize_t(total)});
  // fp16 pairs, or (with scale_rows) compact codes (FORMAT.md §5.1).
  const bool compact = bool(scale_rows_in);
  const auto scales = compact ? as_uint8(scales_in, "scales") : as_half(scales_in, "scales");
  const auto zeros = compact ? as_uint8(zeros_in, "zeros") : as_half(zeros_in, "zeros");
  check_shape(scales, "scales", {n, G});
  check_shape(zeros, "zeros", {n, G});
  py::array scale_rows;
  a.qweight = data_of<uint32_t>(qweight);
  if (compact) {
    scale_rows = as_half(*scale_rows_in, "scale_rows");
    check_shape(scale_rows, "scale_rows", {n, 3});
  }
  set_scale_pointers(a, scales.data(), zeros.data(), compact ? scale_rows.data() : nullptr);

  py::array_t<int32_t> perm;
  if (perm_in) {
    perm = as_int32(*perm_in, "perm");
    check_shape(perm, "perm", {n});
    std::vector<bool> seen(size_t(n), false);
    for (int i = 0; i < n; ++i) {
      const int p = perm.data()[i];
      if (p < 0 || p >= n || seen[size_t(p)])
        fail("bitfuse: perm must be a permutation of range(" + std::to_string(n) + ")");
      seen[size_t(p)] = true;
    }
    a.perm = perm.data();
  }

  py::array_t<int32_t> res_index, res_plane;
  py::array res_alpha;
  const int n_res_given = int(bool(res_index_in)) + int(bool(res_plane_in)) + int(bool(res_alpha_in));
  if (n_res_given != 0 && n_res_given != 3)
    fail("bitfuse: res_index, res_plane and res_alpha are given together or not at all");
  if (n_res_given == 3) {
    res_index = as_int32(*res_index_in, "res_index");
    res_plane = as_int32(*res_plane_in, "res_plane");
    res_alpha = as_half(*res_alpha_in, "res_alpha");
    check_shape(res_index, "res_index", {n});
    if (res_plane.ndim() != 2) fail("bitfuse: res_plane must be 2-D, got " + shape_str(res_plane));
    const py::ssize_t nr = res_plane.shape(0);
    check_shape(res_plane, "res_plane", {nr, k_pad / kWordBits});
    check_shape(res_alpha, "res_alpha", {nr, G});
    for (int i = 0; i < n; ++i) {
      const int r = res_index.data()[i];
      if (r < -1 || r >= nr)
        fail("bitfuse: res_index values must be -1 or a residual row in [0, " +
             std::to_string(nr) + "), got " + std::to_string(r));
    }
    a.res_index = res_index.data();
    a.res_plane = data_of<uint32_t>(res_plane);
    a.res_alpha = data_of<uint16_t>(res_alpha);
  }

  py::array_t<float> out({py::ssize_t(n), py::ssize_t(k)});
  float* o = out.mutable_data();
  // The same per-row / per-element logic as the CUDA kernel, as a plain loop.
  for (int row = 0; row < n; ++row) {
    const RowView r = row_view(a, row);
    float* dst = o + int64_t(r.out_row) * k;
    for (int kk = 0; kk < k; ++kk) dst[kk] = dequant_element(r, kk, group_size);
  }
  return out;
}

}  // namespace

void register_host_ops(py::module_& m) {
  m.def("unpack_codes", &unpack_codes, py::arg("words"), py::arg("bits"), py::arg("k_pad"),
        "(rows, words_per_row) int32 packed codes -> (rows, k_pad) uint8, using format.h's "
        "extract_code (tests compare it with bitfuse.pack.unpack_codes).");
  m.def("unpack_signs", &unpack_signs, py::arg("words"), py::arg("k_pad"),
        "(rows, k_pad/32) int32 1-bit plane -> (rows, k_pad) bool, using format.h's sign_bit.");
  m.def("class_word_offsets", &class_word_offsets, py::arg("class_bits"), py::arg("class_rows"),
        py::arg("k_pad"),
        "Start word of each bit class in the flat qweight buffer, plus the total at the end.");
  m.def("dequantize_host", &dequantize_host, py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("perm"), py::arg("res_index"), py::arg("res_plane"),
        py::arg("res_alpha"), py::arg("class_bits"), py::arg("class_rows"), py::arg("n"),
        py::arg("k"), py::arg("k_pad"), py::arg("group_size"), py::arg("scale_rows") = py::none(),
        "CPU twin of dequantize_cuda on numpy arrays: qweight int32 flat, scales/zeros float16 "
        "(n, G) (or uint8 compact codes with scale_rows float16 (n, 3), FORMAT.md §5.1), perm int32 (n) or None, res_index int32 (n) / res_plane int32 (Nr, k_pad/32) / "
        "res_alpha float16 (Nr, G) or all None. Returns the (n, k) float32 weight in original "
        "row order, residual included.");
}

}  // namespace host
}  // namespace bitfuse
