// THE per-architecture tile table of the tensor-core GEMM (csrc/cuda/gemm.cu). One row per target
// profile of python/bitfuse/targets.py (SM count and shared memory per SM from there and from
// shared/hardware.md); each row names a tile for small M (<= kSmallMaxM) and one for large M.
// The launcher and the CPU twin pick the tile from the device's compute capability and M with
// select_tile(); each architecture's device code compiles only the tiles of its own row
// (tile_built_for), so the build compiles 3 tiles per architecture, each × 3 bit widths × 2
// dtypes (the skinny tile also × 3 group sizes).
//
// None of these choices has been measured on a GPU (no GPU was lent so far); the reasoning:
//  * M <= 16 with groups of 32/64/128 (kSkinnyMaxM, gemm.h "Skinny tile"): the skinny tile, 16
//    x rows × 64 packed rows × BK = 128 (a k tile is whole groups of every size it takes), 4
//    warps (WN = 2 × WK = 2), exact codes as the A operand and the scales per group. No scale
//    windows are staged: 10 KB a stage. sm_87 / sm_90: 4 stages, 40 KB; sm_86 / sm_89 (100 KB):
//    3 stages, 30 KB; 3 blocks per SM everywhere (12 warps: shared memory allows it, and the
//    launch bounds hold ptxas to the 170 registers a thread that 3 × 128 threads may have).
//    At M = 17..64 the small tile below (one block row of 64, weights decoded once for all
//    m16 tiles) is kept: two block rows of the skinny tile would decode and read every weight
//    twice.
//  * small M (17..64, and M <= 16 with other group sizes): BM = 64 covers every M of the
//    bucket in one block row, so each weight is read and decoded once per launch (rows past M
//    are not copied and their mma tiles are skipped); BN = 64 keeps N/64 blocks in flight; WM = 1 (no warp decodes
//    another's weights), WN = 2 × WK = 2 (split-K inside the block for more loads in flight).
//    100 KB SMs (sm_86/89): BK = 64, 3 stages, 39 KB -> 2 blocks per SM. 164 KB (sm_87 Orin):
//    BK = 128, 3 stages, 73 KB -> 2 blocks. 228 KB (sm_90): BK = 128, 4 stages, 97 KB -> 2.
//  * large M (> 64): 128 × 128 tiles, 8 warps of 64 × 32 (16 mma per k16 step per warp, each
//    decoded B fragment reused by 4 m16 tiles). sm_86/89: BK = 32, 4 stages, 48.5 KB; sm_87:
//    BK = 64, 3 stages, 80 KB; sm_90: BK = 64, 4 stages, 104.5 KB: shared memory for 2 blocks
//    per SM everywhere, but registers (ptxas, CUDA 13, 2026-11-29: 171-172 a thread for this tile,
//    128-167 for the small one; no spills) allow only 1 block of 8 warps per SM. Forcing 2 (launch bounds) would
//    cap registers at 128 and likely spill the 64 accumulators; to be decided on a GPU.
//  * Small grids: split-K across blocks (plan_split below). At M <= 64 the grid is N/64 blocks
//    (64 for N = 4096) against 82-132 SMs × 2 resident blocks (16 × 2 on Orin), so most SMs
//    would idle in a launch that is meant to stream the weights at full DRAM bandwidth (issue
//    #4: M = 16 >= 3.3x over fp16 cuBLAS needs every SM loading). The grid gets a third
//    dimension S: block (n tile, m tile, s) computes a contiguous range of k tiles, stores an
//    fp32 partial, and the last of the S blocks of an output tile sums them in the fixed order
//    s = 0..S-1 and runs the epilogue (gemm.h, gemm.cu split_fixup). S is a runtime value, so
//    split-K adds no template instantiation. S = 1 (a full grid: large M, large N) is exactly the
//    kernel without split-K. How S is chosen, and why, is at split_count; unmeasured.
#pragma once

#include "bitfuse/gemm.h"

