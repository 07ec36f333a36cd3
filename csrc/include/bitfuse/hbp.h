// HBP (hash-based partitioned) sparse format: layout constants, tile choice and the row-length
// bucket key. docs/HBP.md defines every array; csrc/host/hbp_build.cpp builds them and
// csrc/host/hbp_spmv.cpp is the CPU product. Helpers are __host__ __device__ so a CUDA kernel
// can share them.
#pragma once

#include <cstdint>
#include <vector>

#include "bitfuse/format.h"  // BF_HD

namespace bitfuse {
namespace hbp {

constexpr int kGroup = 32;                 // rows per warp group (one lane per row)
constexpr uint16_t kPadCol = 0xFFFF;       // column of a padding element: masked, never read
constexpr int64_t kMaxTileCols = 32768;    // local columns fit in uint16 below kPadCol
constexpr int kNumKeys = 32 + 4 * 58 + 4;  // bucket keys for lengths up to 2^63

// Row-ordering step inside a tile. All three give the same output format.
enum Method : int { kHash = 0, kSort = 1, kDP = 2 };

// Bucket of a row by its nonzero count in a tile: exact below 32, then four buckets per octave
// (so rows sharing a bucket differ by < 25% and a group's padding stays small). O(1), no sort.
BF_HD inline int length_key(int64_t len) {
  if (len < 32) return int(len);
#if defined(__CUDA_ARCH__)
  const int e = 63 - __clzll((long long)len);  // floor(log2 len) >= 5
#else
  const int e = 63 - __builtin_clzll(uint64_t(len));
#endif
  int sub = int((len >> (e - 2)) & 3);
  return 32 + (e - 5) * 4 + sub;
}

struct TileShape {
  int64_t rows;  // multiple of 32
  int64_t cols;  // 1 .. kMaxTileCols
};

// Tile width: the x slice (in the accumulate dtype: fp32, or fp64 for fp64 values) must fit the
// shared-memory budget of one block, so a narrow matrix gets one column tile and no partial
// sums. Tile height: about 4096 nonzeros per tile on average (enough work per block to hide the
// x staging), between 64 and 1024 rows, never taller than the matrix.
inline TileShape choose_tiles(int64_t n_rows, int64_t n_cols, int64_t nnz, int value_bytes,
                              int64_t smem_bytes) {
  const int64_t acc_bytes = value_bytes == 8 ? 8 : 4;
  int64_t cap = 32;
  while (cap * 2 * acc_bytes <= smem_bytes && cap * 2 <= kMaxTileCols) cap *= 2;
  TileShape t;
  t.cols = n_cols <= cap ? (n_cols > 0 ? n_cols : 1) : cap;
  const int64_t col_tiles = (n_cols + t.cols - 1) / t.cols;
  const double per_row = n_rows > 0 && col_tiles > 0 ? double(nnz) / double(n_rows) / col_tiles : 0;
  int64_t r = 64;
  while (r < 1024 && double(r) * per_row < 4096.0) r *= 2;
  const int64_t fit = ((n_rows + kGroup - 1) / kGroup) * kGroup;
  t.rows = r < fit ? r : (fit > 0 ? fit : kGroup);
  return t;
}

// The built structure; docs/HBP.md §2 describes each array. Values are gathered separately
// (`src` maps each stored slot to a canonical nonzero, -1 for padding), so the build is
// independent of the value dtype.
struct Layout {
  int64_t n_rows = 0, n_cols = 0, nnz = 0, tile_rows = 0, tile_cols = 0;
  std::vector<int32_t> tile_coords;     // 2 per tile: tile-row index, tile-column index
  std::vector<int32_t> tile_group_ptr;  // n_tiles + 1
  std::vector<int32_t> tile_order;      // tiles, heaviest first (schedule order)
  std::vector<int64_t> tile_work;       // stored slots per tile
  std::vector<int64_t> group_offset;    // n_groups + 1, into cols/values
  std::vector<int32_t> group_width;     // n_groups
  std::vector<int32_t> group_rows;      // 32 per group, global row or -1
  std::vector<int32_t> group_slot;      // 32 per group, partial slot or -1 (write y directly)
  std::vector<uint16_t> cols;           // local column per slot, kPadCol for padding
  std::vector<int64_t> src;             // canonical nonzero per slot, -1 for padding
  std::vector<int32_t> multi_rows;      // rows with nonzeros in >= 2 column tiles
  std::vector<int64_t> multi_ptr;       // their partial-slot ranges, n_multi + 1
};

// Read-only view of a built matrix for the products (arrays as in Layout; values typed V).
template <typename V>
struct View {
  int64_t n_rows, n_cols, tile_cols, n_tiles, n_groups, n_multi, n_slots;
  const int32_t* tile_coords;
  const int32_t* tile_group_ptr;
  const int64_t* group_offset;
  const int32_t* group_rows;
  const int32_t* group_slot;
  const uint16_t* cols;
  const V* values;
  const int32_t* multi_rows;
  const int64_t* multi_ptr;
};

// y (n_rows, m) = A · x (n_cols, m), row-major, accumulating in Acc (float for fp16/fp32
// values, double for fp64). `partial` holds n_slots · m scratch values. Every output element is
// written once, in a fixed order, so repeated calls give bit-identical results.
template <typename V, typename Acc>
void spmm_host(const View<V>& a, const Acc* x, int64_t m, Acc* y, Acc* partial);

// Builds the layout from a canonical CSR (sorted, unique columns; checked by the caller).
template <typename Idx>
Layout build(const int64_t* indptr, const Idx* indices, int64_t n_rows, int64_t n_cols,
             TileShape tiles, Method method);

}  // namespace hbp
}  // namespace bitfuse
