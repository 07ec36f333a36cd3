// Static-analysis probes of the two CUDA GEMVs and the GEMM at small M (not part of the build): each probe kernel is the
// real kernel body (the .cu file is included as is) called with an Args whose branch pointers are
// compile-time null and whose group size and bit width are constants, so the compiler removes
// the residual, compact-scale, low-rank, sparse and bias code and leaves the steady-state loop of
// a plain layer. benchmarks/static/sass_count.py compiles this file per architecture and counts
// the SASS instructions of that loop per weight. Nothing here runs.
#if defined(PROBE_KERNEL_GEMM) || defined(PROBE_KERNEL_SKINNY)
#include "../../csrc/cuda/gemm.cu"
#elif defined(PROBE_KERNEL_TC)
#include "../../csrc/cuda/gemv_tc.cu"
#else
#include "../../csrc/cuda/gemv.cu"
#endif

namespace bitfuse {
namespace {

#if !defined(PROBE_KERNEL_GEMM) && !defined(PROBE_KERNEL_SKINNY)
__device__ __forceinline__ Args probe_args(int bits, int group, const uint32_t* q, const uint16_t* sc,
                                           const uint16_t* zr, const void* x, void* out, int m, int n,
                                           int k) {
  Args a{};
  a.x = x, a.out = out, a.qweight = q, a.scales = sc, a.zeros = zr;
  a.classes.count = 1, a.classes.bits[0] = bits, a.classes.rows[0] = n;
  a.class_word[0] = 0, a.class_first[0] = 0, a.class_vec[0] = 1;
  a.m = m, a.n = n, a.k = k, a.k_pad = k, a.group_size = group, a.x_vec = 1;
  return a;
}

#endif

#if defined(PROBE_KERNEL_GEMM)
// The tensor-core GEMM's main loop (gemm_mainloop) for a plain fp16 layer, on a tile with one m16
// tile a warp (BM = 16): the decode and mma work per weight of M <= 16, where only one m16 tile
// of the table's small tile is live. Same BN/BK/warps as sm_90's small tile.
template <int BITS>
__global__ void __launch_bounds__(128) probe_gemm(const uint32_t* q, const uint16_t* sc, const uint16_t* zr,
                                                  const void* x, void* out, int n, int k) {
  using T = gemm::Tile<16, 64, 128, 1, 2, 2, 4>;
  extern __shared__ __align__(16) char smem[];
  Args a{};
  a.x = x, a.out = out, a.qweight = q, a.scales = sc, a.zeros = zr, a.lda = k;
  a.classes.count = 1, a.classes.bits[0] = BITS, a.classes.rows[0] = n;
  a.m = 16, a.n = n, a.k = k, a.k_pad = k, a.group_size = 128, a.split = 1;
  a.class_vec[0] = 1, a.class_tile[0] = 0, a.class_tile[1] = (n + T::BN - 1) / T::BN;
  const BlockTile bt = gemm::block_tile(a, T::BN, T::BM, blockIdx.x, 0);
  const gemm::KRange kr = gemm::split_range((a.k + T::BK - 1) / T::BK, 1, 0);
  float acc[T::MT][T::NT][4];
  gemm_mainloop<T, BITS, mma::kDtypeF16>(a, bt, kr, smem, acc);
  float s = 0.0f;
  for (int j = 0; j < T::NT; ++j) s += acc[0][j][0] + acc[0][j][1] + acc[0][j][2] + acc[0][j][3];
  static_cast<float*>(out)[threadIdx.x] = s;
}
#define P(B) template __global__ void probe_gemm<B>(const uint32_t*, const uint16_t*, \
    const uint16_t*, const void*, void*, int, int);
P(2) P(3) P(4)
#undef P
#elif defined(PROBE_KERNEL_SKINNY)
// The GEMM's skinny tile (skinny_k_tile: exact codes as A, x as B, scales per group) for a plain
// fp16 layer at M = 16 (both n8 tiles of x live), group 32·RPG, on sm_90's skinny tile: the
// compute of one k tile per iteration, on one stage (the cp.async issue, which the GEMM row does
// not count either, is left out: it is a few instructions a 16-byte chunk, shared by the block).
template <int BITS, int RPG>
__global__ void __launch_bounds__(128, 3) probe_skinny(const uint32_t* q, const uint16_t* sc,
                                                       const uint16_t* zr, const void* x, void* out,
                                                       int n, int k) {
  using T = gemm::TileOf<7>::type;
  extern __shared__ __align__(16) char smem[];
  Args a{};
  a.x = x, a.out = out, a.qweight = q, a.scales = sc, a.zeros = zr, a.lda = k;
  a.classes.count = 1, a.classes.bits[0] = BITS, a.classes.rows[0] = n;
  a.m = 16, a.n = n, a.k = k, a.k_pad = k, a.group_size = 32 * RPG, a.split = 1;
  a.class_vec[0] = 1, a.class_tile[0] = 0, a.class_tile[1] = (n + T::BN - 1) / T::BN;
  const BlockTile bt = gemm::block_tile(a, T::BN, T::BM, blockIdx.x, 0);
  const gemm::KRange kr = gemm::split_range((a.k + T::BK - 1) / T::BK, 1, 0);
  const int* s_ri = reinterpret_cast<const int*>(smem + T::RI_OFF);
  SkinnyWarp<T, BITS> sw;
  skinny_warp<T, BITS>(a, bt, kr, s_ri, sw);
  float acc[T::A1][T::A2][4] = {};
#pragma unroll 1
  for (int kg = kr.kt0; kg < kr.kt1; ++kg)
    skinny_k_tile<T, BITS, mma::kDtypeF16, gemm::skinny_warp_group_runs<T>(RPG)>(a, smem, smem_addr(smem), kg, sw, acc);
  float s = 0.0f;
  for (int i = 0; i < T::A1; ++i)
    for (int j = 0; j < T::A2; ++j) s += acc[i][j][0] + acc[i][j][1] + acc[i][j][2] + acc[i][j][3];
  static_cast<float*>(out)[threadIdx.x] = s;
}
#define P(B, R) template __global__ void probe_skinny<B, R>(const uint32_t*, const uint16_t*, \
    const uint16_t*, const void*, void*, int, int);