namespace bitfuse {
namespace gemm {

// Tile shapes by id: Tile<BM, BN, BK, WM, WN, WK, STAGES>.
template <int ID> struct TileOf;
template <> struct TileOf<0> { using type = Tile<64, 64, 64, 1, 2, 2, 3>; };    // small, 100 KB
template <> struct TileOf<1> { using type = Tile<64, 64, 128, 1, 2, 2, 3>; };   // small, 164 KB
template <> struct TileOf<2> { using type = Tile<64, 64, 128, 1, 2, 2, 4>; };   // small, 228 KB
template <> struct TileOf<3> { using type = Tile<128, 128, 32, 2, 4, 1, 4>; };  // large, 100 KB
template <> struct TileOf<4> { using type = Tile<128, 128, 64, 2, 4, 1, 3>; };  // large, 164 KB
template <> struct TileOf<5> { using type = Tile<128, 128, 64, 2, 4, 1, 4>; };  // large, 228 KB
template <> struct TileOf<6> { using type = Tile<16, 64, 128, 1, 2, 2, 3, true>; };  // skinny, 100 KB
template <> struct TileOf<7> { using type = Tile<16, 64, 128, 1, 2, 2, 4, true>; };  // skinny, 164+ KB
constexpr int kTileCount = 8;

struct ArchConfig {
  int cc;              // compute capability, major·10 + minor
  int sms;             // targets.py TargetProfile.sms
  int smem_per_sm_kb;  // targets.py TargetProfile.smem_per_sm_kb
  int small_tile;      // tile id for kSkinnyMaxM < M <= kSmallMaxM (and skinny M it cannot take)
  int large_tile;      // tile id for M > kSmallMaxM
  // Blocks of each tile resident on one SM (what "a wave" is for split_count): the small tiles
  // are bounded by shared memory (2 on every row, see above; up to 167 registers × 128 threads would
  // allow 3), the large ones by registers (171-172 × 256 threads: 1). Reasoned from ptxas -v,
  // not measured with the occupancy API on a GPU.
  int small_blocks;
  int large_blocks;
  int skinny_tile;     // tile id for M <= kSkinnyMaxM with a group size it takes (gemm.h)
  int skinny_blocks;   // see "skinny" above
};
constexpr int kArchRows = 4;
BF_HD constexpr ArchConfig arch_config(int row) {
  return row == 0   ? ArchConfig{86, 82, 100, 0, 3, 2, 1, 6, 3}    // rtx30: RTX 3090
         : row == 1 ? ArchConfig{87, 16, 164, 1, 4, 2, 1, 7, 3}    // orin: Jetson AGX Orin
         : row == 2 ? ArchConfig{89, 128, 100, 0, 3, 2, 1, 6, 3}   // rtx40: RTX 4090
                    : ArchConfig{90, 132, 228, 2, 5, 2, 1, 7, 3};  // h100 (and H200)
}
// Row of a compute capability; -1 below sm_80 (cp.async, bf16 mma and m16n8k16 need sm_80).
// Newer GPUs take the sm_90 row (they run the sm_90 PTX); sm_80 (A100, 164 KB) the Orin row.
BF_HD constexpr int arch_row(int cc) {
  return cc >= 90 ? 3 : cc == 89 ? 2 : (cc == 87 || cc == 80) ? 1 : cc >= 80 ? 0 : -1;
}
// Tile id for M rows of x of a layer with group size gs on compute capability cc (-1:
// unsupported GPU).
BF_HD constexpr int select_tile(int cc, int m, int gs) {
  return arch_row(cc) < 0 ? -1
         : (m <= kSkinnyMaxM && skinny_takes_group_size(gs)) ? arch_config(arch_row(cc)).skinny_tile
         : m <= kSmallMaxM ? arch_config(arch_row(cc)).small_tile
                           : arch_config(arch_row(cc)).large_tile;
}
// Whether device code for compute capability cc contains tile `id` (its row uses it).
BF_HD constexpr bool tile_built_for(int id, int cc) {
  return arch_row(cc) >= 0 &&
         (arch_config(arch_row(cc)).small_tile == id || arch_config(arch_row(cc)).large_tile == id ||
          arch_config(arch_row(cc)).skinny_tile == id);
}

// Calls f.template run<id>() (the launcher and the CPU twin dispatch with it; 0 <= id < kTileCount).
template <class F>
inline void with_tile(int id, F& f) {
  switch (id) {
    case 0: f.template run<0>(); break;
    case 1: f.template run<1>(); break;
    case 2: f.template run<2>(); break;
    case 3: f.template run<3>(); break;
    case 4: f.template run<4>(); break;
    case 5: f.template run<5>(); break;
    case 6: f.template run<6>(); break;
    default: f.template run<7>(); break;
  }
}

// Shared memory a block of tile id needs, and what one block may have on a row's GPU (the SM's
// shared memory less the 1 KB the runtime reserves per block).
template <int ID = 0>
BF_HD constexpr int tile_smem(int id) {
  if constexpr (ID + 1 < kTileCount)
    return id == ID ? TileOf<ID>::type::SMEM_BYTES : tile_smem<ID + 1>(id);
  else
    return TileOf<ID>::type::SMEM_BYTES;
}
template <int ID = 0>
BF_HD constexpr int tile_threads(int id) {
  if constexpr (ID + 1 < kTileCount)
    return id == ID ? TileOf<ID>::type::THREADS : tile_threads<ID + 1>(id);
  else
    return TileOf<ID>::type::THREADS;
}
// Resident blocks per SM the table counts on for tile id (the most any row asks of it): the
// kernel's __launch_bounds__ minimum, so ptxas keeps the registers within what that many blocks
// can have (without it, ptxas for sm_87 squeezed the skinny tile into 128 registers and spilled).
template <int ROW = 0>
BF_HD constexpr int tile_min_blocks(int id) {
  if constexpr (ROW < kArchRows) {
    const ArchConfig c = arch_config(ROW);
    const int here = c.small_tile == id ? c.small_blocks
                     : c.large_tile == id ? c.large_blocks
                     : c.skinny_tile == id ? c.skinny_blocks
                                           : 1;
    const int rest = tile_min_blocks<ROW + 1>(id);
    return here > rest ? here : rest;
  } else {
    return 1;
  }
}
BF_HD constexpr int block_smem_limit(int row) { return (arch_config(row).smem_per_sm_kb - 1) * 1024; }
// `blocks` blocks of tile id fit one SM's shared memory (each with the runtime's 1 KB).
BF_HD constexpr bool blocks_fit(int row, int id, int blocks) {
  return blocks * (tile_smem(id) + 1024) <= arch_config(row).smem_per_sm_kb * 1024;
}
BF_HD constexpr bool table_fits(int row) {
  return row >= kArchRows ||
         (tile_smem(arch_config(row).small_tile) <= block_smem_limit(row) &&
          tile_smem(arch_config(row).large_tile) <= block_smem_limit(row) &&
          tile_smem(arch_config(row).skinny_tile) <= block_smem_limit(row) &&
          blocks_fit(row, arch_config(row).small_tile, arch_config(row).small_blocks) &&
          blocks_fit(row, arch_config(row).large_tile, arch_config(row).large_blocks) &&
          blocks_fit(row, arch_config(row).skinny_tile, arch_config(row).skinny_blocks) &&
          table_fits(row + 1));
}
static_assert(table_fits(0), "a tile of the table needs more shared memory than its GPU has");

// Resident blocks per SM of tile id on compute capability cc's row (1 for a tile not in the row).
BF_HD constexpr int tile_blocks_per_sm(int cc, int id) {
  return arch_row(cc) < 0                                 ? 1
         : arch_config(arch_row(cc)).small_tile == id ? arch_config(arch_row(cc)).small_blocks
         : arch_config(arch_row(cc)).large_tile == id ? arch_config(arch_row(cc)).large_blocks
         : arch_config(arch_row(cc)).skinny_tile == id ? arch_config(arch_row(cc)).skinny_blocks
                                                          : 1;
}

// ---- split-K across blocks ----------------------------------------------------------------------
constexpr int kMaxSplit = 16;        // S never exceeds this by itself (tests may force more)
constexpr int kSplitCounters = 1024; // counters a layer keeps: a split grid has at most this many
                                     // output tiles (it has fewer than one wave: <= 264 today)

BF_HD constexpr int imin(int a, int b) { return a < b ? a : b; }

// S, the number of K splits, for a launch of `tiles` output tiles (N tiles × M tiles) over m rows
// of x and k_runs 32-column runs of K, with a tile whose k tile is runs_per_ktile runs and whose
// pipeline has `stages` stages, on `sms` SMs that hold blocks_per_sm blocks of it each (a wave is
// sms · blocks_per_sm blocks). Why each term:
//  * tiles >= one wave: the grid already fills the GPU (large M, or large N): S = 1, which is
//    exactly the kernel without split-K (no workspace, no counter, no extra pass).
//  * else S = ceil(2 waves / tiles): about two waves of blocks, so the SMs that finish their first
//    block early pick up another instead of idling through a ragged last wave, and every SM has
//    weight loads in flight (the small-M launch is memory-bound: the point is DRAM bandwidth).
//  * S <= ktiles / stages: each split keeps at least `stages` k tiles, so its cp.async pipeline
//    reaches steady state instead of being all prologue and drain.
//  * S <= 2·k_runs / m: the fp32 partials cost 8 bytes (store + load) per output per split, the
//    4-bit weights K/2 bytes per packed row shared by the m rows; 8·S·m <= K/2 keeps the partial
//    traffic (mostly L2-resident) at most the weight bytes, which turns split-K off as M grows
//    towards the compute-bound range (m > K/32: m > 128 at K = 4096).
//  * S <= kMaxSplit; tiles <= kSplitCounters (the counter buffer the caller keeps per layer).
// For N = K = 4096, m = 16 (64 skinny tiles, 3 blocks an SM): H100 (132 SMs × 3): min(
// ceil(792/64) = 13, 16, 32/4 = 8, 2·128/16 = 16) = 8 -> 512 blocks; RTX 4090: min(12, 16, 32/3,
// 16) = 10; RTX 3090: ceil(492/64) = 8; Orin (16 SMs × 3 = 48 <= 64 tiles): 1. On the small tile
// (m = 17..64, 2 blocks an SM) at m = 17: 8 / 8 / 6 / 1; at m = 64 the traffic term (2·128/64)
// gives 4 / 4 / 4 / 1. None of this has been measured (no GPU lent so far).
BF_HD constexpr int split_count(int sms, int blocks_per_sm, int tiles, int m, int k_runs,
                                int runs_per_ktile, int stages) {
  const int wave = sms * blocks_per_sm;
  const int ktiles = (k_runs + runs_per_ktile - 1) / runs_per_ktile;
  if (tiles <= 0 || m <= 0 || tiles >= wave || tiles > kSplitCounters) return 1;
  int s = (2 * wave + tiles - 1) / tiles;
  s = imin(s, kMaxSplit);
  s = imin(s, ktiles / stages);
  s = imin(s, 2 * k_runs / m);
  return s > 1 ? s : 1;
}

// S of a launch of tile T with a's class plan (plan_classes done): split_count for request 0; a
// request >= 1 (tests, benchmarks) is taken as it is, clipped to 1..ktiles (no empty split), and to
// 1 when the grid has more output tiles than counters. The launcher and the CPU twin both call
// this, so the twin runs the kernel's split plan for the same (sms, m, shapes).
template <class T>
inline int plan_split(const Args& a, int sms, int blocks_per_sm, int request) {
  const int tiles = a.class_tile[a.classes.count] * ((a.m + T::BM - 1) / T::BM);
  const int k_runs = (a.k + 31) / 32;
  const int ktiles = (a.k + T::BK - 1) / T::BK;
  if (request <= 0) return split_count(sms, blocks_per_sm, tiles, a.m, k_runs, T::RUNS, T::STAGES);
  if (tiles > kSplitCounters) return 1;
  return imax(1, imin(request, ktiles));
}
// Workspace bytes (fp32 partials, 16-byte aligned) of a launch of S splits; 0 when S = 1.
inline int64_t split_workspace_bytes(int split, int m, int n) {
  return split > 1 ? int64_t(split) * m * n * 4 : 0;
}

}  // namespace gemm
}  // namespace bitfuse
