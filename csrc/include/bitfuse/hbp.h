// HBP (hash-based partitioned) sparse format: layout constants, tile choice and the row-length
// bucket key. docs/HBP.md defines every array; csrc/host/hbp_build.cpp builds them and
// csrc/host/hbp_spmv.cpp is the CPU product. Helpers are __host__ __device__ so a CUDA kernel
// can share them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bitfuse/format.h"  // BF_HD

// Full unrolling of compile-time loops (MT accumulators must stay in registers on the GPU).
#if defined(__CUDA_ARCH__)
#define BF_UNROLL _Pragma("unroll")
#else
#define BF_UNROLL
#endif

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
// x staging), between 64 and 1024 rows, never taller than the matrix. This is the guess from the
// shape alone; the build then counts the tiles really occupied and makes hypersparse matrices'
// tiles taller (tall_tile_rows).
inline TileShape choose_tiles(int64_t n_rows, int64_t n_cols, int64_t nnz, int value_bytes,
                              int64_t smem_bytes, int64_t forced_cols = 0) {
  const int64_t acc_bytes = value_bytes == 8 ? 8 : 4;
  int64_t cap = 32;
  while (cap * 2 * acc_bytes <= smem_bytes && cap * 2 <= kMaxTileCols) cap *= 2;
  TileShape t;
  t.cols = n_cols <= cap ? (n_cols > 0 ? n_cols : 1) : cap;
  if (forced_cols > 0) t.cols = forced_cols;  // the height below follows the width used
  const int64_t col_tiles = (n_cols + t.cols - 1) / t.cols;
  const double per_row = n_rows > 0 && col_tiles > 0 ? double(nnz) / double(n_rows) / col_tiles : 0;
  int64_t r = 64;
  while (r < 1024 && double(r) * per_row < 4096.0) r *= 2;
  const int64_t fit = ((n_rows + kGroup - 1) / kGroup) * kGroup;
  t.rows = r < fit ? r : (fit > 0 ? fit : kGroup);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Index math of the products, shared by the CPU twin (hbp_spmv.cpp) and the CUDA kernels
// (csrc/cuda/hbp.cu), so the CPU tests run the same code the GPU does.
// ---------------------------------------------------------------------------------------------

// The persistent schedule (docs/HBP.md §3). Work items are (tile, chunk of right-hand sides)
// pairs, tile-major in tile_order (heaviest first): item i is tile_order[i / n_chunks], columns
// [(i % n_chunks)·MT, +MT) of x. With P programs, each takes `per` items statically, round robin
// (program p: items p, p + P, ..., p + (per-1)·P); items from first_dynamic on are handed out by
// an atomic counter. The fixed share is floor(n_items / 2) (bitfuse.sparse.hbp.FIXED_FRACTION).
struct Schedule {
  int64_t per;            // static items per program
  int64_t first_dynamic;  // per · P
};
BF_HD inline Schedule make_schedule(int64_t n_items, int64_t programs) {
  Schedule s;
  s.per = programs > 0 ? (n_items / 2) / programs : 0;
  s.first_dynamic = s.per * programs;
  return s;
}
BF_HD inline int64_t static_item(int64_t program, int64_t k, int64_t programs) {
  return program + k * programs;
}
BF_HD inline int64_t item_rank(int64_t item, int64_t n_chunks) { return item / n_chunks; }
BF_HD inline int64_t item_chunk(int64_t item, int64_t n_chunks) { return item % n_chunks; }
BF_HD inline int64_t n_chunks_of(int64_t m, int mt) { return (m + mt - 1) / mt; }

// First column of tile t, and its width (the last column tile may be narrower: x is never read
// past its end).
BF_HD inline int64_t tile_col0(const int32_t* tile_coords, int64_t t, int64_t tile_cols) {
  return int64_t(tile_coords[2 * t + 1]) * tile_cols;
}
BF_HD inline int64_t tile_width(int64_t c0, int64_t tile_cols, int64_t n_cols) {
  return n_cols - c0 < tile_cols ? n_cols - c0 : tile_cols;
}

// Stage the tile's x slice (width × mt values) in shared memory? Only if it fits the block's
// budget and the tile has at least as many stored slots as the slice has columns: a hypersparse
// tile (a few nonzeros per 8192 columns) would load far more x than it uses, so it reads x
// straight from global memory (L1/L2) instead.
BF_HD inline bool stage_pays(int64_t tile_slots, int64_t width, int64_t mt, int64_t smem_elems) {
  return width * mt <= smem_elems && tile_slots >= width;
}

// fp16 / bf16 raw bits to float (exact), for values and x.
BF_HD inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, sizeof f);
#endif
  return f;
}

