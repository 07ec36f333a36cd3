// The body of the HBP product, as __host__ __device__ code: csrc/cuda/hbp.cu wraps it in a
// persistent CUDA kernel (block = tile, warps = groups, lanes = rows), and the CPU twin
// (csrc/host/hbp_spmv.cpp, _C.hbp_spmm / hbp_spmm_twin) runs the very same member functions
// serially (every thread of a phase, then the next phase), so the CPU tests execute the kernel's
// index math, staging, strides, dtype conversions and stores, and a GPU result can be compared
// with the twin bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "bitfuse/hbp.h"

namespace bitfuse {
namespace hbp {

template <typename V> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// x loads (read-only cache on the GPU), converted exactly to the accumulate type.
BF_HD inline float load_x(const Half* p) {
#if defined(__CUDA_ARCH__)
  return half_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
#else
  return half_to_float(p->bits);
#endif
}
BF_HD inline float load_x(const BF16* p) {
#if defined(__CUDA_ARCH__)
  return bf16_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
#else
  return bf16_to_float(p->bits);
#endif
}
BF_HD inline float load_x(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}
BF_HD inline double load_x(const double* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// float -> fp16 bits, round to nearest even (as __float2half_rn and torch's .half()); NaN stays
// NaN (quiet), overflow goes to inf, subnormals are rounded, not flushed.
BF_HD inline uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  uint32_t q, rem, half;
  if (ax >= 0x38800000u) {  // normal half: rebias the exponent (127 -> 15), keep 10 bits
    const uint32_t r = ax - (112u << 23);
    q = r >> 13, rem = r & 0x1fffu, half = 0x1000u;
  } else {  // subnormal half (or zero): units of 2^-24
    const int e = int(ax >> 23);
    const int shift = 126 - e;  // >= 14
    if (shift > 24) return sign;  // below 2^-25: rounds to zero (2^-25 itself: tie to even 0)
    const uint32_t mant = (ax & 0x7fffffu) | (e ? 0x800000u : 0u);
    q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  }
  if (rem > half || (rem == half && (q & 1u))) ++q;  // a carry into the exponent is correct
  return uint16_t(sign | q);
#endif
}

// y stores in the output dtype (uniform per launch).
BF_HD inline void store_y(void* y, int64_t i, float v, int dtype) {
  if (dtype == kF16) static_cast<uint16_t*>(y)[i] = float_to_half_bits(v);
  else static_cast<float*>(y)[i] = v;
}
BF_HD inline void store_y(void* y, int64_t i, double v, int) { static_cast<double*>(y)[i] = v; }

// Widest x slice a launch gives shared memory for: static + dynamic shared memory stay within
// the 48 KiB a block gets without an opt-in (the kernel's own static variables take a few bytes).
constexpr int64_t kStageBytes = 48 * 1024 - 128;
BF_HD inline int64_t cap_stage_cols(int64_t stage_cols, int mt, int acc_bytes) {
  const int64_t cap = kStageBytes / (int64_t(mt) * acc_bytes);
  return stage_cols < cap ? stage_cols : cap;
}

// One work item (docs/HBP.md §3): tile, chunk of right-hand sides, and whether to stage x.
struct Item {
  int64_t tile, j0, mt, c0, width;
  bool stage;
};

// The product for values V, x elements X, MT right-hand sides per item. `a.stage_cols` must
// already be capped (cap_stage_cols) and the layout validated (hbp_validate).
template <typename V, typename X, int MT>
struct Product {
  using Acc = typename AccOf<V>::type;
  const DeviceArgs& a;

  BF_HD int64_t n_chunks() const { return n_chunks_of(a.m, MT); }

  BF_HD Item item(int64_t it, int64_t n_chunks) const {
    Item w;
    // (SpMV and m <= MT: one chunk, and no 64-bit division on the GPU)
    w.tile = a.tile_order[n_chunks == 1 ? it : item_rank(it, n_chunks)];
    w.j0 = n_chunks == 1 ? 0 : item_chunk(it, n_chunks) * MT;
    w.mt = a.m - w.j0 < MT ? a.m - w.j0 : MT;
    w.c0 = tile_col0(a.tile_coords, w.tile, a.tile_cols);
    w.width = tile_width(w.c0, a.tile_cols, a.n_cols);
    w.stage = stage_pays(a.tile_work[w.tile], w.width, MT, a.stage_cols * MT);
    return w;
  }

