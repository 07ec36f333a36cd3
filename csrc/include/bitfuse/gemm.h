// The tensor-core GEMM (M >= 16) of csrc/cuda/gemm.cu: its arguments, tile geometry, shared-memory
// layout, the copy plan of one pipeline stage, class/group index math and the epilogue. All of it
// is __host__ __device__ and shared with the CPU twin `_C.gemm_host` (csrc/host/gemm_host.cpp),
// which runs these functions over an emulated shared memory; tests/test_cuda_gemm_host.py checks
// the twin against the torch reference. Semantics are the GEMV's (gemv.h):
//   y = x·(Ŵ_b + R̂)ᵀ + t·L_upᵀ + extra + bias,  fp32 accumulation, cast to x's dtype, stored
//   through perm (out[:, perm[i]] = packed row i); t and extra are computed by the caller.
//
// Layout decisions (why):
//  * Block tile BM × BN × BK, warps WM × WN × WK. A warp owns a WTM × WTN output tile of
//    (WTM/16) × (WTN/8) mma tiles and, when WK > 1, every WK-th 32-column run of each k tile
//    (split-K inside the block, summed through shared memory in warp order at the end: fixed
//    order, no atomics). The small-M tiles use WM = 1 so every weight is decoded by exactly one
//    warp; the large-M tiles split M across 2 warps to halve the A (ldmatrix) traffic per mma.
//  * Block N tiles never straddle a bit class: the grid's N tiles are numbered class by class
//    (class_tile), each class's last tile is partial. The bit width is then uniform per block and
//    the block switches once into a BITS-specialised body; class boundaries need no alignment at
//    all (FORMAT.md §4 makes them multiples of 16 or 64, which only saves partial tiles).
//  * x tile: BM × BK activations, cp.async 16-byte chunks of the rows < M (x_chunks: rows past M
//    are not copied at all, their outputs are never stored), zero-filled past K (so padding
//    columns of Ŵ meet x = 0), XOR-swizzled for conflict-free ldmatrix (mma_tile.h).
//  * Weight tile: BN rows × BK codes as raw words (BK·b/32 words a row), 16-byte cp.async when
//    the class's rows allow it, else 4-byte; row stride padded by 4 words when the row length is
//    a multiple of 8 words so the 8 rows of one fragment (lanes g = 0..7) hit distinct banks.
//    Zero-filled past the row's end (k_pad) and past the class's last row: Ŵ = 0·0 + 0 there.
//  * scales / zeros / α: fp16 (n, G) rows are only 2-byte aligned, so each row's window of the
//    groups a k tile needs is staged as the covering aligned 32-bit words (SW of them), read back
//    with the window's parity (window_index). Residual planes: BK/32 words a row.
//  * Rows without a residual, and layers without one, read α = 0 and sign 0: Ŵ + (−0) = Ŵ.
//  * Low-rank up-projection (t·L_upᵀ) in the epilogue from shared memory: lr_up rows staged
//    once per block and t rows once per 16-row tile of x (in chunks of LR_CHUNK columns of r
//    when r is larger), lr_up rows padded to an odd word count (conflict-free), sums in
//    fused_epilogue's exact order; see the section "Low-rank up-projection" below.
//  * Split-K across blocks (small grids; S from gemm_config.h plan_split): cut at k-tile
//    boundaries, fp32 partials (S, m, n) in packed row order, reduced in the order s = 0..S-1 by
//    the block that counts last; the section at split_range says why each choice.
#pragma once

#include <cstdint>
#include <string>

#include "bitfuse/epilogue.h"
#include "bitfuse/exact_codes.h"
#include "bitfuse/format.h"
#include "bitfuse/mma_tile.h"

namespace bitfuse {
namespace gemm {

constexpr int kSmallMaxM = 64;  // M <= 64 runs the arch's small-M tile (gemm_config.h)
constexpr int kSkinnyMaxM = 16; // M <= 16 runs its skinny tile (section "Skinny tile")

BF_HD constexpr int imax(int a, int b) { return a > b ? a : b; }

template <int BM_, int BN_, int BK_, int WM_, int WN_, int WK_, int STAGES_, bool SWAP_ = false>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WM = WM_, WN = WN_, WK = WK_, STAGES = STAGES_;
  static constexpr int WARPS = WM * WN * WK, THREADS = 32 * WARPS;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // one warp's output tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;   // its m16 and n8 mma tiles
  static constexpr int ACC = MT * NT * 4;             // fp32 accumulators a lane holds
  // SWAP: the skinny tile (section "Skinny tile" below): the warp's WTN packed rows are the A
  // operand (MW m16 tiles of exact codes) and its WTM x rows the B operand (NX n8 tiles), the
  // scales applied per group. Accumulators acc[A1][A2][4]: [MT][NT] of (x rows × packed rows)
  // mma tiles, or with SWAP [MW][NX] of (packed rows × x rows) ones; ACC floats either way.
  static constexpr bool SWAP = SWAP_;
  static constexpr int MW = WTN / 16, NX = WTM / 8;
  static constexpr int A1 = SWAP ? MW : MT, A2 = SWAP ? NX : NT;
  static constexpr int RUNS = BK / 32;                // 32-column runs in a k tile
  static constexpr int RUNS_PER_WARP = RUNS / WK;
  static constexpr int A_CHUNKS = BM * BK / 8;        // 16-byte chunks of the x tile

  // Weight words a row per k tile, and their shared-memory row stride (+4 words when the row is
  // a multiple of 8 words: the 8 rows g of a fragment then start 4 banks apart instead of 0 / 16).
  BF_HD static constexpr int b_words(int bits) { return BK * bits / 32; }
  BF_HD static constexpr int b_stride(int bits) {
    return b_words(bits) % 8 == 0 ? b_words(bits) + 4 : b_words(bits);
  }
  static constexpr int B_STRIDE_MAX = imax(b_stride(4), imax(b_stride(3), b_stride(2)));
  // Words of a per-group window: the parity half + up to RUNS groups (g = 32) -> RUNS + 1 halves.
  // The skinny tile stages none (it reads s, m, α from global memory: section "Skinny tile").
  static constexpr int SW = SWAP_ ? 0 : (RUNS + 2) / 2;

  // One pipeline stage, byte offsets (every region a multiple of 16 bytes).
  static constexpr int A_OFF = 0;
  static constexpr int B_OFF = A_OFF + BM * BK * 2;
  static constexpr int S_OFF = B_OFF + BN * B_STRIDE_MAX * 4;
  static constexpr int Z_OFF = S_OFF + BN * SW * 4;
  static constexpr int AL_OFF = Z_OFF + BN * SW * 4;
  static constexpr int P_OFF = AL_OFF + BN * SW * 4;
  static constexpr int STAGE_BYTES = P_OFF + BN * RUNS * 4;
  // After the stages: res_index of the block's BN rows.
  static constexpr int RI_OFF = STAGES * STAGE_BYTES;
  static constexpr int SMEM_BYTES = RI_OFF + BN * 4;
  // After the main loop the stages are reused: the split-K partials of warps wk >= 1, then one
  // 16 × WTN fp32 staging tile per output warp for the epilogue (rows padded by 8 floats so the
  // float2 writes of a half-warp hit distinct banks).
  static constexpr int RED_FLOATS = (WK - 1) * WM * WN * ACC * 32;
  static constexpr int EPI_LD = WTN + 8;
  static constexpr int EPI_OFF = RED_FLOATS * 4;
  static constexpr int EPI_FLOATS = 16 * EPI_LD;  // per output warp

