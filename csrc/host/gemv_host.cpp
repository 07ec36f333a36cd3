// Host (CPU) side of the CUDA GEMV: the bit math of bitfuse/dequant_tricks.h exposed for the
// tests, and gemv_host, the CPU twin of csrc/cuda/gemv.cu: the same Args, the same
// run_dequant per 32-code run and the same epilogue; only the loop order and the accumulation
// order differ (the kernel's split-K sums partials in a fixed tree).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bitfuse/dequant_tricks.h"
#include "bitfuse/format.h"
#include "bitfuse/gemv.h"
#include "bitfuse/gemv_tc.h"
#include "checks.h"
#include "mma_emu.h"

namespace py = pybind11;

namespace bitfuse {
namespace host {
namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous array of exactly `kind`/`size` (no silent casts), with the given shape.
py::array take(const py::array& a, const std::string& name, char kind, int size,
               std::vector<py::ssize_t> shape) {
  const auto dt = a.dtype();
  const bool int32ish = kind == 'i' && size == 4 && (dt.kind() == 'i' || dt.kind() == 'u');
  if (!(dt.kind() == kind || int32ish) || dt.itemsize() != size)
    fail("bitfuse gemv_host: " + name + " has dtype " + std::string(py::str(a.dtype())) +
         ", expected " + (kind == 'i' ? "int32" : kind == 'u' ? "uint8" : size == 2 ? "float16" : "float32"));
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) fail("bitfuse gemv_host: " + name + " has shape " + shape_of(a));
  return py::array::ensure(a, py::array::c_style);
}

template <typename T> const T* ptr(const py::array& a) { return static_cast<const T*>(a.data()); }

// words: flat int32 array of whole runs (4, 2 or 3 words a run, FORMAT.md §3).
// Returns (pairs, columns): pairs (runs, 16) uint32 = the half2 bit patterns run_pair makes,
// in pair order; columns (16, 2) int32 = the column (0..31 within the run) of each pair's low
// and high half. Tests decode the halves (1024 + q) and place them with columns.
py::tuple magic_unpack_test(const py::array& words_in, int bits) {
  check_bits(bits);
  const auto dt = words_in.dtype();
  if ((dt.kind() != 'i' && dt.kind() != 'u') || dt.itemsize() != 4)
    fail("bitfuse: words must be an int32 array, got " + std::string(py::str(dt)));
  const auto words = py::array::ensure(words_in, py::array::c_style);
  const int rw = tricks::run_words(bits);
  if (words.ndim() != 1 || words.shape(0) % rw)
    fail("bitfuse: words must be a flat array of whole " + std::to_string(rw) + "-word runs, got " +
         shape_of(words));
  const py::ssize_t runs = words.shape(0) / rw;
  py::array_t<uint32_t> pairs({runs, py::ssize_t(16)});
  const uint32_t* w = ptr<uint32_t>(words);
  uint32_t* o = pairs.mutable_data();
  for (py::ssize_t r = 0; r < runs; ++r)
    for (int p = 0; p < 16; ++p) o[r * 16 + p] = tricks::run_pair_rt(w + r * rw, bits, p);
  py::array_t<int32_t> cols({py::ssize_t(16), py::ssize_t(2)});
  int32_t* c = cols.mutable_data();
  for (int p = 0; p < 16; ++p)
    for (int hi = 0; hi < 2; ++hi) c[p * 2 + hi] = tricks::pair_column(bits, p, hi);
  return py::make_tuple(pairs, cols);
}

// One run through run_dequant, exactly as the kernel calls it: words of one run, fp16 scale /
// offset / alpha (raw bits), the residual sign word. Returns the 32 fp32 weights in column order.
py::array_t<float> run_dequant_test(const py::array& words_in, int bits, uint16_t scale,
                                    uint16_t zero, bool has_res, uint32_t plane, uint16_t alpha) {
  check_bits(bits);
  const auto words = py::array::ensure(words_in, py::array::c_style);
  if (words.dtype().itemsize() != 4 || words.ndim() != 1 ||
      words.shape(0) != tricks::run_words(bits))
    fail("bitfuse: one run is " + std::to_string(tricks::run_words(bits)) + " int32 words");
  const uint32_t* w = ptr<uint32_t>(words);
  py::array_t<float> out(32);
  float* o = out.mutable_data();
  const float s = half_to_float(scale), z = half_to_float(zero), al = half_to_float(alpha);
  if (bits == 4) tricks::run_dequant<4>(w, s, z, has_res, plane, al, o);
  else if (bits == 2) tricks::run_dequant<2>(w, s, z, has_res, plane, al, o);
  else tricks::run_dequant<3>(w, s, z, has_res, plane, al, o);
  return out;
}

template <int BITS>
void row_dot(const gemv::Args& a, const float* x, int row, int cls, float* acc) {
  const int G = a.k_pad / a.group_size, KW1 = a.k_pad / 32, rw = tricks::run_words(BITS);
  const uint32_t* words =
      a.qweight + a.class_word[cls] + int64_t(row - a.class_first[cls]) * words_per_row(BITS, a.k_pad);
  const int ri = a.res_index ? a.res_index[row] : -1;
  for (int k0 = 0; k0 < a.k; k0 += 32) {  // runs past k never contribute (x is 0 there)
    const int g = k0 / a.group_size;
    float wd[32];
    float scale, zero;
    group_params(a, row, G, g, scale, zero);
    tricks::run_dequant<BITS>(words + (k0 / 32) * rw, scale, zero, ri >= 0,
                              ri >= 0 ? a.res_plane[int64_t(ri) * KW1 + k0 / 32] : 0u,
                              ri >= 0 ? half_to_float(a.res_alpha[int64_t(ri) * G + g]) : 0.0f, wd);
    for (int mi = 0; mi < a.m; ++mi)
      for (int c = 0; c < 32 && k0 + c < a.k; ++c)
        acc[mi] = fmaf(x[int64_t(mi) * a.k + k0 + c], wd[c], acc[mi]);
  }
}

// The tensor-core GEMV (csrc/cuda/gemv_tc.cu) on the CPU: block by block, chunk by chunk, warp
// by warp, run by run, with the kernel's header code (gemv_tc.h lane_codes / lane_signs /
// x_pair_pos / fold_group, mma_tile.h layouts): x staged in pair order, each lane's A registers
// decoded from the words it loads, B registers read from the staged x, mma emulated (mma_emu.h),
// the folds at the same group ends with the same parameters, the warps' tiles summed in warp
// order, the same epilogue. `xb` holds x as fp16/bf16 bits (m, k). Writes y (before the cast)
// into o (m, n), original order.
template <int BITS>
void tc_block(const gemv::Args& a, int dtype, const uint16_t* xb, int cls, int row0, float* o) {
  using namespace gemv_tc;
  constexpr int RW = tricks::run_words(BITS);
  const int wpr = words_per_row(BITS, a.k_pad);
  const uint32_t* cls_words = a.qweight + a.class_word[cls];
  const int G = a.k_pad / a.group_size, kw1 = a.k_pad / 32, rpg = a.group_size / 32;
  const int runs = kw1;  // every run up to k_pad (x is 0 past k): every group is whole
  const int ms = m_stage(a.m), xc = chunk_cols(a.m), xr = xc / 32, rs = xc + kXPad;
  std::vector<uint16_t> xs(size_t(ms) * rs);
  int row[32][2], ri[32][2];  // rows past n read row n - 1, as the kernel does
  bool res = false;
  for (int l = 0; l < 32; ++l)
    for (int h = 0; h < 2; ++h) {
      row[l][h] = std::min(row0 + (l >> 2) + 8 * h, a.n - 1);
      ri[l][h] = a.res_index ? a.res_index[row[l][h]] : -1;
      res = res || ri[l][h] >= 0;  // __any_sync over the warp (every warp has the same rows)
    }
  float y[kWarps][32][4] = {};
  for (int c0 = 0; c0 < runs; c0 += xr) {
    const int cend = c0 + xr < runs ? c0 + xr : runs;
    // stage_x: the chunk's columns the kernel stages (staged_cols), in pair order, 0 past k and
    // for rows m..ms-1
    const int cols = staged_cols((cend - c0) * 32);
    for (int mi = 0; mi < ms; ++mi)
      for (int col = 0; col < cols; ++col) {
        const int k = c0 * 32 + col;
        xs[size_t(mi) * rs + (col & ~31) + x_pair_pos(col & 31)] =
            (mi < a.m && k < a.k) ? xb[int64_t(mi) * a.k + k] : uint16_t(0);
      }
    // Σx as the kernel's staging sums it: 8 columns a thread (chunk8_sum), then the butterfly
    // over the group's gs/8 lanes (xsum_tree).
    std::vector<float> xsum(size_t(ms) * (cols / a.group_size));
    const int lanes = a.group_size / 8;
    for (size_t e = 0; e < xsum.size(); ++e) {
      const int mi = int(e % ms), gl = int(e / ms);
      float part[16];
      for (int l = 0; l < lanes; ++l) {
        float f[8];
        for (int j = 0; j < 8; ++j) {
          const int k = c0 * 32 + gl * a.group_size + 8 * l + j;
          f[j] = (mi < a.m && k < a.k) ? mma::act_to_f32(xb[int64_t(mi) * a.k + k], dtype) : 0.0f;
        }
        part[l] = chunk8_sum(f);
      }
      xsum[e] = xsum_tree(part, lanes);
    }
    for (int w = 0; w < kWarps; ++w) {
      float cq[32][4] = {}, cr[32][4] = {};
      for (int b = c0 + w * kRunsPerIter; b < cend; b += kWarps * kRunsPerIter)
        for (int R = b; R < b + kRunsPerIter && R < cend; ++R) {
          uint32_t aq[2][32][4], ar[2][32][4], b0[2][32], b1[2][32];
          for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            uint32_t c[2][4], sg[2][4];
            for (int h = 0; h < 2; ++h) {
              const uint32_t* run = cls_words + int64_t(row[l][h] - a.class_first[cls]) * wpr +
                                    int64_t(R) * RW;
              const uint32_t lo = run[lane_word(BITS, t)], hi = BITS == 3 ? run[2] : 0u;
              const uint32_t pl = (res && ri[l][h] >= 0) ? a.res_plane[int64_t(ri[l][h]) * kw1 + R] : 0u;
              lane_codes<BITS>(lo, hi, t, dtype, c[h]);
              lane_signs(pl, t, dtype, ri[l][h] >= 0, sg[h]);
            }
            for (int s = 0; s < 2; ++s) {  // k16 step s: code pairs 2s, 2s + 1
              const uint32_t q[4] = {c[0][2 * s], c[1][2 * s], c[0][2 * s + 1], c[1][2 * s + 1]};
              const uint32_t r[4] = {sg[0][2 * s], sg[1][2 * s], sg[0][2 * s + 1], sg[1][2 * s + 1]};
              for (int i = 0; i < 4; ++i) aq[s][l][i] = q[i], ar[s][l][i] = r[i];
            }
            uint32_t bx[4];  // lanes past m_stage read row g & (ms - 1): unused C columns
            const uint16_t* p = xs.data() + size_t(g & (ms - 1)) * rs + (R - c0) * 32 + 8 * t;
            for (int i = 0; i < 4; ++i) bx[i] = uint32_t(p[2 * i]) | (uint32_t(p[2 * i + 1]) << 16);
            b0[0][l] = bx[0], b1[0][l] = bx[1], b0[1][l] = bx[2], b1[1][l] = bx[3];
          }
          float* pq[32];
          float* pr[32];
          for (int l = 0; l < 32; ++l) pq[l] = cq[l], pr[l] = cr[l];
          for (int s = 0; s < 2; ++s) {
            emu_mma(dtype, pq, aq[s], b0[s], b1[s]);
            if (res) emu_mma(dtype, pr, ar[s], b0[s], b1[s]);
          }
          if ((R + 1) % rpg == 0) {
            for (int l = 0; l < 32; ++l) {
              float sc[2] = {0, 0}, zr[2] = {0, 0}, al[2] = {0, 0};
              for (int h = 0; h < 2; ++h) {
                row_group_params(a, row_scales(a, row[l][h], G), R / rpg, sc[h], zr[h]);
                if (res && ri[l][h] >= 0) al[h] = half_to_float(a.res_alpha[int64_t(ri[l][h]) * G + R / rpg]);
              }
              const int gl = (R - c0) / rpg, cc = 2 * (l & 3);
              const float xs2[2] = {cc < ms ? xsum[size_t(gl) * ms + cc] : 0.0f,
                                    cc + 1 < ms ? xsum[size_t(gl) * ms + cc + 1] : 0.0f};
              fold_group(y[w][l], cq[l], cr[l], xs2, sc, zr, al, res);
              for (int i = 0; i < 4; ++i) cq[l][i] = cr[l][i] = 0.0f;
            }
          }
        }
    }
  }
  for (int lr = 0; lr < kRowsPerBlock; ++lr)
    for (int mi = 0; mi < a.m; ++mi) {
      const int rr = row0 + lr;
      if (rr >= a.n) continue;
      const int src = 4 * (lr & 7) + (mi >> 1), i = 2 * (lr >> 3) + (mi & 1);
      float v = 0.0f;
      for (int w = 0; w < kWarps; ++w) v += y[w][src][i];
      int col;
      const float yv = gemv::epilogue(a, v, rr, mi, &col);
      o[int64_t(mi) * a.n + col] = yv;
    }
}