  // Thread tid of nthreads copies its share of x[c0 : c0 + width, j0 : j0 + MT] into xs
  // ([width][MT], accumulate type; columns past mt as 0), consecutive threads along x's
  // unit-stride axis so the loads coalesce for x (n_cols, m) and for a layer's x (M, K) alike.
  BF_HD void stage(const Item& w, Acc* xs, int tid, int nthreads) const {
    const X* x = static_cast<const X*>(a.x);
    const X* xb = x + w.c0 * a.x_stride_c + w.j0 * a.x_stride_j;
    const int width = int(w.width);  // <= 32768
    if (MT == 1 || a.x_stride_c <= a.x_stride_j) {
      BF_UNROLL
      for (int i = 0; i < MT; ++i)
        for (int c = tid; c < width; c += nthreads)
          xs[c * MT + i] = i < w.mt ? Acc(load_x(xb + c * a.x_stride_c + i * a.x_stride_j)) : Acc(0);
    } else {
      for (int e = tid; e < width * MT; e += nthreads) {
        const int c = e / MT, i = e % MT;  // MT is a power of two: shifts
        xs[e] = i < w.mt ? Acc(load_x(xb + c * a.x_stride_c + i * a.x_stride_j)) : Acc(0);
      }
    }
  }

  // Lane `lane` of group g: its sums (lane_dot), then y[row] or its partial slot.
  BF_HD void group_lane(const Item& w, const Acc* xs, int64_t g, int lane) const {
    const int64_t off = a.group_offset[g];
    const int64_t gw = (a.group_offset[g + 1] - off) / kGroup;
    const V* vals = static_cast<const V*>(a.values);
    Acc acc[MT];
    BF_UNROLL
    for (int i = 0; i < MT; ++i) acc[i] = Acc(0);
    if (w.stage) {
      const auto xat = [xs](uint16_t col, int i) -> Acc { return xs[int(col) * MT + i]; };
      lane_dot<MT>(a.cols, vals, off, gw, lane, xat, acc);
    } else {
      const X* xb = static_cast<const X*>(a.x) + w.c0 * a.x_stride_c + w.j0 * a.x_stride_j;
      const int64_t sc = a.x_stride_c, sj = a.x_stride_j, mt = w.mt;
      const auto xat = [xb, sc, sj, mt](uint16_t col, int i) -> Acc {
        return i < mt ? Acc(load_x(xb + int64_t(col) * sc + i * sj)) : Acc(0);
      };
      lane_dot<MT>(a.cols, vals, off, gw, lane, xat, acc);
    }
    const int32_t row = a.group_rows[g * kGroup + lane];
    if (row < 0) return;
    const int32_t slot = a.group_slot[g * kGroup + lane];
    if (slot < 0) {
      BF_UNROLL
      for (int i = 0; i < MT; ++i)
        if (i < w.mt)
          store_y(a.y, int64_t(row) * a.y_stride_r + (w.j0 + i) * a.y_stride_j, acc[i], a.y_dtype);
    } else {
      Acc* p = static_cast<Acc*>(a.partial) + int64_t(slot) * a.m + w.j0;
      BF_UNROLL
      for (int i = 0; i < MT; ++i)
        if (i < w.mt) p[i] = acc[i];
    }
  }

  // Element i of the n_empty · m zeros (rows with no nonzero: nothing else writes them).
  BF_HD void zero_empty(int64_t i) const {
    const int64_t r = a.m == 1 ? i : i / a.m, j = a.m == 1 ? 0 : i % a.m;
    store_y(a.y, int64_t(a.empty_rows[r]) * a.y_stride_r + j * a.y_stride_j, Acc(0), a.y_dtype);
  }

  // Element i of the n_multi · m split-row sums: partial slots in column order.
  BF_HD void reduce(int64_t i) const {
    const int64_t r = i / a.m, j = i % a.m;
    const Acc s = reduce_pieces(static_cast<const Acc*>(a.partial), a.multi_ptr[r],
                                a.multi_ptr[r + 1], a.m, j);
    store_y(a.y, int64_t(a.multi_rows[r]) * a.y_stride_r + j * a.y_stride_j, s, a.y_dtype);
  }
};

// The CPU twin (hbp_spmv.cpp): runs Product over `programs` persistent programs of `warps`
// warps with the kernel's schedule, MT = mt (1 or 8), on host pointers in `a` (x may be fp32
// for fp16 values, a host-only combination: x values are exact in fp32 either way).
// a.stage_cols is capped here as the launcher caps it.
void kernel_twin(DeviceArgs a, int64_t programs, int warps, int mt);

}  // namespace hbp
}  // namespace bitfuse
