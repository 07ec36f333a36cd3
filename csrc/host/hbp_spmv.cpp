// CPU SpMV/SpMM on the HBP layout: the same walk a GPU block does (tile → groups → the 32
// interleaved lanes), run serially, so the tests exercise the format's index math on CI.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitfuse/hbp.h"

namespace bitfuse {
namespace hbp {
namespace {

inline float load(uint16_t h) { return half_to_float(h); }  // fp16 values travel as raw bits
inline float load(float v) { return v; }
inline double load(double v) { return v; }

}  // namespace

template <typename V, typename Acc>
void spmm_host(const View<V>& a, const Acc* x, int64_t m, Acc* y, Acc* partial) {
  std::fill(y, y + a.n_rows * m, Acc(0));  // rows with no nonzero are 0
  std::vector<Acc> acc(size_t(kGroup * m));
  for (int64_t t = 0; t < a.n_tiles; ++t) {
    const int64_t c0 = int64_t(a.tile_coords[2 * t + 1]) * a.tile_cols;
    const int64_t width = std::min(a.tile_cols, a.n_cols - c0);  // last tile may be narrower
    for (int64_t g = a.tile_group_ptr[t]; g < a.tile_group_ptr[t + 1]; ++g) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t e = a.group_offset[g]; e < a.group_offset[g + 1]; ++e) {
        const uint16_t c = a.cols[e];
        if (c == kPadCol) continue;  // padding: never multiplies x (0 · inf would be nan)
        if (int64_t(c) >= width)
          throw std::invalid_argument("bitfuse hbp: corrupt layout (column " + std::to_string(c) +
                                      " outside its tile of width " + std::to_string(width) + ")");
        const Acc v = Acc(load(a.values[e]));
        const Acc* xr = x + (c0 + c) * m;
        Acc* ar = acc.data() + (e % kGroup) * m;  // group offsets are multiples of 32
        for (int64_t j = 0; j < m; ++j) ar[j] += v * xr[j];
      }
      for (int l = 0; l < kGroup; ++l) {
        const int32_t row = a.group_rows[g * kGroup + l];
        if (row < 0) continue;
        const int32_t slot = a.group_slot[g * kGroup + l];
        Acc* dst = slot < 0 ? y + int64_t(row) * m : partial + int64_t(slot) * m;
        std::copy(acc.begin() + l * m, acc.begin() + (l + 1) * m, dst);
      }
    }
  }
  // Rows spanning several column tiles: sum their partials in column-tile order (fixed order,
  // hence deterministic, unlike atomics).
  for (int64_t i = 0; i < a.n_multi; ++i) {
    Acc* dst = y + int64_t(a.multi_rows[i]) * m;
    for (int64_t s = a.multi_ptr[i]; s < a.multi_ptr[i + 1]; ++s)
      for (int64_t j = 0; j < m; ++j) dst[j] += partial[s * m + j];
  }
}

template void spmm_host<uint16_t, float>(const View<uint16_t>&, const float*, int64_t, float*, float*);
template void spmm_host<float, float>(const View<float>&, const float*, int64_t, float*, float*);
template void spmm_host<double, double>(const View<double>&, const double*, int64_t, double*, double*);

}  // namespace hbp
}  // namespace bitfuse
