// The CPU twin of the CUDA HBP kernel (csrc/cuda/hbp.cu): the same Product member functions
// (bitfuse/hbp_kernel.h) in the kernel's order: every program takes its static items round
// robin, then the counter's items in ticket order; inside an item, every thread stages its share
// of x, then every warp runs its groups lane by lane; then the split-row reduction. Serial, so
// the result is the GPU's bit for bit whatever the grid (each output element has one writer and
// a fixed order of sums).
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "bitfuse/hbp_kernel.h"

namespace bitfuse {
namespace hbp {
namespace {

template <typename V, typename X, int MT>
void twin(DeviceArgs a, int64_t programs, int warps) {
  using Acc = typename AccOf<V>::type;
  if (a.m <= 0 || a.n_rows <= 0) return;
  a.stage_cols = cap_stage_cols(a.stage_cols, MT, int(sizeof(Acc)));
  const Product<V, X, MT> P{a};
  const int threads = 32 * warps;
  std::vector<Acc> xs(size_t(std::max<int64_t>(1, a.stage_cols * MT)));
  for (int64_t i = 0; i < a.n_empty * a.m; ++i) P.zero_empty(i);
  const int64_t n_chunks = P.n_chunks();
  const int64_t n_items = a.n_tiles * n_chunks;
  auto run = [&](int64_t it) {
    const Item w = P.item(it, n_chunks);
    if (w.stage)
      for (int tid = 0; tid < threads; ++tid) P.stage(w, xs.data(), tid, threads);
    for (int warp = 0; warp < warps; ++warp)
      for (int64_t g = a.tile_group_ptr[w.tile] + warp; g < a.tile_group_ptr[w.tile + 1]; g += warps)
        for (int lane = 0; lane < kGroup; ++lane) P.group_lane(w, xs.data(), g, lane);
  };
  const Schedule s = make_schedule(n_items, programs);
  for (int64_t p = 0; p < programs; ++p)
    for (int64_t k = 0; k < s.per; ++k) run(static_item(p, k, programs));
  for (int64_t it = s.first_dynamic; it < n_items; ++it) run(it);  // the counter's tickets
  for (int64_t i = 0; i < a.n_multi * a.m; ++i) P.reduce(i);
}

template <typename V, typename X>
void twin_mt(const DeviceArgs& a, int64_t programs, int warps, int mt) {
  if (mt == 1) twin<V, X, 1>(a, programs, warps);
  else twin<V, X, 8>(a, programs, warps);
}

}  // namespace

void kernel_twin(DeviceArgs a, int64_t programs, int warps, int mt) {
  if (programs < 1 || (warps != 1 && warps != 2 && warps != 4 && warps != 8) || (mt != 1 && mt != 8))
    throw std::invalid_argument("bitfuse hbp twin: programs >= 1, warps in {1, 2, 4, 8}, mt in {1, 8}");
  switch (a.value_dtype) {
    case kF16:
      if (a.x_dtype == kF16) return twin_mt<Half, Half>(a, programs, warps, mt);
      if (a.x_dtype == kBF16) return twin_mt<Half, BF16>(a, programs, warps, mt);
      if (a.x_dtype == kF32) return twin_mt<Half, float>(a, programs, warps, mt);  // host only
      break;
    case kF32:
      if (a.x_dtype == kF32) return twin_mt<float, float>(a, programs, warps, mt);
      break;
    case kF64:
      if (a.x_dtype == kF64) return twin_mt<double, double>(a, programs, warps, mt);
      break;
  }
  throw std::invalid_argument("bitfuse hbp twin: unsupported value/x dtype pair");
}

}  // namespace hbp
}  // namespace bitfuse