  // Low-rank up-projection (t·L_upᵀ, see "Low-rank up-projection" below), also in the reused
  // stages, after the epilogue tiles: per chunk of LR_CHUNK columns of r, the t rows of one m16
  // tile index (16 x rows per warp row: 16·WM rows, fp32, row stride LR_T_LD floats) and the
  // lr_up rows of the block's BN packed rows (fp16 bits, row stride LR_UP_LD halves). LR_CHUNK is
  // the largest multiple of 8 that fits what the stages leave (88 / 272 / 400 for the small tiles
  // of sm_86-89 / sm_87 / sm_90, 72 / 152 / 216 for the large ones): r <= LR_CHUNK, the usual
  // case, is one chunk.
  //  * Lane l of a warp sums LR_QB = 4 x rows × LR_PB packed rows (lr_sums): the x rows
  //    4·(l / LR_LG) + 0..3 of the warp's share, the packed rows l % LR_LG + LR_LG·p. Each t value
  //    it reads serves LR_PB sums and each lr_up value 4, which keeps shared-memory traffic at
  //    half a value per fma (one x row or one packed row per lane would be more than one).
  //  * LR_T_LD = LR_CHUNK + 2 floats (≡ 2 mod 8): t is read two columns at a time (8-byte loads,
  //    so the stride is even), and the LR_PB rows a warp reads at once are 4 apart: 4·LR_T_LD ≡ 8
  //    (mod 32) words puts them in distinct banks (0, 8, 16, 24). A multiple of 8 would put all
  //    of them in one bank group: an LR_PB-way conflict.
  //  * LR_UP_LD = LR_CHUNK + 2 halves, an odd number of 32-bit words: a warp reads LR_LG
  //    consecutive lr_up rows at the same column (its lanes in other row groups read the same
  //    words: broadcast), and an odd word stride puts them in distinct banks.
  static constexpr int LR_OFF = EPI_OFF + WM * WN * EPI_FLOATS * 4;
  static constexpr int LR_CHUNK =
      ((RI_OFF - LR_OFF - 128 * WM - 4 * BN) / (64 * WM + 2 * BN)) / 8 * 8;
  static constexpr int LR_T_LD = LR_CHUNK + 2;
  static constexpr int LR_UP_LD = LR_CHUNK + 2;
  static constexpr int LR_T_OFF = LR_OFF;
  static constexpr int LR_UP_OFF = LR_T_OFF + 16 * WM * LR_T_LD * 4;
  // Rows of each m16 tile a warp sums: the WK warps of one output warp position share them (the
  // warps-k >= 1 would otherwise idle in the epilogue); a lane's register tile (see above).
  static constexpr int LR_QS = 16 / WK;
  static constexpr int LR_QB = 4;
  static constexpr int LR_PB = LR_QS / LR_QB;
  static constexpr int LR_LG = 32 / LR_PB;

  static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "warp tiles are whole mma tiles");
  static_assert(LR_CHUNK >= 8 && LR_UP_OFF % 16 == 0 && LR_UP_OFF + BN * LR_UP_LD * 2 <= RI_OFF,
                "the low-rank staging fits in the stage buffers after the epilogue tiles");
  static_assert((LR_UP_LD / 2) % 2 == 1, "lr_up rows are an odd number of words (banks)");
  static_assert(LR_T_LD % 8 == 2, "t rows 4 apart are 8 banks apart, rows 8-byte aligned");
  static_assert(WTN == 32, "a warp's low-rank sums cover its 32 packed rows");
  static_assert(LR_QS % LR_QB == 0 && 32 % LR_PB == 0 && LR_PB <= 4,
                "a warp's rows of an m16 tile are whole lane tiles");
  static_assert(BK % 32 == 0 && RUNS % WK == 0, "k tiles are whole runs, shared evenly by WK");
  static_assert(BK == 32 || BK % 64 == 0, "the x swizzle handles 4 or a multiple of 8 chunks a row");
  static_assert(STAGES >= 2, "a pipeline has at least two stages");
  static_assert(STAGE_BYTES % 16 == 0, "stages stay 16-byte aligned");
  static_assert(!SWAP || (WTN % 16 == 0 && WTM % 16 == 0 && BK % 128 == 0 && (WK & (WK - 1)) == 0),
                "a skinny warp tile is whole m16 tiles of packed rows and of x rows; its k tiles "
                "are whole groups of every size it takes (BK a multiple of 128); WK a power of 2");
  static_assert(EPI_OFF + WM * WN * EPI_FLOATS * 4 <= RI_OFF,
                "split-K partials and epilogue tiles fit in the stage buffers");
};

struct Args {
  const void* x;              // (m, lda) fp16 / bf16; columns >= k are never read
  void* out;                  // (m, n) same dtype, original output order
  const uint32_t* qweight;    // FORMAT.md §3
  const uint16_t* scales;     // (n, G) fp16 bits, 4-byte aligned buffer; null with compact
  const uint16_t* zeros;      // (n, G) fp16 bits, 4-byte aligned buffer; null with compact
  const uint8_t* scale_codes;  // (n, G) compact codes (FORMAT.md §5.1), or null: fp16 pairs
  const uint8_t* zero_codes;   // (n, G)
  const uint16_t* scale_rows;  // (n, 3) fp16 row factors
  const int32_t* perm;        // (n) or null
  const int32_t* res_index;   // (n) or null (no residual branch)
  const uint32_t* res_plane;  // (nr, k_pad/32)
  const uint16_t* res_alpha;  // (nr, G) fp16 bits, 4-byte aligned buffer
  const float* t;             // (m, r) fp32 or null
  const uint16_t* lr_up;      // (n, r) fp16 bits, packed row order; with t
  const float* extra;         // (m, n) fp32, original order, or null
  const float* bias;          // (n) fp32, original order, or null
  ClassTable classes;
  int64_t class_word[kMaxClasses];  // first word of each class in qweight
  int class_first[kMaxClasses];     // first packed row of each class
  int class_tile[kMaxClasses + 1];  // first block N tile of each class; [count] = all N tiles
  int class_vec[kMaxClasses];       // 1: the class's weight rows are copied in 16-byte chunks
  int64_t lda;                      // x row stride in elements: >= k, a multiple of 8
  int m, n, k, k_pad, group_size, r, nr;
  // Split-K across blocks (gemm_config.h plan_split): S = split K ranges, grid.z = S. With S > 1
  // each block stores its fp32 partial tile to `partial` and the last block of each output tile
  // to arrive (counted in `counters`) sums the S partials in order s = 0..S-1 and runs the
  // epilogue. split <= 1: no workspace, every block runs the epilogue itself (as before split-K).
  float* partial;  // (split, m, n) fp32, packed row order; with split > 1
  int* counters;   // one per (N tile, M tile), 0 between launches (the last block resets its own)
  int split;
  // Tile choice only (the launcher's, not the kernel's): 1 keeps M <= kSkinnyMaxM off the skinny
  // tile (tests, and the benchmark that times both tiles).
  int no_skinny;
};
// The group size select_tile is to see for a's layer: 0 (taken by no skinny tile) with no_skinny.
inline int tile_group_size(const Args& a) { return a.no_skinny ? 0 : a.group_size; }

// The skinny tile indexes a layer's groups with 32 bits (skinny_raw_params): a layer of 2^31
// groups or more (2^38 weights at g128) is refused rather than read wrong. Empty: fine.
inline std::string group_index_error(const Args& a) {
  const int64_t G = a.group_size > 0 ? a.k_pad / a.group_size : 0;
  const int64_t rows = a.n > a.nr ? a.n : a.nr;
  if (rows * G >= (int64_t(1) << 31))
    return ": " + std::to_string(rows) + " rows x " + std::to_string(G) +
           " groups exceed the 2^31 group indices of the GEMM's 32-bit scale indexing";
  // ... and the skinny tile's 32-bit copy sources (SkinnyCopies): its packed words (at most 4
  // bits a weight; x has at most 16 rows there)
  const int64_t words = int64_t(a.n) * a.k_pad / 8;
  if (words >= (int64_t(1) << 31))
    return ": the layer's " + std::to_string(words) + " packed words exceed the GEMM's 32-bit indices";
  return "";
}

// Class geometry of a launch with tile T: first row / word / N tile of every class and whether
// its rows can be copied with 16-byte cp.async (the buffer, the class start, the row length and
// the per-k-tile span all multiples of 16 bytes). qweight_addr: the device address (0 on the host).
template <class T>
inline void plan_classes(Args& a, uint64_t qweight_addr) {
  int first = 0, tiles = 0;
  for (int c = 0; c < a.classes.count; ++c) {
    const int bits = a.classes.bits[c], rows = a.classes.rows[c];
    a.class_first[c] = first;
    a.class_word[c] = class_word_offset(a.classes.bits, a.classes.rows, c, a.k_pad);
    a.class_tile[c] = tiles;
    a.class_vec[c] = qweight_addr % 16 == 0 && a.class_word[c] % 4 == 0 &&
                     words_per_row(bits, a.k_pad) % 4 == 0 && T::b_words(bits) % 4 == 0;
    tiles += (rows + T::BN - 1) / T::BN;
    first += rows;
  }
  a.class_tile[a.classes.count] = tiles;
}