P(2, 4) P(3, 4) P(4, 1) P(4, 2) P(4, 4)
#undef P

// The skinny tile's cp.async issue of an interior k tile (gemm.h SkinnyCopies: x, 16-byte weight
// copies; no residual plane), one k tile an iteration: what its pipeline adds to the compute.
template <int BITS>
__global__ void __launch_bounds__(128, 3) probe_skinnycopy(const uint32_t* q, const void* x, int n,
                                                           int k) {
  using T = gemm::TileOf<7>::type;
  extern __shared__ __align__(16) char smem[];
  Args a{};
  a.x = x, a.qweight = q, a.lda = k;
  a.classes.count = 1, a.classes.bits[0] = BITS, a.classes.rows[0] = n;
  a.m = 16, a.n = n, a.k = k, a.k_pad = k, a.group_size = 128, a.split = 1;
  a.class_vec[0] = 1, a.class_tile[0] = 0, a.class_tile[1] = (n + T::BN - 1) / T::BN;
  const BlockTile bt = gemm::block_tile(a, T::BN, T::BM, blockIdx.x, 0);
  const int* s_ri = reinterpret_cast<const int*>(smem + T::RI_OFF);
  gemm::SkinnyCopies<T, BITS> plan;
  plan.init(a, bt, 0, s_ri, false, threadIdx.x);
#pragma unroll 1
  for (int kt = 0; kt + 1 < k / T::BK; ++kt) {
    CpAsync cp{smem_addr(smem + (kt % T::STAGES) * T::STAGE_BYTES)};
    plan.issue(a, cp);
    cp_async_commit();
  }
}
#define P(B) template __global__ void probe_skinnycopy<B>(const uint32_t*, const void*, int, int);
P(2) P(3) P(4)
#undef P
#elif !defined(PROBE_KERNEL_TC)
// SIMT: gemv_tile<MT, BITS>, fp16 x, group 128.
template <int MT, int BITS>
__global__ void __launch_bounds__(gemv::kThreads) probe_simt(const uint32_t* q, const uint16_t* sc,
                                                             const uint16_t* zr, const void* x,
                                                             void* out, int n, int k) {
  __shared__ Smem sm;
  const Args a = probe_args(BITS, 128, q, sc, zr, x, out, MT, n, k);
  gemv_tile<MT, BITS>(a, 1, 0, int(blockIdx.x) * gemv::kRowsPerBlock, sm);
}
#define P(MT, B) template __global__ void probe_simt<MT, B>(const uint32_t*, const uint16_t*, \
    const uint16_t*, const void*, void*, int, int);
P(1, 2) P(1, 3) P(1, 4) P(4, 4) P(8, 2) P(8, 3) P(8, 4)
#else
// Tensor cores: tc_tile<BITS, fp16, RPG, no residual> (group 32·RPG), the instantiation a layer
// without a residual runs.
template <int BITS, int RPG>
__global__ void __launch_bounds__(gemv_tc::kThreads, 3) probe_tc(const uint32_t* q, const uint16_t* sc,
                                                              const uint16_t* zr, const void* x,
                                                              void* out, int m, int n, int k) {
  extern __shared__ __align__(16) char smem[];
  const Args a = probe_args(BITS, 32 * RPG, q, sc, zr, x, out, m, n, k);
  tc_tile<BITS, mma::kDtypeF16, RPG, false>(a, 0, int(blockIdx.x) * gemv_tc::kRowsPerBlock, smem);
}
#define P(B, R) template __global__ void probe_tc<B, R>(const uint32_t*, const uint16_t*, \
    const uint16_t*, const void*, void*, int, int, int);
P(2, 1) P(2, 2) P(2, 4) P(3, 1) P(3, 2) P(3, 4) P(4, 1) P(4, 2) P(4, 4)
#endif

}  // namespace
}  // namespace bitfuse