// CPU twin of gemv_cuda on numpy arrays. x: (m, k) float32 holding the activations' values
// (already fp16/bf16-representable: the kernel converts them to fp32 exactly). Returns y (m, n)
// float32 before the final cast, in original output order.
py::array_t<float> gemv_host(const py::array& x_in, const py::array& qweight_in,
                             const py::array& scales_in, const py::array& zeros_in,
                             std::optional<py::array> perm_in, std::optional<py::array> res_index_in,
                             std::optional<py::array> res_plane_in,
                             std::optional<py::array> res_alpha_in, std::optional<py::array> t_in,
                             std::optional<py::array> lr_up_in, std::optional<py::array> extra_in,
                             std::optional<py::array> bias_in, const std::vector<int>& class_bits,
                             const std::vector<int>& class_rows, int n, int k, int k_pad,
                             int group_size, std::optional<py::array> scale_rows_in,
                             bool tensor_cores, int dtype) {
  const ClassTable table = make_class_table(class_bits, class_rows, n, k, k_pad, group_size);
  if (x_in.ndim() != 2) fail("bitfuse gemv_host: x must be 2-D (m, k), got " + shape_of(x_in));
  const int m = int(x_in.shape(0));
  if (m < 1 || m > gemv::kMaxM)
    fail("bitfuse gemv_host: m must be 1.." + std::to_string(gemv::kMaxM) + ", got " + std::to_string(m));
  const py::ssize_t G = k_pad / group_size;
  const int64_t total = class_word_offset(table.bits, table.rows, table.count, k_pad);
  gemv::Args a{};
  const auto x = take(x_in, "x", 'f', 4, {m, k});
  const auto qweight = take(qweight_in, "qweight", 'i', 4, {py::ssize_t(total)});
  // fp16 pairs, or (with scale_rows) compact codes (FORMAT.md §5.1).
  const bool compact = bool(scale_rows_in);
  const auto scales = take(scales_in, "scales", compact ? 'u' : 'f', compact ? 1 : 2, {n, G});
  const auto zeros = take(zeros_in, "zeros", compact ? 'u' : 'f', compact ? 1 : 2, {n, G});
  const auto scale_rows = compact ? take(*scale_rows_in, "scale_rows", 'f', 2, {n, 3}) : py::array();
  // The host twin has no 128-bit loads; address 0 keeps class_vec consistent for the check.
  fill_gemv_classes(a, table, k_pad, 0, "bitfuse gemv_host");
  a.qweight = ptr<uint32_t>(qweight);
  set_scale_pointers(a, scales.data(), zeros.data(), compact ? scale_rows.data() : nullptr);
  py::array perm, res_index, res_plane, res_alpha, t, lr_up, extra, bias;
  if (perm_in) {
    perm = take(*perm_in, "perm", 'i', 4, {n});
    a.perm = ptr<int32_t>(perm);
    std::vector<bool> seen(size_t(n), false);
    for (int i = 0; i < n; ++i) {
      const int p = a.perm[i];
      if (p < 0 || p >= n || seen[size_t(p)])
        fail("bitfuse gemv_host: perm must be a permutation of range(" + std::to_string(n) + ")");
      seen[size_t(p)] = true;
    }
  }
  if (bool(res_index_in) != bool(res_plane_in) || bool(res_index_in) != bool(res_alpha_in))
    fail("bitfuse gemv_host: res_index, res_plane and res_alpha are given together or not at all");
  if (res_index_in) {
    res_index = take(*res_index_in, "res_index", 'i', 4, {n});
    res_plane = take(*res_plane_in, "res_plane", 'i', 4, {-1, k_pad / 32});
    const py::ssize_t nr = res_plane.shape(0);
    res_alpha = take(*res_alpha_in, "res_alpha", 'f', 2, {nr, G});
    a.res_index = ptr<int32_t>(res_index);
    for (int i = 0; i < n; ++i)
      if (a.res_index[i] < -1 || a.res_index[i] >= nr)
        fail("bitfuse gemv_host: res_index values must be -1 or in [0, " + std::to_string(nr) + ")");
    a.res_plane = ptr<uint32_t>(res_plane);
    a.res_alpha = ptr<uint16_t>(res_alpha);
  }
  if (bool(t_in) != bool(lr_up_in)) fail("bitfuse gemv_host: t and lr_up are given together");
  if (t_in) {
    t = take(*t_in, "t", 'f', 4, {m, -1});
    a.r = int(t.shape(1));
    lr_up = take(*lr_up_in, "lr_up", 'f', 2, {n, a.r});
    a.t = ptr<float>(t);
    a.lr_up = ptr<uint16_t>(lr_up);
  }
  if (extra_in) {
    extra = take(*extra_in, "extra", 'f', 4, {m, n});
    a.extra = ptr<float>(extra);
  }
  if (bias_in) {
    bias = take(*bias_in, "bias", 'f', 4, {n});
    a.bias = ptr<float>(bias);
  }
  a.m = m, a.n = n, a.k = k, a.k_pad = k_pad, a.group_size = group_size;

  py::array_t<float> out({py::ssize_t(m), py::ssize_t(n)});
  float* o = out.mutable_data();
  const float* xp = ptr<float>(x);
  if (tensor_cores) {
    if (dtype != mma::kDtypeF16 && dtype != mma::kDtypeBF16)
      fail("bitfuse gemv_host: dtype must be 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
    if (!gemv_tc::takes_group_size(group_size))
      fail("bitfuse gemv_host: the tensor-core GEMV takes group sizes 32, 64 and 128, got " +
           std::to_string(group_size));
    // x's values in the activation dtype (the caller passes representable values: exact).
    std::vector<uint16_t> xb(size_t(m) * k);
    for (size_t i = 0; i < xb.size(); ++i)
      xb[i] = dtype == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(xp[i]) : mma::f32_to_f16_bits(xp[i]);
    for (int row0 = 0; row0 < n; row0 += gemv_tc::kRowsPerBlock) {
      const int cls = gemv::class_of_row(a, row0);
      switch (table.bits[cls]) {
        case 2: tc_block<2>(a, dtype, xb.data(), cls, row0, o); break;
        case 3: tc_block<3>(a, dtype, xb.data(), cls, row0, o); break;
        default: tc_block<4>(a, dtype, xb.data(), cls, row0, o); break;
      }
    }
    return out;
  }
  for (int row = 0; row < n; ++row) {
    const int cls = gemv::class_of_row(a, row);
    float acc[gemv::kMaxM] = {};
    switch (table.bits[cls]) {
      case 2: row_dot<2>(a, xp, row, cls, acc); break;
      case 3: row_dot<3>(a, xp, row, cls, acc); break;
      default: row_dot<4>(a, xp, row, cls, acc); break;
    }
    for (int mi = 0; mi < m; ++mi) {
      int col;
      const float y = gemv::epilogue(a, acc[mi], row, mi, &col);
      o[int64_t(mi) * n + col] = y;
    }
  }
  return out;
}

}  // namespace