// The block's place: its class, packed rows [row0, row_end) and first x row m0.
struct BlockTile {
  int cls, row0, row_end, m0;
};
BF_HD inline BlockTile block_tile(const Args& a, int bn, int bm, int tile_n, int tile_m) {
  int c = 0;
  while (c + 1 < a.classes.count && tile_n >= a.class_tile[c + 1]) ++c;  // skips empty classes
  BlockTile b;
  b.cls = c;
  b.row0 = a.class_first[c] + (tile_n - a.class_tile[c]) * bn;
  b.row_end = a.class_first[c] + a.classes.rows[c];
  b.m0 = tile_m * bm;
  return b;
}

// ---------------------------------------------------------------------------------------------
// Split-K across blocks (S = a.split > 1): block (tile_n, tile_m, s) computes k tiles
// [kt0, kt1) of split_range(ktiles, S, s).
//  * The cut is at k-tile boundaries, so every split is whole 32-column runs and the copy plan
//    below is untouched: the scale / offset / α windows are computed per k tile from kt·BK, which
//    is the same arithmetic whether kt is the block's first k tile or not (a group that straddles
//    two splits is simply staged by both). No group alignment is needed.
//  * Balanced: kt0 = s·ktiles / S, so split sizes differ by at most one k tile, and plan_split
//    never picks S above ktiles / STAGES (each split keeps at least STAGES k tiles).
//  * Partials: (S, m, n) fp32, x row major, packed rows fastest. The epilogue's staging tile
//    already hands a warp 32 consecutive packed rows of one x row, so a partial store is one
//    coalesced 128-byte line; the reducing block reads them back the same way. Packed (not
//    output) order: the inverse permutation is applied once, by the reducing block's store.
//    Only rows < m exist in it (BM = 64 tiles at m = 16 would otherwise carry 4x the traffic).
// ---------------------------------------------------------------------------------------------
struct KRange {
  int s, kt0, kt1;  // split index, k tiles [kt0, kt1)
};
BF_HD inline KRange split_range(int ktiles, int split, int s) {
  KRange r;
  r.s = s;
  r.kt0 = split > 1 ? int(int64_t(s) * ktiles / split) : 0;
  r.kt1 = split > 1 ? int(int64_t(s + 1) * ktiles / split) : ktiles;
  return r;
}
BF_HD inline int64_t partial_index(const Args& a, int s, int mi, int row) {
  return (int64_t(s) * a.m + mi) * a.n + row;
}
// Counter of output tile (tile_n, tile_m) in a grid of n_tiles N tiles.
BF_HD inline int split_counter(int tile_n, int tile_m, int n_tiles) { return tile_m * n_tiles + tile_n; }
// The dense product of output (mi, row): the S partials summed in the fixed order s = 0, 1, ..,
// whichever block happens to reduce (so the result does not depend on the blocks' arrival order).
// On the device the loads bypass L1 (ld.global.cg): the partials were written by other SMs.
BF_HD inline float split_sum(const Args& a, int mi, int row) {
  float v = 0.0f;
  for (int s = 0; s < a.split; ++s) {
    const float* p = a.partial + partial_index(a, s, mi, row);
#if defined(__CUDA_ARCH__)
    v += __ldcg(p);
#else
    v += *p;
#endif
  }
  return v;
}

// A warp's place in the block: warps [wk][wm][wn], wn fastest.
struct WarpPos {
  int wm, wn, wk, wmn;
};
template <class T>
BF_HD inline WarpPos warp_pos(int warp) {
  WarpPos p;
  p.wk = warp / (T::WM * T::WN);
  p.wmn = warp % (T::WM * T::WN);
  p.wm = p.wmn / T::WN;
  p.wn = p.wmn % T::WN;
  return p;
}
// Run (0..RUNS-1) of a k tile that warp-k index wk takes as its j-th.
template <class T>
BF_HD constexpr int warp_run(int wk, int j) { return wk + T::WK * j; }
// m16 tiles of warp row wm that hold at least one x row < m: the others skip ldmatrix and mma.
template <class T>
BF_HD inline int warp_m_tiles(const Args& a, const BlockTile& bt, int wm) {
  const int left = a.m - bt.m0 - wm * T::WTM;
  return left <= 0 ? 0 : left >= T::WTM ? T::MT : (left + 15) / 16;
}
// Tile-local row of the B fragment of n8 tile j for `lane`, and of accumulator element e.
template <class T>
BF_HD constexpr int b_tile_row(const WarpPos& w, int j, int lane) {
  return w.wn * T::WTN + 8 * j + mma::group_id(lane);
}
// The epilogue goes one m16 tile i at a time through the warp's staging tile (16 × WTN fp32):
// accumulator e of n8 tile j of lane is element (c_row, 8j + c_col) there (mma_tile.h: the ISA's
// C layout); then output o = lane, lane + 32, .. of the staging tile is x row
// bt.m0 + w.wm·WTM + 16i + o / WTN and packed row bt.row0 + w.wn·WTN + o % WTN, so a warp's 32
// stores go to 32 consecutive packed rows of one x row (coalesced when perm is the identity).
template <class T>
BF_HD constexpr int epi_slot(int j, int lane, int e) {
  return mma::c_row(lane, e) * T::EPI_LD + 8 * j + mma::c_col(lane, e);
}
template <class T>
BF_HD constexpr int epi_x_row(const WarpPos& w, int i, int o) {  // x row in the block tile
  return w.wm * T::WTM + 16 * i + o / T::WTN;
}
template <class T>
BF_HD constexpr int epi_packed_row(const WarpPos& w, int o) {  // packed row in the block tile
  return w.wn * T::WTN + o % T::WTN;
}
template <class T>
BF_HD constexpr int epi_src(int o) {  // where output o sits in the staging tile
  return (o / T::WTN) * T::EPI_LD + o % T::WTN;
}
// Stage byte offset of the address lane gives to the ldmatrix.x4 of m16 tile i, k16 step s of run
// rho: row (tile) w.wm·WTM + 16i + (lane & 15), column 32·rho + 16·s + 8·(lane >> 4).
template <class T>
BF_HD constexpr int a_ldsm_offset(const WarpPos& w, int i, int rho, int s, int lane) {
  return T::A_OFF + mma::a_tile_offset(w.wm * T::WTM + 16 * i + mma::ldsm_row(lane),
                                       32 * rho + 16 * s + mma::ldsm_col(lane), T::BK);
}
// Float index of accumulator acc_i of lane in the split-K scratch of warp-k index wk >= 1:
// lane-contiguous, so the writes and the summing reads are conflict-free.
template <class T>
BF_HD constexpr int red_index(int wk, int wmn, int acc_i, int lane) {
  return (((wk - 1) * T::WM * T::WN + wmn) * T::ACC + acc_i) * 32 + lane;
}

// ---------------------------------------------------------------------------------------------
// The copy plan of one stage (k tile kt). Every copy is one cp.async: `bytes` leading bytes come
// from `src` (an element index: activations for x, 32-bit words for everything else), the rest of
// the 16- or 4-byte destination is zero-filled; bytes == 0 reads nothing (src is then 0).
// ---------------------------------------------------------------------------------------------
struct Copy {
  int smem;     // byte offset inside the stage
  int64_t src;  // element / word index into the source tensor
  int bytes;    // 0..16 (x, 16-byte weight chunks) or 0..4 (4-byte words)
};

// x chunk q (0..A_CHUNKS-1): row q / (BK/8), columns 8·(q % (BK/8)) .. +8 of the k tile. Only
// the chunks of rows < M are copied (x_chunks): a row past M is never read by a copy nor
// zero-filled, its stage row holds whatever it held, and that reaches only its own products
// (an mma row of A = x, or column of B = x in the skinny tile, is one output row), outputs
// that are never stored. Zero-filling them cost a copy each (48 of the 64 rows of a small tile
// at M = 16). Columns past K are zero-filled: the padding columns of Ŵ are m, not 0.
template <class T>
BF_HD inline int x_chunks(const Args& a, const BlockTile& bt) {
  const int rows = a.m - bt.m0 < T::BM ? a.m - bt.m0 : T::BM;
  return rows * (T::BK / 8);
}
template <class T>
BF_HD inline Copy a_copy(const Args& a, const BlockTile& bt, int kt, int q) {
  const int r = q / (T::BK / 8), c8 = 8 * (q % (T::BK / 8));
  const int m = bt.m0 + r, col = kt * T::BK + c8;
  Copy cp;
  cp.smem = T::A_OFF + mma::a_tile_offset(r, c8, T::BK);
  const int left = a.k - col;  // real columns from col on
  cp.bytes = (m < a.m && left > 0) ? (left >= 8 ? 16 : 2 * left) : 0;
  cp.src = cp.bytes ? int64_t(m) * a.lda + col : 0;
  return cp;
}

