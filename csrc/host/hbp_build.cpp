// HBP format build (docs/HBP.md): one pass over each tile row splits rows into column-tile runs,
// a counting sort by column tile forms the tiles, and inside each tile the rows are placed by
// their length bucket (hbp::length_key), O(rows), then cut into interleaved groups of 32.
// kSort and kDP replace only the in-tile ordering step, for the preprocessing comparison.
#include <algorithm>
#include <chrono>
#include <numeric>

#include "bitfuse/hbp.h"

namespace bitfuse {
namespace hbp {
namespace {

// The nonzeros of one row that fall into one column tile: a contiguous CSR range.
struct Run {
  int64_t start;
  int32_t row;
  int32_t len;
  int32_t ct;
  int32_t slot;  // partial slot, -1 when the row lives in this column tile only
};

// Per-group overhead in element-equivalents, for the DP's cost model: a group costs its 32
// lanes times its width plus this (metadata load, loop setup). Regu2D weighs groups the same way.
constexpr int64_t kGroupOverhead = 64;

// Longest piece a row may keep in one tile. A group is as wide as its longest lane, so one long
// row among short ones (a power-law hub, a dense row) would pad the other 31 lanes; splitting it
// into pieces of at most this length spreads it over lanes instead. The cap is the tile's
// nonzeros / 32 (a lone dense row fills exactly one group), but at least 8 and no more than 4×
// the tile's mean run, so ordinary rows stay whole.
int32_t piece_length(const Run* runs, int n) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += runs[i].len;
  const int64_t mean = (total + n - 1) / n;
  const int64_t c = std::min((total + kGroup - 1) / kGroup, 4 * mean);
  return int32_t(std::max<int64_t>(8, c));
}

// Orders a tile's runs (positions into `runs`) and cuts them into groups; sizes of the groups
// go to `sizes`. Every method keeps longest rows first so a group's rows have similar lengths.
void order_runs(const Run* runs, int n, Method method, std::vector<int32_t>& ord,
                std::vector<int32_t>& sizes, std::vector<int32_t>& counts,
                std::vector<int64_t>& dp, std::vector<int32_t>& arg) {
  ord.resize(n);
  sizes.clear();
  if (n <= kGroup) {  // one group whatever the order: nothing to do (same for every method)
    std::iota(ord.begin(), ord.end(), 0);
    sizes.push_back(n);
    return;
  }
  if (method == kHash) {
    // Counting sort on the bucket key, highest key first: O(n + kNumKeys).
    std::fill(counts.begin(), counts.end(), 0);
    for (int i = 0; i < n; ++i) ++counts[length_key(runs[i].len)];
    int pos = 0;
    for (int k = kNumKeys - 1; k >= 0; --k) {
      const int c = counts[k];
      counts[k] = pos;
      pos += c;
    }
    for (int i = 0; i < n; ++i) ord[counts[length_key(runs[i].len)]++] = i;
  } else {
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(),
                     [&](int32_t a, int32_t b) { return runs[a].len > runs[b].len; });
  }
  if (method != kDP) {
    for (int i = 0; i < n; i += kGroup) sizes.push_back(std::min(kGroup, n - i));
    return;
  }
  // Regu2D-style DP over the sorted rows: cut them into groups of 1..32 consecutive rows,
  // minimising Σ (32 · longest row + overhead). O(32 n).
  dp.assign(n + 1, 0);
  arg.assign(n + 1, 0);
  for (int j = 1; j <= n; ++j) {
    int64_t best = INT64_MAX;
    for (int i = std::max(0, j - kGroup); i < j; ++i) {
      const int64_t c = dp[i] + int64_t(kGroup) * runs[ord[i]].len + kGroupOverhead;
      if (c < best) best = c, arg[j] = i;
    }
    dp[j] = best;
  }
  for (int j = n; j > 0; j = arg[j]) sizes.push_back(j - arg[j]);
  std::reverse(sizes.begin(), sizes.end());
}

template <typename Idx>
void emit_tile(Layout& L, const Idx* indices, const Run* runs, int n, int32_t tr, int32_t ct,
               Method method, std::vector<int32_t>& ord, std::vector<int32_t>& sizes,
               std::vector<int32_t>& counts, std::vector<int64_t>& dp, std::vector<int32_t>& arg) {
  const auto t0 = std::chrono::steady_clock::now();
  order_runs(runs, n, method, ord, sizes, counts, dp, arg);
  L.order_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t c0 = int64_t(ct) * L.tile_cols;
  const int64_t first_slot = int64_t(L.cols.size());
  int pos = 0;
  for (const int32_t size : sizes) {
    int32_t width = 0;
    for (int l = 0; l < size; ++l) width = std::max(width, runs[ord[pos + l]].len);
    const int64_t off = int64_t(L.cols.size());
    L.cols.resize(off + int64_t(kGroup) * width, kPadCol);
    L.src.resize(off + int64_t(kGroup) * width, -1);
    for (int l = 0; l < kGroup; ++l) {
      if (l >= size) {
        L.group_rows.push_back(-1);
        L.group_slot.push_back(-1);
        continue;
      }
      const Run& r = runs[ord[pos + l]];
      L.group_rows.push_back(r.row);
      L.group_slot.push_back(r.slot);
      // Jagged-diagonal interleave: element j of lane l at j·32 + l, so the 32 lanes of a warp
      // read 32 consecutive slots at every step j.
      for (int32_t j = 0; j < r.len; ++j) {
        L.cols[off + int64_t(j) * kGroup + l] = uint16_t(int64_t(indices[r.start + j]) - c0);
        L.src[off + int64_t(j) * kGroup + l] = r.start + j;
      }
    }
    L.group_width.push_back(width);
    L.group_offset.push_back(int64_t(L.cols.size()));
    pos += size;
  }
  L.tile_coords.push_back(tr);
  L.tile_coords.push_back(ct);
  L.tile_group_ptr.push_back(int32_t(L.group_width.size()));
  L.tile_work.push_back(int64_t(L.cols.size()) - first_slot);
}

// Schedule order: tiles by descending work bucket (counting sort again, O(tiles)), so the fixed
// round-robin part takes the heavy tiles and the atomic counter hands out the light tail.
void schedule(Layout& L) {
  const int64_t n = int64_t(L.tile_work.size());
  std::vector<int64_t> counts(kNumKeys + 1, 0);
  for (int64_t t = 0; t < n; ++t) ++counts[length_key(L.tile_work[t])];
  int64_t pos = 0;
  for (int k = kNumKeys - 1; k >= 0; --k) {
    const int64_t c = counts[k];
    counts[k] = pos;
    pos += c;
  }
  L.tile_order.assign(n, 0);
  for (int64_t t = 0; t < n; ++t) L.tile_order[counts[length_key(L.tile_work[t])]++] = int32_t(t);
}

}  // namespace