void register_gemv_host_ops(py::module_& m) {
  m.def("magic_unpack_test", &magic_unpack_test, py::arg("words"), py::arg("bits"),
        "Run dequant_tricks.h's run_pair over flat int32 words (whole 32-code runs): returns "
        "(pairs (runs, 16) uint32 half2 bit patterns = 1024 + code per half, columns (16, 2) "
        "int32 = the column within the run of each pair's low/high half).");
  m.def("run_dequant_test", &run_dequant_test, py::arg("words"), py::arg("bits"),
        py::arg("scale_bits"), py::arg("zero_bits"), py::arg("has_res"), py::arg("plane"),
        py::arg("alpha_bits"),
        "dequant_tricks.h's run_dequant on one run (fp16 arguments as raw uint16 bits): the 32 "
        "fp32 weights of the run in column order.");
  m.def("gemv_host", &gemv_host, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("perm"), py::arg("res_index"), py::arg("res_plane"),
        py::arg("res_alpha"), py::arg("t"), py::arg("lr_up"), py::arg("extra"), py::arg("bias"),
        py::arg("class_bits"), py::arg("class_rows"), py::arg("n"), py::arg("k"),
        py::arg("k_pad"), py::arg("group_size"), py::arg("scale_rows") = py::none(),
        py::arg("tensor_cores") = false, py::arg("dtype") = 1,
        "CPU twin of gemv_cuda (same header code; tensor_cores=True: of the tensor-core GEMV, "
        "gemv_tc.cu, with x's values in dtype 1 fp16 / 2 bf16): x (m<=8, k) float32, layer arrays as for "
        "dequantize_host, t (m, r) float32 with lr_up (n, r) float16, extra (m, n) float32, bias "
        "(n) float32, each or None. Returns y (m, n) float32 before the cast, original order.");
}

}  // namespace host
}  // namespace bitfuse