// Weight copies of a stage: BN rows × (W/4 16-byte chunks, or W 4-byte words).
template <class T, int BITS>
BF_HD constexpr int b_copies(bool vec) {
  return T::BN * (vec ? T::b_words(BITS) / 4 : T::b_words(BITS));
}
template <class T, int BITS>
BF_HD inline Copy b_copy(const Args& a, const BlockTile& bt, int kt, int q, bool vec) {
  constexpr int W = T::b_words(BITS);
  const int unit = vec ? 4 : 1, per = W / unit;  // words a copy, copies a row
  const int rr = q / per, u = q % per;
  const int row = bt.row0 + rr;
  const int wpr = words_per_row(BITS, a.k_pad);
  const int wi = kt * W + u * unit;  // word inside the packed row
  Copy cp;
  cp.smem = T::B_OFF + (rr * T::b_stride(BITS) + u * unit) * 4;
  const int left = wpr - wi;
  cp.bytes = (row < bt.row_end && left > 0) ? 4 * (left < unit ? left : unit) : 0;
  cp.src = cp.bytes ? a.class_word[bt.cls] + int64_t(row - a.class_first[bt.cls]) * wpr + wi : 0;
  return cp;
}

// First group a k tile touches.
BF_HD inline int tile_group(const Args& a, int kt, int bk) { return kt * bk / a.group_size; }

// Word u (0..SW-1) of the window of tensor row trow (packed row for scales/zeros, residual row for
// α; -1 = none: zero-filled) that k tile kt needs, into region `off` at tile row rr. The tensor
// holds total_halves fp16 values and is read as 32-bit words; the last word may be half outside.
template <class T>
BF_HD inline Copy group_copy(const Args& a, int off, int rr, int u, int trow,
                             int64_t total_halves, int kt) {
  Copy cp;
  cp.smem = off + (rr * T::SW + u) * 4;
  cp.bytes = 0;
  cp.src = 0;
  if (trow < 0) return cp;
  const int G = a.k_pad / a.group_size;
  const int64_t word = ((int64_t(trow) * G + tile_group(a, kt, T::BK)) >> 1) + u;
  const int64_t left = 2 * total_halves - 4 * word;  // bytes of the tensor from this word on
  cp.bytes = left <= 0 ? 0 : left >= 4 ? 4 : int(left);
  cp.src = cp.bytes ? word : 0;
  return cp;
}
// Half index, inside that window, of the group of column k (k inside k tile kt).
BF_HD inline int window_index(const Args& a, int trow, int kt, int bk, int k) {
  const int G = a.k_pad / a.group_size, gf = tile_group(a, kt, bk);
  return int((int64_t(trow) * G + gf) & 1) + (k / a.group_size - gf);
}
// Residual plane word u (0..RUNS-1) of residual row ri (-1: zero-filled) for k tile kt.
template <class T>
BF_HD inline Copy plane_copy(const Args& a, int rr, int u, int ri, int kt) {
  const int w = kt * T::RUNS + u, kw = a.k_pad / 32;
  Copy cp;
  cp.smem = T::P_OFF + (rr * T::RUNS + u) * 4;
  cp.bytes = (ri >= 0 && w < kw) ? 4 : 0;
  cp.src = cp.bytes ? int64_t(ri) * kw + w : 0;
  return cp;
}

// Every copy of stage kt, the ones with index q = q0, q0 + step, ... of each kind: the kernel
// passes (threadIdx.x, THREADS) and issues cp.async in `copy`, the CPU twin passes (0, 1) and
// emulates it. copy(size, smem_offset, src_pointer, bytes) with size 16 or 4 bytes. s_ri: the
// residual rows of the block's BN rows (-1: none); res: the layer has a residual branch (else the
// α and plane regions are neither written nor read).
template <class T, int BITS, class F>
BF_HD inline void stage_copies(const Args& a, const BlockTile& bt, int kt, const int* s_ri, bool vec,
                               bool res, int q0, int step, F& copy) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int xq = x_chunks<T>(a, bt);
  for (int q = q0; q < xq; q += step) {
    const Copy c = a_copy<T>(a, bt, kt, q);
    copy(16, c.smem, x + c.src, c.bytes);
  }
  const int nb = b_copies<T, BITS>(vec);
  for (int q = q0; q < nb; q += step) {
    const Copy c = b_copy<T, BITS>(a, bt, kt, q, vec);
    copy(vec ? 16 : 4, c.smem, a.qweight + c.src, c.bytes);
  }
  const int64_t G = a.k_pad / a.group_size;
  const uint32_t* sc = reinterpret_cast<const uint32_t*>(a.scales);
  const uint32_t* zr = reinterpret_cast<const uint32_t*>(a.zeros);
  const uint32_t* al = reinterpret_cast<const uint32_t*>(a.res_alpha);
  // Compact scales are not staged: decode_b reads a row's two code bytes and its factors
  // straight from global memory (L1-cached; a byte window would need its own alignment rules).
  const bool stage_scales = a.scale_codes == nullptr;
  if constexpr (T::SW > 0) {  // (the skinny tile stages no windows)
    for (int q = q0; q < T::BN * T::SW; q += step) {
      const int rr = q / T::SW, u = q % T::SW;
      const int row = bt.row0 + rr < bt.row_end ? bt.row0 + rr : -1;
      Copy c;
      if (stage_scales) {
        c = group_copy<T>(a, T::S_OFF, rr, u, row, a.n * G, kt);
        copy(4, c.smem, sc + c.src, c.bytes);
        c = group_copy<T>(a, T::Z_OFF, rr, u, row, a.n * G, kt);
        copy(4, c.smem, zr + c.src, c.bytes);
      }
      if (res) {
        c = group_copy<T>(a, T::AL_OFF, rr, u, s_ri[rr], a.nr * G, kt);
        copy(4, c.smem, al + c.src, c.bytes);
      }
    }
  }
  if (res) {
    for (int q = q0; q < T::BN * T::RUNS; q += step) {
      const int rr = q / T::RUNS, u = q % T::RUNS;
      const Copy c = plane_copy<T>(a, rr, u, s_ri[rr], kt);
      copy(4, c.smem, a.res_plane + c.src, c.bytes);
    }
  }
}

// The skinny tile's copies of an interior k tile, hoisted (SkinnyCopies). stage_copies works
// each copy out from scratch: the row, the column, the bytes left before K or the row's end,
// a 64-bit source address, the zero-fill choice: about 24 SASS instructions a 16-byte copy (the
// 3 predicated-off LDS ptxas pads every cp.async with included), some 100 a thread a k tile,
// about 1.5 a weight at 4-bit in a tile that spends 3.4 a weight on its compute. In a k tile
// wholly inside K ((kt + 1)·BK <= k, every k tile but the last), every copy of a thread is the
// same as in the thread's previous k tile but for its source, which moves by a fixed stride:
// BK activations (x), BK·BITS/32 words (weights, 16-byte copies), RUNS words (residual plane);
// copies that read nothing (rows past M, the class's end, rows without a residual) stay so. So
// each thread takes its copies of the block's first k tile from the copy plan itself (a_copy,
// b_copy, plane_copy: one definition) and moves their sources by the strides; the other k tiles
// (and layers whose weight rows take 4-byte copies) keep stage_copies. The CPU twin issues the
// kernel's copies through this struct and checks that each interior k tile's copies are exactly
// stage_copies' ones.
template <class T, int BITS>
struct SkinnyCopies {
  static constexpr int XS = (T::A_CHUNKS + T::THREADS - 1) / T::THREADS;
  static constexpr int WS = (b_copies<T, BITS>(true) + T::THREADS - 1) / T::THREADS;
  static constexpr int PS = (T::BN * T::RUNS + T::THREADS - 1) / T::THREADS;
  static constexpr int W = T::b_words(BITS);
  // Per copy two 32-bit registers: the stage offset (-1: the thread has no such copy) and the
  // source's element index in its tensor for the next interior k tile (-1: zero-fill, reads
  // nothing). 32-bit indices: gemm_cuda refuses layers of 2^31 packed words or more
  // (group_index_error; the residual plane is smaller), and x of <= 16 rows stays far below.
  int xs[XS], ws[WS], ps[PS];
  int xi[XS], wi[WS], pi[PS];
  bool res;