template <typename Idx>
Layout build(const int64_t* indptr, const Idx* indices, int64_t n_rows, int64_t n_cols,
             TileShape tiles, Method method) {
  Layout L;
  L.n_rows = n_rows;
  L.n_cols = n_cols;
  L.nnz = n_rows > 0 ? indptr[n_rows] : 0;
  L.tile_rows = tiles.rows;
  L.tile_cols = tiles.cols;
  L.tile_group_ptr.push_back(0);
  L.group_offset.push_back(0);
  L.multi_ptr.push_back(0);
  L.cols.reserve(size_t(L.nnz + L.nnz / 4 + 64));
  L.src.reserve(size_t(L.nnz + L.nnz / 4 + 64));

  const int64_t n_ct = n_cols > 0 ? (n_cols + tiles.cols - 1) / tiles.cols : 0;
  std::vector<int64_t> cnt(size_t(n_ct), 0);  // runs per column tile in this tile row
  std::vector<int32_t> touched;
  std::vector<Run> runs, bucketed, tile_pieces;
  std::vector<int32_t> pieces, used, chunk;
  std::vector<int64_t> slot_base;
  std::vector<int32_t> ord, sizes, counts(kNumKeys, 0), arg;
  std::vector<int64_t> dp;

  for (int64_t r0 = 0; r0 < n_rows; r0 += tiles.rows) {
    const int64_t r1 = std::min(n_rows, r0 + tiles.rows);
    runs.clear();
    touched.clear();
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t p = indptr[r], end = indptr[r + 1]; p < end;) {
        const int64_t ct = int64_t(indices[p]) / tiles.cols;
        const int64_t lim = (ct + 1) * tiles.cols;
        int64_t q = p + 1;
        while (q < end && int64_t(indices[q]) < lim) ++q;
        runs.push_back(Run{p, int32_t(r), int32_t(q - p), int32_t(ct), -1});
        if (cnt[ct]++ == 0) touched.push_back(int32_t(ct));
        p = q;
      }
    }
    // Counting sort of the runs by column tile (rows stay ascending within a tile).
    std::sort(touched.begin(), touched.end());
    int64_t pos = 0;
    for (const int32_t ct : touched) {
      const int64_t c = cnt[ct];
      cnt[ct] = pos;
      pos += c;
    }
    bucketed.resize(runs.size());
    for (const Run& r : runs) bucketed[size_t(cnt[r.ct]++)] = r;
    // Piece length per tile and pieces per row: a row split into k pieces (over column tiles or
    // within one) gets k partial slots, summed by the reduction in column order.
    const int64_t h = r1 - r0;
    pieces.assign(size_t(h), 0);
    used.assign(size_t(h), 0);
    slot_base.assign(size_t(h), -1);
    chunk.resize(touched.size());
    for (size_t i = 0, a = 0; i < touched.size(); ++i) {
      const size_t b = size_t(cnt[touched[i]]);
      chunk[i] = piece_length(bucketed.data() + a, int(b - a));
      for (size_t k = a; k < b; ++k)
        pieces[bucketed[k].row - r0] += (bucketed[k].len + chunk[i] - 1) / chunk[i];
      a = b;
    }
    for (int64_t lr = 0; lr < h; ++lr) {
      if (pieces[lr] < 2) continue;
      slot_base[lr] = L.multi_ptr.back();
      L.multi_rows.push_back(int32_t(r0 + lr));
      L.multi_ptr.push_back(L.multi_ptr.back() + pieces[lr]);
    }
    for (size_t i = 0, a = 0; i < touched.size(); ++i) {
      const int32_t ct = touched[i];
      const size_t b = size_t(cnt[ct]);
      tile_pieces.clear();
      for (size_t k = a; k < b; ++k) {
        const Run& r = bucketed[k];
        const int64_t lr = r.row - r0;
        for (int32_t s = 0; s < r.len; s += chunk[i]) {
          const int32_t slot = slot_base[lr] < 0 ? -1 : int32_t(slot_base[lr] + used[lr]++);
          tile_pieces.push_back(Run{r.start + s, r.row, std::min(chunk[i], r.len - s), ct, slot});
        }
      }
      emit_tile(L, indices, tile_pieces.data(), int(tile_pieces.size()), int32_t(r0 / tiles.rows),
                ct, method, ord, sizes, counts, dp, arg);
      cnt[ct] = 0;
      a = b;
    }
  }
  schedule(L);
  for (int64_t r = 0; r < n_rows; ++r)
    if (indptr[r + 1] == indptr[r]) L.empty_rows.push_back(int32_t(r));
  return L;
}