// Raw element types the products read. fp16 and bf16 travel as their 16 bits.
struct Half { uint16_t bits; };
struct BF16 { uint16_t bits; };
BF_HD inline float to_acc(Half v) { return half_to_float(v.bits); }
BF_HD inline float to_acc(BF16 v) { return bf16_to_float(v.bits); }
BF_HD inline float to_acc(float v) { return v; }
BF_HD inline double to_acc(double v) { return v; }

// One fused multiply-add per element on both sides: the CPU twin and the GPU round alike, so
// their products are bit-identical (the GPU tests check equality, not a tolerance).
BF_HD inline float madd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
BF_HD inline double madd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Slot of element j of lane `lane` in the group starting at `off` (jagged-diagonal interleave:
// the 32 lanes read 32 consecutive slots at every step j).
BF_HD inline int64_t slot_of(int64_t off, int64_t j, int lane) { return off + j * kGroup + lane; }

// Lane `lane` of a group: acc[i] += value · x(col, i) over its stored elements in slot order
// (columns ascending), for i < MT. Padding (kPadCol) never touches x. Loads are batched 4 steps
// at a time so a warp has several coalesced loads in flight; the order of the sums does not
// depend on the batching. `xat(col, i)` returns x[c0 + col, j0 + i] (0 for i >= mt) in Acc.
template <int MT, typename V, typename Acc, typename XAt>
BF_HD inline void lane_dot(const uint16_t* cols, const V* vals, int64_t off, int64_t width,
                           int lane, const XAt& xat, Acc (&acc)[MT]) {
  int64_t j = 0;
  for (; j + 4 <= width; j += 4) {
    uint16_t c[4];
    Acc v[4];
    BF_UNROLL
    for (int u = 0; u < 4; ++u) c[u] = cols[slot_of(off, j + u, lane)];
    BF_UNROLL
    for (int u = 0; u < 4; ++u) v[u] = Acc(to_acc(vals[slot_of(off, j + u, lane)]));
    BF_UNROLL
    for (int u = 0; u < 4; ++u) {
      if (c[u] == kPadCol) continue;
      BF_UNROLL
      for (int i = 0; i < MT; ++i) acc[i] = madd(v[u], xat(c[u], i), acc[i]);
    }
  }
  for (; j < width; ++j) {
    const uint16_t c = cols[slot_of(off, j, lane)];
    if (c == kPadCol) continue;
    const Acc a = Acc(to_acc(vals[slot_of(off, j, lane)]));
    BF_UNROLL
    for (int i = 0; i < MT; ++i) acc[i] = madd(a, xat(c, i), acc[i]);
  }
}

// Rows split into pieces: the sum of their partial slots [s0, s1), column j of m, in column-tile
// order from 0 (fixed order: deterministic, unlike atomics on y).
template <typename Acc>
BF_HD inline Acc reduce_pieces(const Acc* partial, int64_t s0, int64_t s1, int64_t m, int64_t j) {
  Acc s = Acc(0);
  for (int64_t q = s0; q < s1; ++q) s = s + partial[q * m + j];
  return s;
}

// Element dtype codes of the CUDA entry points (as gemv_cuda's, plus fp64).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Everything the CUDA product (csrc/cuda/hbp.cu) takes: device pointers to the layout arrays of
// docs/HBP.md §2, the operands with element strides, and launch choices. Element (c, j) of x is
// x[c·x_stride_c + j·x_stride_j], element (r, j) of y is y[r·y_stride_r + j·y_stride_j]: the
// same kernel serves H @ x for x (n_cols, m) and the outlier branch S·xᵀ for a layer's x (M, K)
// written as y (M, N).
struct DeviceArgs {
  const int32_t* tile_order = nullptr;
  const int32_t* tile_coords = nullptr;
  const int32_t* tile_group_ptr = nullptr;
  const int64_t* tile_work = nullptr;
  const int64_t* group_offset = nullptr;
  const int32_t* group_rows = nullptr;
  const int32_t* group_slot = nullptr;
  const uint16_t* cols = nullptr;
  const void* values = nullptr;
  const int32_t* multi_rows = nullptr;
  const int64_t* multi_ptr = nullptr;
  const int32_t* empty_rows = nullptr;  // rows with no nonzero: written as 0
  int64_t n_rows = 0, n_cols = 0, tile_cols = 1, n_tiles = 0, n_multi = 0, n_empty = 0;
  int64_t n_slots = 0;  // partial slots (multi_ptr[n_multi]), known on the host
  const void* x = nullptr;
  int64_t x_stride_c = 0, x_stride_j = 0;
  void* y = nullptr;
  int64_t y_stride_r = 0, y_stride_j = 0;
  void* partial = nullptr;    // n_slots · m accumulators (fp32, or fp64 for fp64 values)
  int32_t* counter = nullptr;  // 2 int32 on the device, zero before the first call (see hbp.cu)
  int64_t m = 1;
  int value_dtype = kF32, x_dtype = kF32, y_dtype = kF32;
  int64_t stage_cols = 0;  // widest x slice the launch gives shared memory for (0: never stage)
  int warps = 8;           // warps per block
};

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
  std::vector<int32_t> multi_rows;      // rows split into >= 2 pieces (several column tiles, or a long run inside one)
  std::vector<int64_t> multi_ptr;       // their partial-slot ranges, n_multi + 1
  std::vector<int32_t> empty_rows;      // rows with no stored nonzero (the product writes 0)
  // Diagnostics, not format: seconds spent ordering and grouping rows inside tiles (order_runs),
  // the one step in which hash, sort and DP differ; the rest of the build is shared.
  double order_seconds = 0.0;
};

