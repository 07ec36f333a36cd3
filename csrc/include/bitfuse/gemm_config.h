// THE per-architecture tile table of the tensor-core GEMM (csrc/cuda/gemm.cu). One row per target
// profile of python/bitfuse/targets.py (SM count and shared memory per SM from there and from
// shared/hardware.md); each row names a tile for small M (<= kSmallMaxM) and one for large M.
// The launcher and the CPU twin pick the tile from the device's compute capability and M with
// select_tile(); each architecture's device code compiles only the tiles of its own row
// (tile_built_for), so the build compiles 2 tiles × 3 bit widths × 2 dtypes per architecture.
//
// None of these choices has been measured on a GPU (no GPU was lent so far); the reasoning:
//  * small M (9..64): BM = 64 covers every M of the bucket in one block row, so each weight is
//    read and decoded once per launch (rows past M are zero-filled without a global read and
//    their mma tiles are skipped); BN = 64 keeps N/64 blocks in flight; WM = 1 (no warp decodes
//    another's weights), WN = 2 × WK = 2 (split-K inside the block for more loads in flight).
//    100 KB SMs (sm_86/89): BK = 64, 3 stages, 39 KB -> 2 blocks per SM. 164 KB (sm_87 Orin):
//    BK = 128, 3 stages, 73 KB -> 2 blocks. 228 KB (sm_90): BK = 128, 4 stages, 97 KB -> 2.
//  * large M (> 64): 128 × 128 tiles, 8 warps of 64 × 32 (16 mma per k16 step per warp, each
//    decoded B fragment reused by 4 m16 tiles). sm_86/89: BK = 32, 4 stages, 48.5 KB; sm_87:
//    BK = 64, 3 stages, 80 KB; sm_90: BK = 64, 4 stages, 104.5 KB: shared memory for 2 blocks
//    per SM everywhere, but registers (ptxas, sm_90: 171 a thread for this tile, 160 for the
//    small one; no spills) allow only 1 block of 8 warps per SM. Forcing 2 (launch bounds) would
//    cap registers at 128 and likely spill the 64 accumulators; to be decided on a GPU.
//  * Small grids (small M and small N: N/64 blocks) would want split-K across blocks with a
//    fixed-order reduction; not done yet (docs/STATUS.md).
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
constexpr int kTileCount = 6;

struct ArchConfig {
  int cc;              // compute capability, major·10 + minor
  int sms;             // targets.py TargetProfile.sms
  int smem_per_sm_kb;  // targets.py TargetProfile.smem_per_sm_kb
  int small_tile;      // tile id for M <= kSmallMaxM
  int large_tile;      // tile id for M > kSmallMaxM
};
constexpr int kArchRows = 4;
BF_HD constexpr ArchConfig arch_config(int row) {
  return row == 0   ? ArchConfig{86, 82, 100, 0, 3}    // rtx30: RTX 3090
         : row == 1 ? ArchConfig{87, 16, 164, 1, 4}    // orin: Jetson AGX Orin
         : row == 2 ? ArchConfig{89, 128, 100, 0, 3}   // rtx40: RTX 4090
                    : ArchConfig{90, 132, 228, 2, 5};  // h100 (and H200)
}
// Row of a compute capability; -1 below sm_80 (cp.async, bf16 mma and m16n8k16 need sm_80).
// Newer GPUs take the sm_90 row (they run the sm_90 PTX); sm_80 (A100, 164 KB) the Orin row.
BF_HD constexpr int arch_row(int cc) {
  return cc >= 90 ? 3 : cc == 89 ? 2 : (cc == 87 || cc == 80) ? 1 : cc >= 80 ? 0 : -1;
}
// Tile id for M rows of x on compute capability cc (-1: unsupported GPU).
BF_HD constexpr int select_tile(int cc, int m) {
  return arch_row(cc) < 0 ? -1
         : m <= kSmallMaxM ? arch_config(arch_row(cc)).small_tile
                           : arch_config(arch_row(cc)).large_tile;
}
// Whether device code for compute capability cc contains tile `id` (its row uses it).
BF_HD constexpr bool tile_built_for(int id, int cc) {
  return arch_row(cc) >= 0 &&
         (arch_config(arch_row(cc)).small_tile == id || arch_config(arch_row(cc)).large_tile == id);
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
    default: f.template run<5>(); break;
  }
}

// Shared memory a block of tile id needs, and what one block may have on a row's GPU (the SM's
// shared memory less the 1 KB the runtime reserves per block).
BF_HD constexpr int tile_smem(int id) {
  return id == 0   ? TileOf<0>::type::SMEM_BYTES
         : id == 1 ? TileOf<1>::type::SMEM_BYTES
         : id == 2 ? TileOf<2>::type::SMEM_BYTES
         : id == 3 ? TileOf<3>::type::SMEM_BYTES
         : id == 4 ? TileOf<4>::type::SMEM_BYTES
                   : TileOf<5>::type::SMEM_BYTES;
}
BF_HD constexpr int tile_threads(int id) {
  return id == 0   ? TileOf<0>::type::THREADS
         : id == 1 ? TileOf<1>::type::THREADS
         : id == 2 ? TileOf<2>::type::THREADS
         : id == 3 ? TileOf<3>::type::THREADS
         : id == 4 ? TileOf<4>::type::THREADS
                   : TileOf<5>::type::THREADS;
}
BF_HD constexpr int block_smem_limit(int row) { return (arch_config(row).smem_per_sm_kb - 1) * 1024; }
BF_HD constexpr bool table_fits(int row) {
  return row >= kArchRows ||
         (tile_smem(arch_config(row).small_tile) <= block_smem_limit(row) &&
          tile_smem(arch_config(row).large_tile) <= block_smem_limit(row) && table_fits(row + 1));
}
static_assert(table_fits(0), "a tile of the table needs more shared memory than its GPU has");

}  // namespace gemm
}  // namespace bitfuse