  // Whether k tile kt is interior (every copy of it is a shifted copy of the block's first).
  BF_HD static bool interior(const Args& a, int kt) { return (kt + 1) * T::BK <= a.k; }

  // The copies of thread tid in k tile kt0 (the block's first; interior), from the copy plan.
  // Only for classes whose weight rows take 16-byte copies.
  BF_HD void init(const Args& a, const BlockTile& bt, int kt0, const int* s_ri, bool res_, int tid) {
    res = res_;
    const int xq = x_chunks<T>(a, bt);
    BF_UNROLL for (int j = 0; j < XS; ++j) {
      const int q = tid + j * T::THREADS;
      const Copy c = a_copy<T>(a, bt, kt0, q < xq ? q : 0);
      xs[j] = q < xq ? c.smem : -1, xi[j] = c.bytes ? int(c.src) : -1;
    }
    BF_UNROLL for (int j = 0; j < WS; ++j) {
      const int q = tid + j * T::THREADS;
      const bool in = q < b_copies<T, BITS>(true);
      const Copy c = b_copy<T, BITS>(a, bt, kt0, in ? q : 0, true);
      ws[j] = in ? c.smem : -1, wi[j] = c.bytes ? int(c.src) : -1;
    }
    BF_UNROLL for (int j = 0; j < PS; ++j) {
      const int q = tid + j * T::THREADS;
      const bool in = res && q < T::BN * T::RUNS;
      const int rr = in ? q / T::RUNS : 0, u = in ? q % T::RUNS : 0;
      const Copy c = plane_copy<T>(a, rr, u, in ? s_ri[rr] : -1, kt0);
      ps[j] = in ? c.smem : -1, pi[j] = c.bytes ? int(c.src) : -1;
    }
  }
  // The copies of the next interior k tile (called for kt0, kt0 + 1, .. in order), through
  // copy(size, smem, src, bytes) as stage_copies' are: the full copy, or 0 bytes from the
  // tensor's start (what stage_copies passes for a copy that reads nothing).
  template <class F>
  BF_HD void issue(const Args& a, F& copy) {
    const uint16_t* x = static_cast<const uint16_t*>(a.x);
    BF_UNROLL for (int j = 0; j < XS; ++j)
      if (xs[j] >= 0) copy(16, xs[j], x + (xi[j] < 0 ? 0 : xi[j]), xi[j] < 0 ? 0 : 16);
    BF_UNROLL for (int j = 0; j < WS; ++j)
      if (ws[j] >= 0) copy(16, ws[j], a.qweight + (wi[j] < 0 ? 0 : wi[j]), wi[j] < 0 ? 0 : 16);
    if (res) {
      BF_UNROLL for (int j = 0; j < PS; ++j)
        if (ps[j] >= 0) copy(4, ps[j], a.res_plane + (pi[j] < 0 ? 0 : pi[j]), pi[j] < 0 ? 0 : 4);
    }
    BF_UNROLL for (int j = 0; j < XS; ++j) xi[j] += xi[j] < 0 ? 0 : T::BK;
    BF_UNROLL for (int j = 0; j < WS; ++j) wi[j] += wi[j] < 0 ? 0 : W;
    BF_UNROLL for (int j = 0; j < PS; ++j) pi[j] += pi[j] < 0 ? 0 : T::RUNS;
  }
};