// Taller tiles for hypersparse matrices. choose_tiles assumes nonzeros spread over every column
// tile; a power-law or few-per-row matrix leaves its 1024-row tiles nearly empty (rmat scale 20:
// ~62 nonzeros a tile, mostly 1-long runs, so its 32-lane groups were 74% padding: 3.8× the
// slots of nnz). Counting the tiles occupied at `t.rows` (one pass, O(nnz + column tiles)) gives
// the real mean per tile; the height doubles while the doubled tiles' mean (assumed to grow with
// the height, as tiles of spread-out nonzeros stay occupied) stays at most 4096 and the estimated
// tiles stay at least kMinTilesTall, so a GPU keeps several work items per resident block. Banded and
// structured matrices, whose occupied tiles are already full, keep t.rows.
constexpr int64_t kMaxTileRows = 65536;
constexpr int64_t kMinTilesTall = 1024;
template <typename Idx>
int64_t tall_tile_rows(const int64_t* indptr, const Idx* indices, int64_t n_rows, TileShape t);

// Builds the layout from a canonical CSR (sorted, unique columns; checked by the caller).
template <typename Idx>
Layout build(const int64_t* indptr, const Idx* indices, int64_t n_rows, int64_t n_cols,
             TileShape tiles, Method method);

}  // namespace hbp
}  // namespace bitfuse