template <typename Idx>
int64_t tall_tile_rows(const int64_t* indptr, const Idx* indices, int64_t n_rows, TileShape t) {
  if (t.rows < 1024 || n_rows <= t.rows) return t.rows;  // already ~4096 a tile, or one tile tall
  const int64_t nnz = indptr[n_rows];
  int64_t max_ct = 0;
  for (int64_t p = 0; p < nnz; ++p) max_ct = std::max(max_ct, int64_t(indices[p]) / t.cols);
  std::vector<int64_t> stamp(size_t(max_ct + 1), -1);  // last tile row that touched each column tile
  int64_t occupied = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t tr = r / t.rows;
    for (int64_t p = indptr[r]; p < indptr[r + 1]; ++p) {
      int64_t& s = stamp[size_t(int64_t(indices[p]) / t.cols)];
      if (s != tr) s = tr, ++occupied;
    }
  }
  if (occupied == 0) return t.rows;
  const double mean = double(nnz) / double(occupied);
  const int64_t fit = ((n_rows + kGroup - 1) / kGroup) * kGroup;
  int64_t r = t.rows;
  while (2 * r <= kMaxTileRows && r < fit && mean * double(2 * r / t.rows) <= 4096.0 &&
         occupied / (2 * r / t.rows) >= kMinTilesTall)
    r *= 2;
  return std::min(r, fit);
}

template int64_t tall_tile_rows<int32_t>(const int64_t*, const int32_t*, int64_t, TileShape);
template int64_t tall_tile_rows<int64_t>(const int64_t*, const int64_t*, int64_t, TileShape);
template Layout build<int32_t>(const int64_t*, const int32_t*, int64_t, int64_t, TileShape, Method);
template Layout build<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, TileShape, Method);

}  // namespace hbp
}  // namespace bitfuse