// The B registers of lane for run rho of stage kt, for each of the warp's NT n8 tiles:
// b[j][0..1] = (b0, b1) of the run's first k16 step, b[j][2..3] of the second. `stage` is the
// stage's shared memory (the kernel) or its emulation (the twin); s_ri as in stage_copies.
template <class T, int BITS, int DT>
BF_HD inline void decode_b(const Args& a, const BlockTile& bt, int kt, const char* stage,
                           const int* s_ri, const WarpPos& w, int lane, int rho, bool res,
                           uint32_t (&b)[T::NT][4]) {
  const uint32_t* sB = reinterpret_cast<const uint32_t*>(stage + T::B_OFF);
  const uint32_t* sS = reinterpret_cast<const uint32_t*>(stage + T::S_OFF);
  const uint32_t* sZ = reinterpret_cast<const uint32_t*>(stage + T::Z_OFF);
  const uint32_t* sA = reinterpret_cast<const uint32_t*>(stage + T::AL_OFF);
  const uint32_t* sP = reinterpret_cast<const uint32_t*>(stage + T::P_OFF);
  const int t = mma::thread_in_group(lane);
  const int k_run = kt * T::BK + 32 * rho;
  const int G = a.k_pad / a.group_size, g = k_run / a.group_size;  // for compact scales
  BF_UNROLL for (int j = 0; j < T::NT; ++j) {
    const int rr = b_tile_row<T>(w, j, lane);
    const int row = bt.row0 + rr;
    float scale = 0.0f, zero = 0.0f;  // rows past the class's end: Ŵ = 0·0 + 0, as staged
    if (a.scale_codes) {
      if (row < bt.row_end) group_params(a, row, G, g, scale, zero);
    } else {
      const int wi = window_index(a, row, kt, T::BK, k_run);
      scale = half_to_float(mma::window_half(sS + rr * T::SW, wi));
      zero = half_to_float(mma::window_half(sZ + rr * T::SW, wi));
    }
    uint32_t sign = 0;
    float alpha = 0.0f;
    if (res) {
      sign = (sP[rr * T::RUNS + rho] >> (8 * t)) & 0xFFu;  // byte t: the lane's slots 8t..8t+7
      alpha = half_to_float(
          mma::window_half(sA + rr * T::SW, window_index(a, s_ri[rr], kt, T::BK, k_run)));
    }
    mma::b_fragment<BITS, DT>(sB + rr * T::b_stride(BITS) + rho * BITS, t, scale, zero, res, sign,
                              alpha, b[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Skinny tile (T::SWAP; gemm_config.h uses it for M <= kSkinnyMaxM with group sizes 32/64/128).
//
// Why. At M <= 16 the GEMM is memory-bound, and the loop above spends most of its instructions
// on the weights, not on the mma: every weight is dequantized in fp32 (q·s + m, ± α) and rounded
// to x's dtype for its B fragment, 6.8 instructions a weight at W4 with one m16 tile of x
// (benchmarks/results/static/gemv_sass.md), over what an H100 (5.0) or an AGX Orin (6.5) can
// issue while streaming 4-bit weights at DRAM bandwidth. The tensor-core GEMV's factored form
// (bitfuse/exact_codes.h) costs a fraction of that, and the GEMM's block structure (BN packed rows
// share each staged x tile, the cp.async pipeline, split-K across blocks, the staged low-rank
// epilogue) is what the GEMV lacks at these M (its 16-row blocks re-read x from L2 for every 16
// packed rows: M·2 / (16·bits/8) times the weight bytes, 4x at M = 16 and 4 bits).
//
// So this tile computes yᵀ = W·xᵀ ("swap AB"): per warp, the WTN packed rows are MW m16 A tiles
// and the WTM x rows are NX n8 B tiles (BM = 16: NX = 2, every M <= 16 in one block row).
//  * A: lane (g, t) reads word lane_word(BITS, t) (and the 3-bit high-plane word 2) of run rho of
//    packed rows g and g + 8 of each m16 tile from the staged weight tile and decodes the exact
//    codes (exact::lane_codes): FORMAT.md §3.1's slot order is the A fragment, as in the GEMV.
//    The 8 rows g of one load sit b_stride words apart (the +4 padding), so the 32 lanes' words
//    fall in 32 distinct banks (or are broadcast where two lanes read one word): conflict-free
//    (the twin checks it).
//  * B: x rows are the n8 columns; a B register is two consecutive k of one x row, which is
//    exactly what ldmatrix (non-transposed) hands out of the row-major x tile: one ldmatrix.x4
//    per n8 tile and run gives (b0, b1) of both k16 steps (matrices = the run's 4 column chunks).
//    The x tile and its swizzle are the other tiles' (a_copy, a_tile_offset).
//  * Σx of each x row and group, for the offset terms m·Σx: one more mma per n8 tile and k16 step
//    with A = 1.0 everywhere (every row of its C is Σ_k x[col, k]); computed by each warp on its
//    own runs, so it pairs with the warp's own Σx·q partial sums.
//  * Per group the lane folds (exact::fold_group: C rows g, g + 8 are its own decoded rows, C
//    columns 2t, 2t + 1 the x rows) y += s·Σxq + m·Σx (+ α·Σ±x), with s, m, α of its two rows
//    read from global memory one group ahead (skinny_rows / skinny_raw_params, as the GEMV does:
//    this tile stages no scale windows, which also saves their cp.async issue). A warp takes
//    RUNS / WK consecutive runs of a k tile (skinny_run), and a k tile is whole groups, so where
//    its groups start and end is known at compile time for each group size
//    (skinny_warp_group_runs; the kernel is instantiated per run count L = 1 or 2): a group's
//    first products write C = 0 and no zeroing follows a fold. Splitting a group between warps (g128) only
//    splits the linear sums.
//  * Rows past the class's end read zero-filled words (codes 0) and the class's last row's
//    scales: finite sums that are never stored. Rows without a residual get zero sign registers
//    (no ±1·x term, so an infinite x elsewhere does not turn into 0·inf = NaN).
// Nothing is rounded before the fp32 sums (the GEMV's error model: tests/_tolerance
// factored_magnitude). The epilogue, split-K and low-rank paths are the other tiles': the
// accumulators are placed into the same epilogue staging tile (skinny_epi_slot).
//
// Static count (benchmarks/static/sass_count.py, sm_90, CUDA 13.0): the compute of a k tile,
// W4 3.4 instructions a weight at g128 and g64, 4.7 at g32; W3 5.9, W2 4.2 at g128, against 6.7 /
// 8.8 / 7.2 for the small tile's main loop with one live m16 tile (neither with the cp.async
// issue); this tile's hoisted copies of an interior k tile (SkinnyCopies) add 0.9 (W4), 0.9 (W3),
// 0.7 (W2), where the copy plan they replace spent about twice that. Not measured on a GPU.
// ---------------------------------------------------------------------------------------------

// Group sizes the skinny tile takes: a group is 1, 2 or 4 runs (the kernel's RPG template).
BF_HD constexpr bool skinny_takes_group_size(int gs) { return gs == 32 || gs == 64 || gs == 128; }

// Tile-local packed row of half h (0: row g, 1: row g + 8) of m16 tile mw for lane.
template <class T>
BF_HD constexpr int skinny_row(const WarpPos& w, int mw, int lane, int h) {
  return w.wn * T::WTN + 16 * mw + mma::group_id(lane) + 8 * h;
}
// n8 tiles of warp row wm holding at least one x row < m: the others skip ldmatrix and mma.
template <class T>
BF_HD inline int warp_n8_tiles(const Args& a, const BlockTile& bt, int wm) {
  const int left = a.m - bt.m0 - wm * T::WTM;
  return left <= 0 ? 0 : left >= T::WTM ? T::NX : (left + 7) / 8;
}

// Run (0..RUNS-1) of a k tile that warp-k index wk takes as its jr-th: the skinny tile gives each
// warp RUNS / WK consecutive runs (the other tiles interleave them, warp_run), so that a 64-column
// group is one warp's (one fold, not one in each warp).
template <class T>
BF_HD constexpr int skinny_run(int wk, int jr) { return wk * T::RUNS_PER_WARP + jr; }

// Word index, in the stage's weight tile, of the word lane reads for half h of m16 tile mw in
// run rho: word lane_word(BITS, t) of the run (the 3-bit high plane is word 2 of the run, i.e.
// skinny_word - lane_word + 2). Linear in rho: the kernel adds BITS words a run of its own.
template <class T, int BITS>
BF_HD constexpr int skinny_word(const WarpPos& w, int mw, int lane, int h, int rho) {
  return skinny_row<T>(w, mw, lane, h) * T::b_stride(BITS) + rho * BITS +
         exact::lane_word(BITS, mma::thread_in_group(lane));
}
// The A registers of one run of one m16 tile from the words of its two rows (lo: word
// lane_word, hi: the 3-bit high-plane word): q[0..3] for k16 step 0 (columns 0..15 of the run),
// q[4..7] for step 1, in the ISA's order a0..a3 (rows g, g + 8, g, g + 8; pairs 2t, 2t + 8).
template <int BITS, int DT>
BF_HD inline void skinny_codes(const uint32_t lo[2], const uint32_t hi[2], int t, uint32_t q[8]) {
  uint32_t c[2][4];
  BF_UNROLL for (int h = 0; h < 2; ++h) exact::lane_codes<BITS>(lo[h], hi[h], t, DT, c[h]);
  BF_UNROLL for (int s = 0; s < 2; ++s) {
    q[4 * s + 0] = c[0][2 * s], q[4 * s + 1] = c[1][2 * s];
    q[4 * s + 2] = c[0][2 * s + 1], q[4 * s + 3] = c[1][2 * s + 1];
  }
}
// The ±1 A registers of the residual signs from the two rows' plane words, same order; zero for
// a row without a residual (has = false).
template <int DT>
BF_HD inline void skinny_signs(const uint32_t plane[2], const bool has[2], int t, uint32_t r[8]) {
  uint32_t c[2][4];
  BF_UNROLL for (int h = 0; h < 2; ++h) exact::lane_signs(plane[h], t, DT, has[h], c[h]);
  BF_UNROLL for (int s = 0; s < 2; ++s) {
    r[4 * s + 0] = c[0][2 * s], r[4 * s + 1] = c[1][2 * s];
    r[4 * s + 2] = c[0][2 * s + 1], r[4 * s + 3] = c[1][2 * s + 1];
  }
}
// Word index of the residual plane word of tile-local row rr in run rho (stage_copies' layout).
template <class T>
BF_HD constexpr int skinny_plane_word(int rr, int rho) { return rr * T::RUNS + rho; }

// Stage byte offset of the row address lane gives to the ldmatrix.x4 of n8 tile jx, run rho:
// x row (tile) w.wm·WTM + 8jx + (lane & 7), column chunk 32·rho + 8·(lane >> 3). Register j of
// the result is then matrix j = columns 8j..8j+7 of the run: b0, b1 of step 0, b0, b1 of step 1.
template <class T>
BF_HD constexpr int skinny_ldsm_offset(const WarpPos& w, int jx, int rho, int lane) {
  return T::A_OFF + mma::a_tile_offset(w.wm * T::WTM + 8 * jx + (lane & 7), 32 * rho + 8 * (lane >> 3), T::BK);
}

// Where a warp's groups start and end. A skinny k tile is whole groups (BK a multiple of every
// group size it takes) and a warp takes RPW = RUNS / WK consecutive runs of it (skinny_run): with
// RPG runs a group, L = min(RPG, RPW) consecutive runs of a warp share a group (powers of two),
// so the warp's group starts at jr % L == 0 (its first mma of the group writes C = 0: no zeroing)
// and ends at (jr + 1) % L == 0 (the fold): compile-time positions in the kernel's unrolled run
// loop. Runs past K (the last k tile) are skipped; a group whose first run of the warp was
// skipped is not folded (nothing was summed), one whose later runs were is.
template <class T>
BF_HD constexpr int skinny_warp_group_runs(int rpg) { return rpg < T::RUNS_PER_WARP ? rpg : T::RUNS_PER_WARP; }
BF_HD constexpr bool skinny_group_first(int jr, int l) { return jr % l == 0; }
BF_HD constexpr bool skinny_group_last(int jr, int l) { return (jr + 1) % l == 0; }
// The warp's first run (of K) of the group that its run jr of k tile kt belongs to.
template <class T>
BF_HD constexpr int skinny_group_first_run(int kt, int wk, int jr, int l) {
  return kt * T::RUNS + skinny_run<T>(wk, jr - jr % l);
}
// The group (of K) of the warp's run after its run jr of k tile kt: what the kernel loads the
// parameters of at each fold, a group ahead. (At the start: the group of its run 0 of k tile kt0.)
// rpg_shift = log2(runs a group).
template <class T>
BF_HD constexpr int skinny_next_group(int kt, int wk, int jr, int rpg_shift) {
  return (jr + 1 < T::RUNS_PER_WARP ? kt * T::RUNS + skinny_run<T>(wk, jr + 1)
                                    : (kt + 1) * T::RUNS + skinny_run<T>(wk, 0)) >> rpg_shift;
}
template <class T>
BF_HD constexpr int skinny_first_group(int kt0, int wk, int rpg_shift) {
  return (kt0 * T::RUNS + skinny_run<T>(wk, 0)) >> rpg_shift;
}
BF_HD constexpr int skinny_rpg_shift(int group_size) { return group_size == 32 ? 0 : group_size == 64 ? 1 : 2; }

// A lane's rows for the folds: its packed rows g and g + 8 of m16 tile mw (block rows past the
// class's end read the class's last row: valid loads, outputs never stored), their scales'
// RowScales and residual rows. The kernel reads a group's s, m and α straight from global memory
// (read-only loads, one group ahead of its fold), as the tensor-core GEMV does: no staged
// windows, no per-k-tile copies of them.
struct SkinnyRows {
  RowScales rs[2];
  int ri[2];  // residual row, or -1
};
template <class T, class Load = PlainLoad>
BF_HD inline SkinnyRows skinny_rows(const Args& a, const BlockTile& bt, const int* s_ri,
                                    const WarpPos& w, int lane, int mw, Load ld = Load()) {
  SkinnyRows r;
  const int G = a.k_pad / a.group_size;
  BF_UNROLL for (int h = 0; h < 2; ++h) {
    const int rr = skinny_row<T>(w, mw, lane, h);
    const int row = bt.row0 + rr < bt.row_end ? bt.row0 + rr : bt.row_end - 1;
    r.rs[h] = row_scales(a, row, G, ld);
    r.ri[h] = s_ri[rr];
  }
  return r;
}
// Group g's stored values of the two rows (clipped to the last group: a prefetch past K reads
// valid memory), each in a register of its own as loaded: sv / zv the scale and offset (fp16
// bits, or compact codes), av α's fp16 bits (0 without). Kept apart, not packed into one word,
// so that nothing uses a loaded value before the fold that needs it (a pack right after the
// loads made every fold, and every block's start, wait for them). Indices are 32-bit (one
// IMAD.WIDE an address; gemm_cuda refuses layers of 2^31 or more groups).
struct SkinnyParams {
  uint32_t sv[2], zv[2], av[2];
};
template <class Load = PlainLoad>
BF_HD inline void skinny_raw_params(const Args& a, const SkinnyRows& r, int g, SkinnyParams& p,
                                    Load ld = Load()) {
  const int G = a.k_pad / a.group_size;
  const uint32_t gg = uint32_t(g < G ? g : G - 1);
  BF_UNROLL for (int h = 0; h < 2; ++h) {
    const uint32_t i = uint32_t(r.rs[h].base) + gg;
    p.sv[h] = a.scale_codes ? uint32_t(ld(a.scale_codes + i)) : uint32_t(ld(a.scales + i));
    p.zv[h] = a.scale_codes ? uint32_t(ld(a.zero_codes + i)) : uint32_t(ld(a.zeros + i));
    p.av[h] = (a.res_alpha && r.ri[h] >= 0) ? uint32_t(ld(a.res_alpha + (uint32_t(r.ri[h]) * uint32_t(G) + gg)))
                                            : 0u;
  }
}
// ... in fp32, for exact::fold_group (format.h group_params_of_raw: the one decode of either
// scale form).
BF_HD inline void skinny_params(const Args& a, const SkinnyRows& r, const SkinnyParams& p,
                                float sc[2], float zr[2], float al[2]) {
  BF_UNROLL for (int h = 0; h < 2; ++h) {
    group_params_of_raw(a, r.rs[h], p.sv[h] | (p.zv[h] << 16), sc[h], zr[h]);
    al[h] = half_to_float(uint16_t(p.av[h]));
  }
}
// Epilogue staging slot of accumulator e of (m16 tile mw, n8 tile jx): the tile of x rows
// 16·(jx / 2) .. + 16 (epilogue m16 tile index jx >> 1), x row 8·(jx & 1) + 2t + (e & 1) in it,
// packed row 16·mw + g + 8·(e >> 1) of the warp's WTN.
template <class T>
BF_HD constexpr int skinny_epi_slot(int mw, int jx, int lane, int e) {
  return (8 * (jx & 1) + 2 * mma::thread_in_group(lane) + (e & 1)) * T::EPI_LD + 16 * mw +
         mma::group_id(lane) + 8 * (e >> 1);
}

// The fused epilogue of one output (packed row `row`, x row mi): acc + low-rank up + extra + bias
// (ARCHITECTURE.md §4 order), fp32. *col is the output column perm[row]. Same as gemv::epilogue.
// The kernel no longer calls it: it sums the low-rank term from shared memory (lr_sums) and
// finishes with epilogue_tail; the CPU twin keeps it (lowrank_staged=False) as the bit-exact
// reference of that path.
BF_HD inline float epilogue(const Args& a, float acc, int row, int mi, int* col) {
  return fused_epilogue(a, acc, row, mi, col);
}

// ---------------------------------------------------------------------------------------------
// Low-rank up-projection in the epilogue (issue #4): the term t·L_upᵀ of output (mi, row) is
// Σ_j t[mi, j]·lr_up[row, j], j = 0..r-1. Read straight from global memory per output (what
// fused_epilogue does, and the GEMV still does), every output of a block re-reads its t row and
// its lr_up row, and the 32 lanes of a warp read 32 lr_up rows r halves apart: uncoalesced, r
// loads each, repeated for every x row. Here the block instead stages, per chunk of LR_CHUNK
// columns of r, the t rows and the lr_up rows it needs in shared memory (coalesced: consecutive
// threads read consecutive elements of each row segment, which for r <= LR_CHUNK is one
// contiguous range per warp row of t and one for all of lr_up), then every output sums from
// shared memory. The arithmetic is fused_epilogue's, bit for bit: lr starts at +0, one fp32 fmaf
// per j in the order j = 0..r-1 (kept across chunks in the epilogue tile), lr_up converted with
// half_to_float; then y = acc + lr, + extra, + bias (epilogue_tail).
//
// Schedule, per m16 tile index i of the block (a loop every warp of the block takes, with its
// barriers; the warps-k >= 1, otherwise done after the in-block split-K sum, share the work;
// gemm.cu lowrank_tile):
//   for each chunk [c0, c0 + len): (barrier, if c0 > 0: the previous chunk is summed) stage the
//   t rows (16 per warp row) and, on the first i or when r takes several chunks, the block's
//   lr_up rows; barrier; each lane sums its rows' chunk into the output warp's epilogue tile.
//   Then a barrier: the tile's sums are complete, and the next i may restage.
// Warp w sums x rows w.wk·LR_QS .. + LR_QS of its warp row's m16 tile i × its 32 packed rows, a
// register tile of 4 x rows × LR_PB packed rows a lane (lr_sums). The sum of (q, packed row pr of
// the warp) lands in epilogue tile slot q·EPI_LD + pr, i.e. where output o = q·WTN + pr sits
// (epi_src): gemm_epilogue then adds the accumulators in their fragment layout, split_fixup the S
// partials (both after the barrier that ends the tile's sums).
// ---------------------------------------------------------------------------------------------

// m16 tiles of the block holding an x row < m (those of warp row 0, the most): the epilogue's
// loop count, uniform across the block (its barriers need every thread).
template <class T>
BF_HD inline int block_m_tiles(const Args& a, const BlockTile& bt) {
  return warp_m_tiles<T>(a, bt, 0);
}
// Rows q of an m16 tile that warp-k wk sums (and, in split_fixup, stores): [begin, begin + LR_QS).
template <class T>
BF_HD constexpr int lr_rows(int wk) { return wk * T::LR_QS; }
// Staged t row tr (0 .. 16·WM - 1) of m16 tile i is x row (block tile) lr_x_row: warp row tr / 16,
// row tr % 16 of its m16 tile i.
template <class T>
BF_HD constexpr int lr_x_row(int i, int tr) { return (tr / 16) * T::WTM + 16 * i + tr % 16; }
// Shared-memory byte offsets of staged t (row tr, column j of the chunk) and lr_up (row rr).
template <class T>
BF_HD constexpr int lr_t_off(int tr, int j) { return T::LR_T_OFF + 4 * (tr * T::LR_T_LD + j); }
template <class T>
BF_HD constexpr int lr_up_off(int rr, int j) { return T::LR_UP_OFF + 2 * (rr * T::LR_UP_LD + j); }
// The epilogue-tile slot of (row q, packed row pr of the warp), and the columns of chunk c0 of r.
template <class T>
BF_HD constexpr int lr_slot(int q, int pr) { return q * T::EPI_LD + pr; }
BF_HD inline int lr_len(int r, int c0, int chunk) { return r - c0 < chunk ? r - c0 : chunk; }

// Elements q0, q0 + step, .. of a (rows × len) range, element q = (row q / len, column q % len):
// four per thread at a time (LR_UNROLL), all loads issued before any store, with no branch
// between them: an element to be zero-filled (src_of gives null) or past the range loads `base`
// (valid, discarded) instead. The row and column advance by (step / len, step % len) with one
// carry: no division per element. io.ld(src, real) is the global load (real: not a dummy),
// io.st(smem_offset, value) the shared store.
constexpr int LR_UNROLL = 4;
template <class V, class Src, class Off, class F>
BF_HD inline void lr_stage_range(int rows, int len, int q0, int step, const V* base,
                                 const Src& src_of, const Off& off_of, F& io) {
  const int dr = step / len, dj = step % len, n = rows * len;
  int r = q0 / len, j = q0 % len;
  for (int q = q0; q < n; q += LR_UNROLL * step) {
    V v[LR_UNROLL];
    int off[LR_UNROLL];
    bool in[LR_UNROLL], real[LR_UNROLL];
    BF_UNROLL for (int u = 0; u < LR_UNROLL; ++u) {
      in[u] = q + u * step < n;
      const V* src = in[u] ? src_of(r, j) : nullptr;
      real[u] = src != nullptr;
      off[u] = off_of(r, j);
      v[u] = io.ld(real[u] ? src : base, real[u]);
      r += dr, j += dj;
      if (j >= len) j -= len, ++r;
    }
    BF_UNROLL for (int u = 0; u < LR_UNROLL; ++u)
      if (in[u]) io.st(off[u], real[u] ? v[u] : V(0));
  }
}

// Stage columns [c0, c0 + len) of r for m16 tile i: the t rows of lr_x_row (zero past m) and, if
// `up`, the block's lr_up rows (zero past the class's last row), elements q0, q0 + step, .. of
// each (the kernel passes (threadIdx.x, THREADS), the twin (0, 1)). Consecutive threads read
// consecutive columns of a row, and rows that are consecutive x rows (a warp row's 16) or packed
// rows are consecutive in memory when len = r: each warp's loads are one contiguous range.
template <class T, class F>
BF_HD inline void lr_stage(const Args& a, const BlockTile& bt, int i, int c0, int len, bool up,
                           int q0, int step, F& io) {
  lr_stage_range(
      16 * T::WM, len, q0, step, a.t,
      [&](int tr, int j) -> const float* {
        const int mi = bt.m0 + lr_x_row<T>(i, tr);
        return mi < a.m ? a.t + int64_t(mi) * a.r + c0 + j : nullptr;
      },
      [](int tr, int j) { return lr_t_off<T>(tr, j); }, io);
  if (!up) return;
  lr_stage_range(
      T::BN, len, q0, step, a.lr_up,
      [&](int rr, int j) -> const uint16_t* {
        const int row = bt.row0 + rr;
        return row < bt.row_end ? a.lr_up + int64_t(row) * a.r + c0 + j : nullptr;
      },
      [](int rr, int j) { return lr_up_off<T>(rr, j); }, io);
}

// Two consecutive staged t values (column j even: 8-byte aligned) of one row, and one.
BF_HD inline void lr_t_pair(const char* p, float* x, float* y) {
#if defined(__CUDA_ARCH__)
  const float2 v = *reinterpret_cast<const float2*>(p);
  *x = v.x, *y = v.y;
#else
  std::memcpy(x, p, 4);
  std::memcpy(y, p + 4, 4);
#endif
}
BF_HD inline float lr_t_one(const char* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const float*>(p);
#else
  float x;
  std::memcpy(&x, p, 4);
  return x;
#endif
}

// The lane's tile of the low-rank sums (Tile, LR_QB / LR_PB): its first x row q (of the m16
// tile; then q + 1 .. q + 3) and its p-th packed row (of the warp's 32).
template <class T>
BF_HD constexpr int lr_lane_q(const WarpPos& w, int lane) {
  return lr_rows<T>(w.wk) + T::LR_QB * (lane / T::LR_LG);
}
template <class T>
BF_HD constexpr int lr_lane_p(int lane, int p) { return lane % T::LR_LG + T::LR_LG * p; }

// Lane's sums of m16 tile i over chunk [c0, c0 + len) of r (staged by lr_stage): LR_QB x rows ×
// LR_PB packed rows in registers, into epi, the epilogue tile of output warp position w.wmn, slot
// (q, packed row of the warp), which starts at +0 on the first chunk and carries the sum from
// chunk to chunk. A lane whose rows are all past m, or a warp wholly past the class's last row,
// sums nothing (those outputs are never stored, so whatever their slots hold is never used);
// rows past m / row_end inside a tile sum staged zeros. fmaf in the order j = c0, c0 + 1, ..
// per sum: fused_epilogue's order. Every read is conflict-free (Tile, LR_T_LD / LR_UP_LD); the
// stores (once per chunk) are not, which costs LR_QB·LR_PB stores against len times as many fmas.
template <class T>
BF_HD inline void lr_sums(const Args& a, const BlockTile& bt, const WarpPos& w, int lane, int i,
                          int c0, int len, const char* smem, float* epi) {
  constexpr int QB = T::LR_QB, PB = T::LR_PB;
  if (bt.row0 + w.wn * T::WTN >= bt.row_end) return;
  const int q = lr_lane_q<T>(w, lane);
  if (bt.m0 + w.wm * T::WTM + 16 * i + q >= a.m) return;  // rows q.. past m
  const char* t0 = smem + lr_t_off<T>(w.wm * 16 + q, 0);   // staged t row of (warp row, q)
  const uint32_t* up[PB];
  BF_UNROLL for (int p = 0; p < PB; ++p)
    up[p] = reinterpret_cast<const uint32_t*>(
        smem + lr_up_off<T>(w.wn * T::WTN + lr_lane_p<T>(lane, p), 0));
  float lr[PB][QB];
  BF_UNROLL for (int p = 0; p < PB; ++p)
    BF_UNROLL for (int u = 0; u < QB; ++u)
      lr[p][u] = c0 == 0 ? 0.0f : epi[lr_slot<T>(q + u, lr_lane_p<T>(lane, p))];
  int j = 0;
  for (; j + 1 < len; j += 2) {  // one lr_up word a packed row: columns j (low half) and j + 1
    float u0[PB], u1[PB];
    BF_UNROLL for (int p = 0; p < PB; ++p) {
      const uint32_t word = up[p][j >> 1];
      u0[p] = half_to_float(uint16_t(word & 0xFFFFu));
      u1[p] = half_to_float(uint16_t(word >> 16));
    }
    BF_UNROLL for (int u = 0; u < QB; ++u) {
      float x0, x1;
      lr_t_pair(t0 + 4 * (u * T::LR_T_LD + j), &x0, &x1);
      BF_UNROLL for (int p = 0; p < PB; ++p) {
        lr[p][u] = fmaf(x0, u0[p], lr[p][u]);
        lr[p][u] = fmaf(x1, u1[p], lr[p][u]);
      }
    }
  }
  if (j < len) {  // odd len: the last column alone (its word's high half is not staged)
    float u0[PB];
    BF_UNROLL for (int p = 0; p < PB; ++p)
      u0[p] = half_to_float(reinterpret_cast<const uint16_t*>(up[p])[j]);
    BF_UNROLL for (int u = 0; u < QB; ++u) {
      const float x0 = lr_t_one(t0 + 4 * (u * T::LR_T_LD + j));
      BF_UNROLL for (int p = 0; p < PB; ++p) lr[p][u] = fmaf(x0, u0[p], lr[p][u]);
    }
  }
  BF_UNROLL for (int p = 0; p < PB; ++p)
    BF_UNROLL for (int u = 0; u < QB; ++u) epi[lr_slot<T>(q + u, lr_lane_p<T>(lane, p))] = lr[p][u];
}

// The outputs of the reducing block go by m16 tile index i (0 .. block_m_tiles - 1, after the
// low-rank sums of that tile, whose barrier makes them visible to every thread): lane of warp w
// takes x row bt.m0 + w.wm·WTM + 16i + q for the rows q of its warp-k share
// (lr_rows) and packed row bt.row0 + w.wn·WTN + lane, so a warp's 32 lanes walk 32 consecutive
// packed rows of one x row (coalesced partial reads and, under the identity permutation,
// coalesced stores). False past m and past the class's last row.
template <class T>
BF_HD inline bool fixup_output(const Args& a, const BlockTile& bt, const WarpPos& w, int lane,
                               int i, int q, int* mi, int* row) {
  *mi = bt.m0 + w.wm * T::WTM + 16 * i + q;
  *row = bt.row0 + w.wn * T::WTN + lane;
  return *mi < a.m && *row < bt.row_end;
}

}  // namespace gemm
}  // namespace bitfuse
