// CPU twin of the tensor-core GEMM (csrc/cuda/gemm.cu): `_C.gemm_host` runs the kernel's
// algorithm block by block, warp by warp and lane by lane through the same header functions
// (bitfuse/gemm.h, bitfuse/mma_tile.h, bitfuse/gemm_config.h): the same tile table, class plan and
// copy plan (cp.async emulated with its zero-fill, into an emulated shared memory with the same
// byte layout and swizzle), the same per-lane B-fragment decode, ldmatrix emulated from the lanes'
// row addresses, mma.m16n8k16 emulated from the PTX ISA fragment layouts (fp16/bf16 operands,
// fp32 accumulation), the same split-K scratch and epilogue staging, the same low-rank staging
// (t and lr_up rows in shared memory, chunked, summed by every warp's lanes), and the same
// split-K across blocks (gemm_config.h plan_split for a given SM count, or a forced S: the same
// k ranges, fp32
// partials in a workspace, per-tile counters, the reduction by the block that counts last, in
// the order s = 0..S-1). It also checks what the hardware would fault on or slow down for:
// cp.async alignment and bounds, ldmatrix bank conflicts, that every output is written exactly
// once, that every partial the reduction reads was stored exactly once by its split, that the
// counters are back at 0 after the launch, that the low-rank staging stays inside its region of
// shared memory and reads only inside t / lr_up, and that its shared reads are conflict-free (the
// epilogue region is NaN before it, so a sum that read something not staged shows).
//
// Not emulated: timing (the pipeline's overlap; stages are filled and consumed in order, in the
// same stage slots), the tensor core's internal summation order (fp32 fma in k order here), and
// the sharing of one shared memory by concurrently running warps.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bitfuse/gemm_config.h"
#include "bitfuse/mma_tile.h"
#include "checks.h"
#include "mma_emu.h"

namespace py = pybind11;

namespace bitfuse {
namespace host {
namespace {

const char* kWho = "bitfuse gemm_host";

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// An exact-dtype array of the given shape (-1: any), copied into a 64-byte aligned buffer so that
// the alignment the kernel relies on (16-byte cp.async sources) is checked for real here.
struct Buf {
  std::vector<uint32_t> words;
  size_t offset = 0;  // in uint32 units, to a 64-byte boundary
  const void* data() const { return words.data() + offset; }
  void* data() { return words.data() + offset; }
};
Buf take(const py::array& a, const std::string& name, char kind, int size,
         std::vector<py::ssize_t> shape) {
  const auto dt = a.dtype();
  const bool int32ish = kind == 'i' && size == 4 && (dt.kind() == 'i' || dt.kind() == 'u');
  if (!(dt.kind() == kind || int32ish) || dt.itemsize() != size)
    fail(std::string(kWho) + ": " + name + " has dtype " + std::string(py::str(a.dtype())) +
         ", expected " + (kind == 'i' ? "int32" : kind == 'u' ? "uint8" : size == 2 ? "float16" : "float32"));
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) fail(std::string(kWho) + ": " + name + " has shape " + shape_str(a));
  const auto c = py::array::ensure(a, py::array::c_style);
  const size_t bytes = size_t(c.nbytes());
  Buf b;
  b.words.assign(bytes / 4 + 1 + 16, 0u);
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.words.data());
  b.offset = ((64 - p % 64) % 64) / 4;
  if (bytes) std::memcpy(b.data(), c.data(), bytes);
  return b;
}

struct Stats {
  int64_t copies = 0, copy_bytes = 0, ldsm = 0, ldsm_conflicts = 0, mma = 0;
  int64_t lds = 0, lds_conflicts = 0;  // the skinny tile's weight-word loads (warp-wide accesses)
  int64_t hoisted_tiles = 0;           // k tiles whose copies came from SkinnyCopies
  int64_t lr_loads = 0, lr_chunks = 0, lr_reads = 0, lr_conflicts = 0;
};

// The source tensors' byte ranges: every copy must read inside one of them (what
// compute-sanitizer would check on the GPU).
using Ranges = std::vector<std::pair<const char*, const char*>>;

// cp.async, emulated: `bytes` from src, zeros up to `size`; what the PTX ISA requires is checked.
struct EmuCopy {
  char* stage;
  int stage_bytes;
  Stats* st;
  const Ranges* ranges;
  void operator()(int size, int smem, const void* src, int bytes) const {
    if ((size != 4 && size != 16) || smem < 0 || smem % size || smem + size > stage_bytes)
      fail(std::string(kWho) + ": copy plan writes " + std::to_string(size) + " bytes at stage offset " +
           std::to_string(smem) + " (stage is " + std::to_string(stage_bytes) + " bytes)");
    if (bytes < 0 || bytes > size) fail(std::string(kWho) + ": copy plan reads a bad byte count");
    if (bytes && reinterpret_cast<uintptr_t>(src) % size)
      fail(std::string(kWho) + ": a " + std::to_string(size) + "-byte cp.async source is misaligned");
    const char* p = static_cast<const char*>(src);
    bool inside = bytes == 0;
    for (const auto& r : *ranges) inside = inside || (p >= r.first && p + bytes <= r.second);
    if (!inside) fail(std::string(kWho) + ": the copy plan reads outside its source tensor");
    if (bytes) std::memcpy(stage + smem, src, size_t(bytes));
    std::memset(stage + smem + bytes, 0, size_t(size - bytes));
    ++st->copies;
    st->copy_bytes += bytes;
  }
};

// lr_stage's loads and stores (gemm.h), emulated and checked: every load (dummies included) inside
// t or lr_up and aligned (`ranges`: what compute-sanitizer would check on the GPU), every store
// aligned and inside the low-rank region [lo, hi) of shared memory.
struct EmuLrIO {
  char* smem;
  int lo, hi;
  Stats* stats;
  const Ranges* ranges;
  template <class V>
  V ld(const V* src, bool real) const {
    const char* p = reinterpret_cast<const char*>(src);
    bool inside = false;
    for (const auto& r : *ranges) inside = inside || (p >= r.first && p + sizeof(V) <= r.second);
    if (!inside || reinterpret_cast<uintptr_t>(src) % sizeof(V))
      fail(std::string(kWho) + ": low-rank staging reads outside t / lr_up or misaligned");
    stats->lr_loads += real;
    V v;
    std::memcpy(&v, src, sizeof(V));
    return v;
  }
  template <class V>
  void st(int off, V v) const {
    if (off < lo || off % int(sizeof(V)) || off + int(sizeof(V)) > hi)
      fail(std::string(kWho) + ": low-rank staging stores outside its region (offset " +
           std::to_string(off) + ")");
    std::memcpy(smem + off, &v, sizeof(V));
  }
};

// The copies a stage's plan makes, recorded (SkinnyCopies against stage_copies).
struct RecordCopies {
  struct C {
    int size, smem;
    const void* src;
    int bytes;
    bool operator<(const C& o) const {
      return std::tie(smem, size, bytes, src) < std::tie(o.smem, o.size, o.bytes, o.src);
    }
    bool operator==(const C& o) const {
      return size == o.size && smem == o.smem && src == o.src && bytes == o.bytes;
    }
  };
  std::vector<C> list;
  void operator()(int size, int smem, const void* src, int bytes) { list.push_back(C{size, smem, src, bytes}); }
  bool same_as(RecordCopies other) const {
    std::vector<C> a = list;
    std::sort(a.begin(), a.end());
    std::sort(other.list.begin(), other.list.end());
    return a == other.list;
  }
};

// Bank conflicts of one warp-wide 32-bit shared load: lanes reading the same word are one access
// (broadcast); the access takes as many passes as the most distinct words one bank holds.
bool bank_conflict(const int word[32]) {
  for (int b = 0; b < 32; ++b) {
    int first = -1;
    for (int l = 0; l < 32; ++l) {
      if (word[l] % 32 != b) continue;
      if (first < 0) first = word[l];
      else if (word[l] != first) return true;
    }
  }
  return false;
}

uint16_t ld16(const char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16, emulated from the 32 lanes' row offsets.
void emu_ldsm(const char* stage, int stage_bytes, const int off[32], uint32_t out[32][4], Stats& st) {
  for (int l = 0; l < 32; ++l)
    if (off[l] % 16 || off[l] < 0 || off[l] + 16 > stage_bytes)
      fail(std::string(kWho) + ": an ldmatrix row address is misaligned or outside the stage");
  // One phase per 8x8 matrix: its 8 rows are conflict-free iff they sit in 8 different 16-byte
  // bank groups of a 128-byte line.
  for (int j = 0; j < 4; ++j) {
    int seen = 0;
    for (int r = 0; r < 8; ++r) seen |= 1 << ((off[8 * j + r] / 16) % 8);
    ++st.ldsm;
    if (seen != 0xFF) ++st.ldsm_conflicts;
  }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      const char* p = stage + off[mma::ldsm_src_lane(l, j)] + 2 * mma::ldsm_src_elem(l);
      out[l][j] = uint32_t(ld16(p)) | (uint32_t(ld16(p + 2)) << 16);
    }
}

// The skinny tile's main loop (gemm.cu skinny_mainloop / skinny_k_tile) for one block: per k
// tile, warp by warp, run by run (skinny_run), the lanes' A registers from the words the kernel
// reads (skinny_word, the same header decode skinny_codes / skinny_signs), B from the emulated
// ldmatrix at skinny_ldsm_offset, the mma emulated, Σx by the product with A = 1.0, the group
// sums started (first) and folded (last) where skinny_group_first / _last put them, with the
// parameters of the group the kernel's prefetch chain holds there (skinny_first_group /
// skinny_next_group: checked to be the group of the folded run), into the block's accumulators
// [warp][lane][mw][jx][e]. Also checks that every shared load of weight words (each of a lane's
// two rows, one warp-wide access each) is free of bank conflicts.
template <class T>
struct Skinny {
  const gemm::Args& a;
  const gemm::BlockTile& bt;
  const int* s_ri;
  bool res;
  int run_end, rpg, shift, L;
  std::vector<float> cq, cr, xs;  // [warp][lane][mw][jx][4], and xs [warp][lane][jx][4]
  std::vector<int> g;             // [warp]: the group whose parameters the kernel holds
  bool wres[T::WARPS];
  Skinny(const gemm::Args& a_, const gemm::BlockTile& bt_, const gemm::KRange& kr, const int* s_ri_,
         bool res_)
      : a(a_), bt(bt_), s_ri(s_ri_), res(res_) {
    if (!T::SWAP) return;  // the other tiles do not use it
    run_end = std::min(kr.kt1 * T::RUNS, (a.k + 31) / 32);
    rpg = a.group_size / 32;
    shift = gemm::skinny_rpg_shift(a.group_size);
    L = gemm::skinny_warp_group_runs<T>(rpg);
    cq.assign(size_t(T::WARPS) * 32 * T::ACC, 0.0f);
    cr = cq;
    xs.assign(size_t(T::WARPS) * 32 * T::NX * 4, 0.0f);
    g.assign(T::WARPS, 0);
    for (int warp = 0; warp < T::WARPS; ++warp) {
      const gemm::WarpPos w = gemm::warp_pos<T>(warp);
      bool any = false;
      for (int i = 0; i < T::WTN; ++i) any = any || s_ri[w.wn * T::WTN + i] >= 0;
      wres[warp] = res && any;  // __any_sync over the warp's rows
      g[size_t(warp)] = gemm::skinny_first_group<T>(kr.kt0, w.wk, shift);
    }
  }
  float* at(std::vector<float>& v, int warp, int lane, int mw, int jx) {
    return &v[(size_t(warp) * 32 + lane) * T::ACC + (mw * T::NX + jx) * 4];
  }
  float* xs_at(int warp, int lane, int jx) { return &xs[((size_t(warp) * 32 + lane) * T::NX + jx) * 4]; }

  template <int BITS, int DT, class Acc>
  void stage(int kt, const char* stage_mem, Acc& accp, Stats& st) {
    const uint32_t ones = exact::one_pair(DT);
    const uint32_t* sB = reinterpret_cast<const uint32_t*>(stage_mem + T::B_OFF);
    const uint32_t* sP = reinterpret_cast<const uint32_t*>(stage_mem + T::P_OFF);
    uint32_t one4[32][4];
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) one4[l][i] = ones;
    for (int warp = 0; warp < T::WARPS; ++warp) {
      const gemm::WarpPos w = gemm::warp_pos<T>(warp);
      const int nx = gemm::warp_n8_tiles<T>(a, bt, w.wm);
      for (int jr = 0; jr < T::RUNS_PER_WARP; ++jr) {
        const int rho = gemm::skinny_run<T>(w.wk, jr);
        const int R = kt * T::RUNS + rho;
        const bool first = gemm::skinny_group_first(jr, L);
        if (R < run_end) {
          uint32_t q[T::MW][2][32][4], r[T::MW][2][32][4];
          for (int i = 0; i < T::MW; ++i) {
            for (int h = 0; h < 2; ++h) {  // the weight words one lane loads per row: one access
              int word[32];
              for (int lane = 0; lane < 32; ++lane)
                word[lane] = (T::B_OFF / 4) + gemm::skinny_word<T, BITS>(w, i, lane, h, rho);
              ++st.lds;
              st.lds_conflicts += bank_conflict(word);
            }
            for (int lane = 0; lane < 32; ++lane) {
              const int t = lane & 3;
              uint32_t lo[2], hi[2], pl[2], c[8], sg[8];
              bool has[2];
              for (int h = 0; h < 2; ++h) {
                const int wi = gemm::skinny_word<T, BITS>(w, i, lane, h, rho);
                lo[h] = sB[wi];
                hi[h] = BITS == 3 ? sB[wi - exact::lane_word(BITS, t) + 2] : 0u;
                const int rr = gemm::skinny_row<T>(w, i, lane, h);
                pl[h] = wres[warp] ? sP[gemm::skinny_plane_word<T>(rr, rho)] : 0u;
                has[h] = s_ri[rr] >= 0;
              }
              gemm::skinny_codes<BITS, DT>(lo, hi, t, c);
              gemm::skinny_signs<DT>(pl, has, t, sg);
              for (int s = 0; s < 2; ++s)
                for (int e = 0; e < 4; ++e) {
                  q[i][s][lane][e] = c[4 * s + e];
                  r[i][s][lane][e] = sg[4 * s + e];
                }
            }
          }
          for (int j = 0; j < nx; ++j) {
            int off[32];
            uint32_t bx[32][4];
            for (int lane = 0; lane < 32; ++lane) off[lane] = gemm::skinny_ldsm_offset<T>(w, j, rho, lane);
            emu_ldsm(stage_mem, T::STAGE_BYTES, off, bx, st);
            for (int s = 0; s < 2; ++s) {
              const bool zc = first && s == 0;  // the kernel's C = 0: the group's first product
              uint32_t b0[32], b1[32];
              float* c[32];
              for (int lane = 0; lane < 32; ++lane) b0[lane] = bx[lane][2 * s], b1[lane] = bx[lane][2 * s + 1];
              auto mma = [&](std::vector<float>* v, int i, const uint32_t (*aa)[4]) {
                for (int lane = 0; lane < 32; ++lane) {
                  c[lane] = v ? at(*v, warp, lane, i, j) : xs_at(warp, lane, j);
                  if (zc) std::fill(c[lane], c[lane] + 4, 0.0f);
                }
                emu_mma(DT, c, aa, b0, b1);
                ++st.mma;
              };
              mma(nullptr, 0, one4);
              for (int i = 0; i < T::MW; ++i) {
                mma(&cq, i, q[i][s]);
                if (wres[warp]) mma(&cr, i, r[i][s]);
              }
            }
          }
        }
        if (!gemm::skinny_group_last(jr, L) || gemm::skinny_group_first_run<T>(kt, w.wk, jr, L) >= run_end)
          continue;
        if (g[size_t(warp)] != R / rpg)
          fail(std::string(kWho) + ": the skinny tile folds a group other than the one it loaded");
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < T::MW; ++i) {
            const gemm::SkinnyRows rows = gemm::skinny_rows<T>(a, bt, s_ri, w, lane, i);
            gemm::SkinnyParams par;
            float sc[2], zr[2], al[2];
            gemm::skinny_raw_params(a, rows, g[size_t(warp)], par);
            gemm::skinny_params(a, rows, par, sc, zr, al);
            for (int j = 0; j < T::NX; ++j)
              exact::fold_group(accp(warp, lane, i, j), at(cq, warp, lane, i, j), at(cr, warp, lane, i, j),
                                xs_at(warp, lane, j), sc, zr, al, wres[warp]);
          }
        g[size_t(warp)] = gemm::skinny_next_group<T>(kt, w.wk, jr, shift);
      }
    }
  }
};

struct Twin {
  gemm::Args a;
  int dtype, cc;
  uint64_t qweight_addr;  // what plan_classes sees (an odd value forces 4-byte weight copies)
  int sms, request;       // plan_split's inputs: SMs of the emulated GPU, forced S (0: its choice)
  bool reverse_splits;    // run the S blocks of a tile in the order S-1..0 (the last to count is s=0)
  bool lr_staged;         // the kernel's low-rank path (staged in shared memory); false: the scalar
                          // per-output loop of fused_epilogue, the bit-exact reference for it
  int lr_chunk;           // columns of r a chunk (0: the tile's LR_CHUNK; tests force smaller)
  std::vector<float>* y;
  std::vector<int>* written;
  Ranges ranges;
  Ranges lr_ranges;  // t and lr_up: what the low-rank staging may read
  Stats st;
  int ktiles = 0, tiles = 0;
  std::vector<float> partial{};        // the workspace, NaN until stored
  std::vector<int> partial_written{};  // stores per workspace float
  std::vector<int> counters{};

  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    gemm::plan_classes<T>(a, qweight_addr);
    if (lr_chunk == 0) lr_chunk = T::LR_CHUNK;
    if (lr_chunk > T::LR_CHUNK)
      fail(std::string(kWho) + ": lr_chunk is at most the tile's LR_CHUNK, " +
           std::to_string(T::LR_CHUNK));
    std::vector<uint32_t> smem(T::SMEM_BYTES / 4 + 1);
    const int n_tiles = a.class_tile[a.classes.count];
    const int m_tiles = (a.m + T::BM - 1) / T::BM;
    a.split = gemm::plan_split<T>(a, sms, gemm::tile_blocks_per_sm(cc, ID), request);
    ktiles = (a.k + T::BK - 1) / T::BK;
    tiles = n_tiles * m_tiles;
    if (a.split > 1) {
      partial.assign(size_t(gemm::split_workspace_bytes(a.split, a.m, a.n) / 4), std::nanf(""));
      partial_written.assign(partial.size(), 0);
      counters.assign(size_t(tiles), 0);
      a.partial = partial.data();
      a.counters = counters.data();
      if (tiles > gemm::kSplitCounters) fail(std::string(kWho) + ": split grid has more tiles than counters");
    }
    // The kernel's grid is (n tile, m tile, s), n fastest; blocks run in any order on the GPU.
    for (int tm = 0; tm < m_tiles; ++tm)
      for (int tn = 0; tn < n_tiles; ++tn)
        for (int j = 0; j < a.split; ++j) {
          const int s = reverse_splits && a.split > 1 ? a.split - 1 - j : j;
          const gemm::BlockTile bt = gemm::block_tile(a, T::BN, T::BM, tn, tm);
          const gemm::KRange kr = gemm::split_range(ktiles, a.split, s);
          char* sm = reinterpret_cast<char*>(smem.data());
          switch (a.classes.bits[bt.cls]) {
            case 2: block_dt<T, 2>(bt, kr, sm); break;
            case 3: block_dt<T, 3>(bt, kr, sm); break;
            default: block_dt<T, 4>(bt, kr, sm); break;
          }
          if (a.split > 1) {  // gemm.cu split_fixup: count in; the S-th block reduces and resets
            int& c = counters[size_t(gemm::split_counter(tn, tm, n_tiles))];
            if (c++ == a.split - 1) {
              c = 0;
              fixup<T>(bt, sm);
            }
          }
        }
    for (size_t i = 0; i < counters.size(); ++i)
      if (counters[i] != 0) fail(std::string(kWho) + ": a split-K counter is not back at 0");
  }

  // gemm.cu lowrank_tile: the low-rank sums of m16 tile i into the epilogue tiles, chunk by chunk
  // (the staging, then every warp's lanes; the barriers are the order of these loops). Each warp's
  // shared reads of lr_sums are checked for bank conflicts as warp-wide 32-bit accesses (the
  // pattern is the same for every column: all lanes add the same j): the lr_up word of each of
  // its LR_PB packed rows, and both words of the 8-byte t read of each of its LR_QB x rows.
  template <class T>
  void lowrank_tile(const gemm::BlockTile& bt, int i, char* sm) {
    const int chunk = lr_chunk;
    const bool one_chunk = a.r <= chunk;
    for (int c0 = 0; c0 < a.r; c0 += chunk) {
      const int len = gemm::lr_len(a.r, c0, chunk);
      EmuLrIO io{sm, T::LR_OFF, T::RI_OFF, &st, &lr_ranges};
      gemm::lr_stage<T>(a, bt, i, c0, len, !one_chunk || i == 0, 0, 1, io);
      ++st.lr_chunks;
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        float* epi = reinterpret_cast<float*>(sm + T::EPI_OFF) + w.wmn * T::EPI_FLOATS;
        int word[32];
        for (int p = 0; p < T::LR_PB; ++p) {
          for (int lane = 0; lane < 32; ++lane)
            word[lane] = gemm::lr_up_off<T>(w.wn * T::WTN + gemm::lr_lane_p<T>(lane, p), 0) / 4;
          ++st.lr_reads;
          st.lr_conflicts += bank_conflict(word);
        }
        for (int u = 0; u < T::LR_QB; ++u)
          for (int half = 0; half < 2; ++half) {
            for (int lane = 0; lane < 32; ++lane)
              word[lane] = gemm::lr_t_off<T>(w.wm * 16 + gemm::lr_lane_q<T>(w, lane) + u, half) / 4;
            ++st.lr_reads;
            st.lr_conflicts += bank_conflict(word);
          }
        for (int lane = 0; lane < 32; ++lane) gemm::lr_sums<T>(a, bt, w, lane, i, c0, len, sm, epi);
      }
    }
  }

  // The reduction of split_fixup (gemm.cu): by m16 tile (the low-rank sums first), each warp's
  // share of rows, lanes = packed rows; S partials summed in order s = 0..S-1, epilogue, store
  // through perm.
  template <class T>
  void fixup(const gemm::BlockTile& bt, char* sm) {
    const bool lowrank = a.t != nullptr && lr_staged;
    poison_lowrank<T>(sm);
    for (int i = 0; i < gemm::block_m_tiles<T>(a, bt); ++i) {
      if (lowrank) lowrank_tile<T>(bt, i, sm);
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        const float* epi = reinterpret_cast<const float*>(sm + T::EPI_OFF) + w.wmn * T::EPI_FLOATS;
        for (int lane = 0; lane < 32; ++lane)
          for (int q = gemm::lr_rows<T>(w.wk); q < gemm::lr_rows<T>(w.wk) + T::LR_QS; ++q) {
            int mi, row;
            if (!gemm::fixup_output<T>(a, bt, w, lane, i, q, &mi, &row)) continue;
            for (int s = 0; s < a.split; ++s)
              if (partial_written[size_t(gemm::partial_index(a, s, mi, row))] != 1)
                fail(std::string(kWho) + ": split-K reads a partial its split did not store exactly once");
            int col;
            float v = gemm::split_sum(a, mi, row);
            if (lowrank) {
              v += epi[gemm::lr_slot<T>(q, lane)];
              v = epilogue_tail(a, v, row, mi, &col);
            } else {
              v = gemm::epilogue(a, v, row, mi, &col);  // fused_epilogue (its scalar low-rank loop)
            }
            (*y)[size_t(mi) * a.n + col] = v;
            ++(*written)[size_t(mi) * a.n + col];
          }
      }
    }
  }

  // Garbage (NaN) where the low-rank staging and the epilogue tiles go, as the stages leave them on
  // the GPU: a sum that read anything not staged for it would come out NaN.
  template <class T>
  void poison_lowrank(char* sm) {
    std::memset(sm + T::EPI_OFF, 0xFF, size_t(T::RI_OFF - T::EPI_OFF));
  }

  template <class T, int BITS>
  void block_dt(const gemm::BlockTile& bt, const gemm::KRange& kr, char* sm) {
    if (dtype == mma::kDtypeBF16) block<T, BITS, mma::kDtypeBF16>(bt, kr, sm);
    else block<T, BITS, mma::kDtypeF16>(bt, kr, sm);
  }

  // One block of the kernel (gemm_mainloop + gemm_epilogue in gemm.cu), its warps and lanes run
  // one after another.
  template <class T, int BITS, int DT>
  void block(const gemm::BlockTile& bt, const gemm::KRange& kr, char* sm) {
    const bool res = a.res_index != nullptr;
    const bool vec = a.class_vec[bt.cls] != 0;
    int* s_ri = reinterpret_cast<int*>(sm + T::RI_OFF);
    for (int i = 0; i < T::BN; ++i)
      s_ri[i] = (res && bt.row0 + i < bt.row_end) ? a.res_index[bt.row0 + i] : -1;
    std::vector<float> acc(size_t(T::WARPS) * 32 * T::ACC, 0.0f);  // [warp][lane][i][j][e]
    auto accp = [&](int warp, int lane, int i, int j) {
      return &acc[(size_t(warp) * 32 + lane) * T::ACC + (i * T::A2 + j) * 4];
    };
    Skinny<T> sk(a, bt, kr, s_ri, res);
    // The skinny tile's hoisted copies (gemm.h SkinnyCopies), one per thread, as the kernel
    // makes them when the block's first k tile is interior and the class takes 16-byte copies.
    using Plan = gemm::SkinnyCopies<T, BITS>;
    const bool hoisted = T::SWAP && vec && Plan::interior(a, kr.kt0);
    std::vector<Plan> plans(hoisted ? T::THREADS : 0);
    for (int tid = 0; tid < int(plans.size()); ++tid) plans[size_t(tid)].init(a, bt, kr.kt0, s_ri, res, tid);
    uint32_t bfrag[32][T::NT][4];
    for (int kt = kr.kt0; kt < kr.kt1; ++kt) {
      char* stage = sm + ((kt - kr.kt0) % T::STAGES) * T::STAGE_BYTES;  // slots count from kt0
      EmuCopy cp{stage, T::STAGE_BYTES, &st, &ranges};
      // x rows past M are not copied (gemm.h x_chunks): NaN there, as garbage on the GPU, so an
      // output that read one would come out NaN
      std::memset(stage + T::A_OFF, 0xFF, size_t(T::BM) * T::BK * 2);
      if (hoisted && Plan::interior(a, kt)) {
        // the kernel's copies: every thread's plan; they must be stage_copies' copies exactly
        RecordCopies mine, plan_of_record;
        for (auto& p : plans) p.issue(a, mine);
        gemm::stage_copies<T, BITS>(a, bt, kt, s_ri, vec, res, 0, 1, plan_of_record);
        if (!mine.same_as(plan_of_record))
          fail(std::string(kWho) + ": the skinny tile's hoisted copies of k tile " + std::to_string(kt) +
               " are not the copy plan's");
        for (const auto& c : mine.list) cp(c.size, c.smem, c.src, c.bytes);
        ++st.hoisted_tiles;
      } else {
        gemm::stage_copies<T, BITS>(a, bt, kt, s_ri, vec, res, 0, 1, cp);
      }
      if constexpr (T::SWAP) {
        sk.template stage<BITS, DT>(kt, stage, accp, st);
        continue;
      }
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        const int mtiles = gemm::warp_m_tiles<T>(a, bt, w.wm);
        for (int jr = 0; jr < T::RUNS_PER_WARP; ++jr) {
          const int rho = gemm::warp_run<T>(w.wk, jr);
          if (kt * T::BK + 32 * rho >= a.k) break;
          for (int lane = 0; lane < 32; ++lane)
            gemm::decode_b<T, BITS, DT>(a, bt, kt, stage, s_ri, w, lane, rho, res, bfrag[lane]);
          for (int s = 0; s < 2; ++s)
            for (int i = 0; i < mtiles; ++i) {
              int off[32];
              uint32_t af[32][4];
              for (int lane = 0; lane < 32; ++lane)
                off[lane] = gemm::a_ldsm_offset<T>(w, i, rho, s, lane);
              emu_ldsm(stage, T::STAGE_BYTES, off, af, st);
              for (int j = 0; j < T::NT; ++j) {
                float* c[32];
                uint32_t b0[32], b1[32];
                for (int lane = 0; lane < 32; ++lane) {
                  c[lane] = accp(warp, lane, i, j);
                  b0[lane] = bfrag[lane][j][2 * s];
                  b1[lane] = bfrag[lane][j][2 * s + 1];
                }
                emu_mma(DT, c, af, b0, b1);
                ++st.mma;
              }
            }
        }
      }
    }
    // Split-K partials through the (reused) stage memory, summed by warp-k 0 in order 1, 2, ...
    if (T::WK > 1) {
      float* red = reinterpret_cast<float*>(sm);
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        if (w.wk == 0) continue;
        for (int lane = 0; lane < 32; ++lane)
          for (int q = 0; q < T::ACC; ++q)
            red[gemm::red_index<T>(w.wk, w.wmn, q, lane)] = acc[(size_t(warp) * 32 + lane) * T::ACC + q];
      }
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        if (w.wk != 0) continue;
        for (int p = 1; p < T::WK; ++p)
          for (int lane = 0; lane < 32; ++lane)
            for (int q = 0; q < T::ACC; ++q)
              acc[(size_t(warp) * 32 + lane) * T::ACC + q] += red[gemm::red_index<T>(p, w.wmn, q, lane)];
      }
    }
    // Epilogue by m16 tile (gemm.cu gemm_epilogue): with a low-rank branch (and S = 1) every warp
    // takes part in its sums first (lowrank_tile); then each output warp adds its accumulators
    // to the sums in their fragment layout (or stages them alone) and finishes its outputs.
    const bool lowrank = a.t != nullptr && a.split <= 1 && lr_staged;
    poison_lowrank<T>(sm);
    const int loop_tiles = lowrank ? gemm::block_m_tiles<T>(a, bt) : T::MT;
    for (int i = 0; i < loop_tiles; ++i) {
      if (lowrank) lowrank_tile<T>(bt, i, sm);
      for (int warp = 0; warp < T::WARPS; ++warp) {
        const gemm::WarpPos w = gemm::warp_pos<T>(warp);
        if (w.wk != 0 || i >= gemm::warp_m_tiles<T>(a, bt, w.wm)) continue;
        float* epi = reinterpret_cast<float*>(sm + T::EPI_OFF) + w.wmn * T::EPI_FLOATS;
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < T::A2; ++j)
            for (int e = 0; e < 4; ++e) {
              for (int i1 = 0; i1 < T::A1; ++i1) {
                // (i1, j) is the kernel's acc[i][j] (non-skinny: i1 = the m16 tile i) or
                // acc[mw][jx] (skinny: epilogue tile jx >> 1)
                if (T::SWAP ? (j >> 1) != i : i1 != i) continue;
                const int slot = T::SWAP ? gemm::skinny_epi_slot<T>(i1, j, lane, e)
                                         : gemm::epi_slot<T>(j, lane, e);
                const float acc_e = accp(warp, lane, i1, j)[e];
                epi[slot] = lowrank ? acc_e + epi[slot] : acc_e;  // acc + lr, as the kernel
              }
            }
        for (int o = 0; o < 16 * T::WTN; ++o) {
          const int mi = bt.m0 + gemm::epi_x_row<T>(w, i, o);
          const int row = bt.row0 + gemm::epi_packed_row<T>(w, o);
          if (mi >= a.m || row >= bt.row_end) continue;
          if (a.split > 1) {  // the raw partial, packed order
            const int64_t pi = gemm::partial_index(a, kr.s, mi, row);
            a.partial[pi] = epi[gemm::epi_src<T>(o)];
            ++partial_written[size_t(pi)];
            continue;
          }
          int col;
          const float acc_o = epi[gemm::epi_src<T>(o)];
          const float v = lowrank || !a.t ? epilogue_tail(a, acc_o, row, mi, &col)
                                          : gemm::epilogue(a, acc_o, row, mi, &col);  // scalar loop
          (*y)[size_t(mi) * a.n + col] = v;
          ++(*written)[size_t(mi) * a.n + col];
        }
      }
    }
  }
};

py::tuple gemm_host(const py::array& x_in, int dtype, int cc, const py::array& qweight_in,
                    const py::array& scales_in, const py::array& zeros_in,
                    std::optional<py::array> perm_in, std::optional<py::array> res_index_in,
                    std::optional<py::array> res_plane_in, std::optional<py::array> res_alpha_in,
                    std::optional<py::array> t_in, std::optional<py::array> lr_up_in,
                    std::optional<py::array> extra_in, std::optional<py::array> bias_in,
                    const std::vector<int>& class_bits, const std::vector<int>& class_rows, int n,
                    int k, int k_pad, int group_size, int tile, bool misaligned_weights, int sms,
                    int split, bool reverse_splits, bool lowrank_staged, int lr_chunk,
                    std::optional<py::array> scale_rows_in) {
  const ClassTable table = make_class_table(class_bits, class_rows, n, k, k_pad, group_size);
  if (dtype != mma::kDtypeF16 && dtype != mma::kDtypeBF16)
    fail(std::string(kWho) + ": dtype must be 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  if (x_in.ndim() != 2 || x_in.shape(1) != k)
    fail(std::string(kWho) + ": x must be (m, " + std::to_string(k) + "), got " + shape_str(x_in));
  const int m = int(x_in.shape(0));
  if (m < 1) fail(std::string(kWho) + ": m must be >= 1");
  if (tile < 0) tile = gemm::select_tile(cc, m, group_size);  // (skinny unless tile says otherwise)
  if (tile < 0 || tile >= gemm::kTileCount)
    fail(std::string(kWho) + ": no tile for cc=" + std::to_string(cc) + " (sm_80 or newer), tile=" +
         std::to_string(tile));
  if (sms < 0) sms = gemm::arch_row(cc) >= 0 ? gemm::arch_config(gemm::arch_row(cc)).sms : 1;
  if (sms < 1) fail(std::string(kWho) + ": sms must be >= 1 (or -1: the table's)");
  if (split < 0) fail(std::string(kWho) + ": split must be >= 0 (0: plan_split's choice)");
  const py::ssize_t G = k_pad / group_size;
  const int64_t total = class_word_offset(table.bits, table.rows, table.count, k_pad);

  // x: the activations as their fp16/bf16 bits in an (m, lda) buffer, lda = k rounded up to 8
  // (what backend_cuda hands the kernel), padding never read.
  const auto xf = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x_in);
  if (!xf || py::array(x_in).dtype().kind() != 'f')
    fail(std::string(kWho) + ": x must be a float32 array");
  const int64_t lda = (int64_t(k) + 7) / 8 * 8;
  Buf xb;
  xb.words.assign(size_t(m) * lda / 2 + 32, 0u);
  xb.offset = ((64 - reinterpret_cast<uintptr_t>(xb.words.data()) % 64) % 64) / 4;
  uint16_t* xh = static_cast<uint16_t*>(xb.data());
  const float* xs = xf.data();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) {
      const float v = xs[i * k + c];
      const uint16_t h = dtype == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(v) : mma::f32_to_f16_bits(v);
      if (!(mma::act_to_f32(h, dtype) == v || (std::isnan(v) && std::isnan(mma::act_to_f32(h, dtype)))))
        fail(std::string(kWho) + ": x must hold values of the activation dtype exactly");
      xh[i * lda + c] = h;
    }

  gemm::Args a{};
  a.classes = table;
  const Buf qweight = take(qweight_in, "qweight", 'i', 4, {py::ssize_t(total)});
  // fp16 pairs, or (with scale_rows) compact codes (FORMAT.md §5.1).
  const bool compact = bool(scale_rows_in);
  const Buf scales = take(scales_in, "scales", compact ? 'u' : 'f', compact ? 1 : 2, {n, G});
  const Buf zeros = take(zeros_in, "zeros", compact ? 'u' : 'f', compact ? 1 : 2, {n, G});
  const Buf scale_rows = compact ? take(*scale_rows_in, "scale_rows", 'f', 2, {n, 3}) : Buf();
  a.x = xb.data();
  a.lda = lda;
  a.qweight = static_cast<const uint32_t*>(qweight.data());
  set_scale_pointers(a, scales.data(), zeros.data(), compact ? scale_rows.data() : nullptr);
  Buf perm, res_index, res_plane, res_alpha, t, lr_up, extra, bias;
  if (perm_in) {
    perm = take(*perm_in, "perm", 'i', 4, {n});
    a.perm = static_cast<const int32_t*>(perm.data());
    std::vector<bool> seen(size_t(n), false);
    for (int i = 0; i < n; ++i) {
      const int p = a.perm[i];
      if (p < 0 || p >= n || seen[size_t(p)])
        fail(std::string(kWho) + ": perm must be a permutation of range(" + std::to_string(n) + ")");
      seen[size_t(p)] = true;
    }
  }
  if (bool(res_index_in) != bool(res_plane_in) || bool(res_index_in) != bool(res_alpha_in))
    fail(std::string(kWho) + ": res_index, res_plane and res_alpha are given together or not at all");
  if (res_index_in) {
    if (res_plane_in->ndim() != 2) fail(std::string(kWho) + ": res_plane must be 2-D");
    const py::ssize_t nr = res_plane_in->shape(0);
    res_index = take(*res_index_in, "res_index", 'i', 4, {n});
    res_plane = take(*res_plane_in, "res_plane", 'i', 4, {nr, k_pad / 32});
    res_alpha = take(*res_alpha_in, "res_alpha", 'f', 2, {nr, G});
    a.res_index = static_cast<const int32_t*>(res_index.data());
    for (int i = 0; i < n; ++i)
      if (a.res_index[i] < -1 || a.res_index[i] >= nr)
        fail(std::string(kWho) + ": res_index values must be -1 or in [0, " + std::to_string(nr) + ")");
    a.res_plane = static_cast<const uint32_t*>(res_plane.data());
    a.res_alpha = static_cast<const uint16_t*>(res_alpha.data());
    a.nr = int(nr);
  }
  if (bool(t_in) != bool(lr_up_in)) fail(std::string(kWho) + ": t and lr_up are given together");
  if (t_in) {
    if (t_in->ndim() != 2) fail(std::string(kWho) + ": t must be (m, r)");
    a.r = int(t_in->shape(1));
    t = take(*t_in, "t", 'f', 4, {m, a.r});
    lr_up = take(*lr_up_in, "lr_up", 'f', 2, {n, a.r});
    a.t = static_cast<const float*>(t.data());
    a.lr_up = static_cast<const uint16_t*>(lr_up.data());
  }
  if (extra_in) {
    extra = take(*extra_in, "extra", 'f', 4, {m, n});
    a.extra = static_cast<const float*>(extra.data());
  }
  if (bias_in) {
    bias = take(*bias_in, "bias", 'f', 4, {n});
    a.bias = static_cast<const float*>(bias.data());
  }
  a.m = m, a.n = n, a.k = k, a.k_pad = k_pad, a.group_size = group_size;
  const std::string big = gemm::group_index_error(a);
  if (!big.empty()) fail(std::string(kWho) + big);

  std::vector<float> y(size_t(m) * n, 0.0f);
  std::vector<int> written(size_t(m) * n, 0);
  auto range = [](const void* p, int64_t bytes) {
    return std::make_pair(static_cast<const char*>(p), static_cast<const char*>(p) + bytes);
  };
  Ranges ranges = {range(a.x, int64_t(m) * lda * 2), range(a.qweight, total * 4)};
  if (!compact) {  // compact codes are read directly, not copied (gemm.h stage_copies)
    ranges.push_back(range(a.scales, int64_t(n) * G * 2));
    ranges.push_back(range(a.zeros, int64_t(n) * G * 2));
  }
  if (a.res_index) {
    ranges.push_back(range(a.res_plane, int64_t(a.nr) * (k_pad / 32) * 4));
    ranges.push_back(range(a.res_alpha, int64_t(a.nr) * G * 2));
  }
  if (lr_chunk < 0) fail(std::string(kWho) + ": lr_chunk must be >= 0 (0: the tile's)");
  Ranges lr_ranges;
  if (a.t) lr_ranges = {range(a.t, int64_t(m) * a.r * 4), range(a.lr_up, int64_t(n) * a.r * 2)};
  Twin tw{a,      dtype,         cc, reinterpret_cast<uint64_t>(a.qweight) + (misaligned_weights ? 4 : 0),
          sms,    split,         reverse_splits, lowrank_staged, lr_chunk,
          &y,     &written,      ranges, lr_ranges,
          Stats{}};
  gemm::with_tile(tile, tw);
  for (size_t i = 0; i < written.size(); ++i)
    if (written[i] != 1)
      fail(std::string(kWho) + ": output (" + std::to_string(i / size_t(n)) + ", " +
           std::to_string(i % size_t(n)) + ") was written " + std::to_string(written[i]) + " times");

  py::array_t<float> out({py::ssize_t(m), py::ssize_t(n)});
  std::memcpy(out.mutable_data(), y.data(), y.size() * sizeof(float));
  py::dict info;
  info["tile"] = tile;
  info["copies"] = tw.st.copies;
  info["copy_bytes"] = tw.st.copy_bytes;
  info["ldsm"] = tw.st.ldsm;
  info["ldsm_conflicts"] = tw.st.ldsm_conflicts;
  info["mma"] = tw.st.mma;
  info["lds"] = tw.st.lds;                    // skinny tile: warp-wide weight-word loads
  info["lds_conflicts"] = tw.st.lds_conflicts;  // of which bank-conflicted
  info["hoisted_tiles"] = tw.st.hoisted_tiles;  // k tiles copied by the skinny tile's hoisted plan
  info["lr_loads"] = tw.st.lr_loads;          // global loads of the low-rank staging
  info["lr_chunks"] = tw.st.lr_chunks;        // (m16 tile, chunk) stagings
  info["lr_reads"] = tw.st.lr_reads;          // warp-wide shared reads checked for bank conflicts
  info["lr_conflicts"] = tw.st.lr_conflicts;  // of which conflicted
  info["lr_chunk"] = tw.lr_chunk;
  int vec = 0;
  for (int c = 0; c < table.count; ++c) vec += tw.a.class_vec[c];
  info["vec_classes"] = vec;
  info["split"] = tw.a.split;
  info["sms"] = sms;
  info["tiles"] = tw.tiles;
  info["ktiles"] = tw.ktiles;
  py::list ranges_out;
  for (int s = 0; s < (tw.a.split > 1 ? tw.a.split : 1); ++s) {
    const gemm::KRange kr = gemm::split_range(tw.ktiles, tw.a.split, s);
    ranges_out.append(py::make_tuple(kr.kt0, kr.kt1));
  }
  info["k_ranges"] = ranges_out;  // k tiles [kt0, kt1) of each split
  info["workspace_bytes"] = gemm::split_workspace_bytes(tw.a.split, m, n);
  return py::make_tuple(out, info);
}

// ---- small hooks for the tests ------------------------------------------------------------------

struct TileInfo {
  py::dict d;
  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    d["id"] = ID, d["bm"] = T::BM, d["bn"] = T::BN, d["bk"] = T::BK, d["wm"] = T::WM;
    d["wn"] = T::WN, d["wk"] = T::WK, d["stages"] = T::STAGES, d["threads"] = T::THREADS;
    d["smem"] = T::SMEM_BYTES, d["swap"] = T::SWAP;
  }
};

py::list gemm_tile_table() {
  py::list rows;
  for (int r = 0; r < gemm::kArchRows; ++r) {
    const gemm::ArchConfig c = gemm::arch_config(r);
    TileInfo s, l, k;
    gemm::with_tile(c.small_tile, s);
    gemm::with_tile(c.large_tile, l);
    gemm::with_tile(c.skinny_tile, k);
    py::dict d;
    d["cc"] = c.cc, d["sms"] = c.sms, d["smem_per_sm_kb"] = c.smem_per_sm_kb;
    d["small"] = s.d, d["large"] = l.d, d["small_max_m"] = gemm::kSmallMaxM;
    d["skinny"] = k.d, d["skinny_max_m"] = gemm::kSkinnyMaxM;
    d["skinny_group_sizes"] = py::make_tuple(32, 64, 128);  // gemm.h skinny_takes_group_size
    d["small_blocks"] = c.small_blocks, d["large_blocks"] = c.large_blocks;
    d["skinny_blocks"] = c.skinny_blocks;
    rows.append(d);
  }
  return rows;
}

// The launch plan (tile, split-K) the kernel makes for m rows on compute capability cc with `sms`
// SMs, without running anything: the same plan_classes / plan_split calls as the launcher.
struct PlanInfo {
  gemm::Args a;
  int cc, sms, request;
  py::dict d;
  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    gemm::plan_classes<T>(a, 0);
    a.split = gemm::plan_split<T>(a, sms, gemm::tile_blocks_per_sm(cc, ID), request);
    const int ktiles = (a.k + T::BK - 1) / T::BK;
    py::list ranges;
    for (int s = 0; s < a.split; ++s) {
      const gemm::KRange kr = gemm::split_range(ktiles, a.split, s);
      ranges.append(py::make_tuple(kr.kt0, kr.kt1));
    }
    d["tile"] = ID, d["split"] = a.split, d["ktiles"] = ktiles, d["bk"] = T::BK;
    d["stages"] = T::STAGES, d["k_ranges"] = ranges;
    d["tiles"] = a.class_tile[a.classes.count] * ((a.m + T::BM - 1) / T::BM);
    d["blocks_per_sm"] = gemm::tile_blocks_per_sm(cc, ID), d["sms"] = sms;
    d["workspace_bytes"] = gemm::split_workspace_bytes(a.split, a.m, a.n);
  }
};

py::dict gemm_plan_host(int cc, int m, const std::vector<int>& class_bits,
                        const std::vector<int>& class_rows, int n, int k, int k_pad, int group_size,
                        int sms, int split, bool skinny) {
  gemm::Args a{};
  a.classes = make_class_table(class_bits, class_rows, n, k, k_pad, group_size);
  if (m < 1) fail(std::string(kWho) + ": m must be >= 1");
  a.group_size = group_size, a.no_skinny = !skinny;
  const int tile = gemm::select_tile(cc, m, gemm::tile_group_size(a));
  if (tile < 0) fail(std::string(kWho) + ": no tile for cc=" + std::to_string(cc) + " (sm_80 or newer)");
  if (sms < 0) sms = gemm::arch_config(gemm::arch_row(cc)).sms;
  if (sms < 1) fail(std::string(kWho) + ": sms must be >= 1 (or -1: the table's)");
  if (split < 0) fail(std::string(kWho) + ": split must be >= 0 (0: plan_split's choice)");
  a.m = m, a.n = n, a.k = k, a.k_pad = k_pad, a.group_size = group_size;
  PlanInfo p{a, cc, sms, split, py::dict()};
  gemm::with_tile(tile, p);
  return p.d;
}

// A stage whose x tile holds 256·r + c at element (r, c), written as the copy plan places it
// (through the swizzle): what the layout tests read back through the emulated ldmatrix.
template <class T>
std::vector<uint32_t> numbered_x_tile() {
  std::vector<uint32_t> stage(T::STAGE_BYTES / 4, 0u);
  char* st8 = reinterpret_cast<char*>(stage.data());
  for (int r = 0; r < T::BM; ++r)
    for (int c = 0; c < T::BK; ++c) {
      const uint16_t v = uint16_t(256 * r + c);
      std::memcpy(st8 + T::A_OFF + mma::a_tile_offset(r, c - c % 8, T::BK) + 2 * (c % 8), &v, 2);
    }
  return stage;
}

// The 8 values each lane receives from an ldmatrix.x4 at the lanes' offsets `off` of the numbered
// x tile (register j, low half first) into L (32, 8).
template <class T>
void read_numbered_x_tile(const int off[32], py::array_t<int32_t>* L, Stats& st) {
  std::vector<uint32_t> stage = numbered_x_tile<T>();
  uint32_t r[32][4];
  emu_ldsm(reinterpret_cast<const char*>(stage.data()), T::STAGE_BYTES, off, r, st);
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 8; ++e) L->mutable_at(l, e) = int32_t(uint16_t(r[l][e >> 1] >> (16 * (e & 1))));
}

// Fills an x tile whose element (r, c) is 256·r + c and reads one m16k16 fragment back through
// the emulated ldmatrix (mma_layout_test).
struct LayoutFill {
  int i, rho, s;
  py::array_t<int32_t>* L;
  Stats st;
  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    if (i < 0 || i >= T::MT || rho < 0 || rho >= T::RUNS || s < 0 || s > 1)
      fail(std::string(kWho) + ": m16 tile / run / step outside the tile");
    const gemm::WarpPos w = gemm::warp_pos<T>(0);
    int off[32];
    for (int l = 0; l < 32; ++l) off[l] = gemm::a_ldsm_offset<T>(w, i, rho, s, l);
    read_numbered_x_tile<T>(off, L, st);
  }
};

// The fragment layouts and the ldmatrix path of tile `tile`'s x tile, for tests that re-derive them
// from the PTX ISA: for each lane, (row, col) of A elements 0..7, B elements 0..3 (k, n), C 0..3;
// and `ldsm`: the 8 values lane receives from an emulated x tile whose element (r, c) holds
// 256·r + c, loaded through the tile's swizzle and the kernel's ldmatrix addresses (m16 tile i,
// run rho, step s of warp 0).
py::dict mma_layout_test(int tile, int i, int rho, int s) {
  if (tile < 0 || tile >= gemm::kTileCount) fail(std::string(kWho) + ": no such tile");
  py::array_t<int32_t> A({32, 8, 2}), B({32, 4, 2}), C({32, 4, 2}), L({32, 8});
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 8; ++e) A.mutable_at(l, e, 0) = mma::a_row(l, e), A.mutable_at(l, e, 1) = mma::a_col(l, e);
    for (int e = 0; e < 4; ++e) {
      B.mutable_at(l, e, 0) = mma::b_row(l, e), B.mutable_at(l, e, 1) = mma::b_col(l, e);
      C.mutable_at(l, e, 0) = mma::c_row(l, e), C.mutable_at(l, e, 1) = mma::c_col(l, e);
    }
  }
  LayoutFill f{i, rho, s, &L, Stats{}};
  gemm::with_tile(tile, f);
  py::dict d;
  d["a"] = A, d["b"] = B, d["c"] = C, d["ldsm"] = L, d["ldsm_conflicts"] = f.st.ldsm_conflicts;
  return d;
}

// The skinny tile's B path (gemm.h skinny_ldsm_offset): an x tile whose element (r, c) holds
// 256·r + c, written through the swizzle, read by the ldmatrix.x4 of n8 tile jx, run rho of the
// warp at (wn, wk) = (0, wk): the 8 values lane receives (register j, low half first).
struct SkinnyLayoutFill {
  int jx, rho, wk;
  py::array_t<int32_t>* L;
  Stats st;
  template <int ID>
  void run() {
    using T = typename gemm::TileOf<ID>::type;
    if (!T::SWAP) fail(std::string(kWho) + ": not a skinny tile");
    if (jx < 0 || jx >= T::NX || rho < 0 || rho >= T::RUNS || wk < 0 || wk >= T::WK)
      fail(std::string(kWho) + ": n8 tile / run / warp outside the tile");
    const gemm::WarpPos w = gemm::warp_pos<T>(wk * T::WM * T::WN);
    int off[32];
    for (int l = 0; l < 32; ++l) off[l] = gemm::skinny_ldsm_offset<T>(w, jx, rho, l);
    read_numbered_x_tile<T>(off, L, st);
  }
};
py::dict skinny_layout_test(int tile, int jx, int rho, int wk) {
  if (tile < 0 || tile >= gemm::kTileCount) fail(std::string(kWho) + ": no such tile");
  py::array_t<int32_t> L({32, 8});
  SkinnyLayoutFill f{jx, rho, wk, &L, Stats{}};
  gemm::with_tile(tile, f);
  py::dict d;
  d["ldsm"] = L, d["ldsm_conflicts"] = f.st.ldsm_conflicts;
  return d;
}

// One lane's B fragment of one run (mma_tile.h b_values / b_fragment), fp16 arguments as bits.
py::tuple b_fragment_test(const py::array& words_in, int bits, int t, uint16_t scale, uint16_t zero,
                          bool res, uint32_t sign_byte, uint16_t alpha, int dtype) {
  check_bits(bits);
  if (t < 0 || t > 3) fail(std::string(kWho) + ": t is a quad thread, 0..3");
  if (dtype != mma::kDtypeF16 && dtype != mma::kDtypeBF16) fail(std::string(kWho) + ": dtype 1 or 2");
  const auto words = py::array::ensure(words_in, py::array::c_style);
  if (words.dtype().itemsize() != 4 || words.ndim() != 1 || words.shape(0) != bits)
    fail(std::string(kWho) + ": one run is " + std::to_string(bits) + " int32 words");
  const uint32_t* w = static_cast<const uint32_t*>(words.data());
  const float s = half_to_float(scale), z = half_to_float(zero), al = half_to_float(alpha);
  float v[8];
  uint32_t b[4];
  if (bits == 4) mma::b_values<4>(w, t, s, z, res, sign_byte, al, v);
  else if (bits == 3) mma::b_values<3>(w, t, s, z, res, sign_byte, al, v);
  else mma::b_values<2>(w, t, s, z, res, sign_byte, al, v);
  auto frag = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (bits == 4) mma::b_fragment<4, DT>(w, t, s, z, res, sign_byte, al, b);
    else if (bits == 3) mma::b_fragment<3, DT>(w, t, s, z, res, sign_byte, al, b);
    else mma::b_fragment<2, DT>(w, t, s, z, res, sign_byte, al, b);
  };
  if (dtype == mma::kDtypeBF16) frag(std::integral_constant<int, mma::kDtypeBF16>{});
  else frag(std::integral_constant<int, mma::kDtypeF16>{});
  py::array_t<float> vals(8);
  py::array_t<uint32_t> regs(4);
  py::array_t<int32_t> cols(8);
  for (int i = 0; i < 8; ++i) vals.mutable_at(i) = v[i], cols.mutable_at(i) = mma::b_run_col(t, i);
  for (int i = 0; i < 4; ++i) regs.mutable_at(i) = b[i];
  return py::make_tuple(vals, regs, cols);
}

// fp32 -> fp16 / bf16 bits as the kernel rounds B (mma_tile.h f32_to_*_bits, host path).
py::array_t<uint16_t> round_to_act_test(const py::array_t<float, py::array::c_style | py::array::forcecast>& v,
                                        int dtype) {
  py::array_t<uint16_t> out(v.size());
  const float* p = v.data();
  for (py::ssize_t i = 0; i < v.size(); ++i)
    out.mutable_at(i) = dtype == mma::kDtypeBF16 ? mma::f32_to_bf16_bits(p[i]) : mma::f32_to_f16_bits(p[i]);
  return out;
}

}  // namespace

void register_gemm_host_ops(py::module_& m) {
  m.def("gemm_host", &gemm_host, py::arg("x"), py::arg("dtype"), py::arg("cc"), py::arg("qweight"),
        py::arg("scales"), py::arg("zeros"), py::arg("perm"), py::arg("res_index"),
        py::arg("res_plane"), py::arg("res_alpha"), py::arg("t"), py::arg("lr_up"),
        py::arg("extra"), py::arg("bias"), py::arg("class_bits"), py::arg("class_rows"),
        py::arg("n"), py::arg("k"), py::arg("k_pad"), py::arg("group_size"),
        py::arg("tile") = -1, py::arg("misaligned_weights") = false, py::arg("sms") = -1,
        py::arg("split") = 0, py::arg("reverse_splits") = false, py::arg("lowrank_staged") = true,
        py::arg("lr_chunk") = 0, py::arg("scale_rows") = py::none(),
        "CPU twin of gemm_cuda (same header code, emulated cp.async / ldmatrix / mma): x (m, k) "
        "float32 holding fp16 (dtype 1) or bf16 (dtype 2) values; the tile is the one the kernel "
        "picks on compute capability cc (e.g. 86, 87, 89, 90) for m, or `tile` (an id of "
        "gemm_tile_table). misaligned_weights: plan as if qweight were not 16-byte aligned "
        "(4-byte weight copies). Split-K across blocks as the kernel plans it for `sms` SMs (-1: "
        "the table's count for cc), or a forced S (`split` >= 1; 0: the plan's); reverse_splits "
        "runs each tile's S blocks last-first. lowrank_staged=False: the low-rank term by "
        "fused_epilogue's scalar loop per output instead of the kernel's shared-memory staging (the "
        "bit-exact reference for it); lr_chunk: columns of r a staging chunk (0: the tile's). "
        "Returns (y (m, n) float32 before the cast, info dict: tile, split, k_ranges (k tiles of "
        "each split), workspace_bytes, copy stats, lr_chunk and low-rank staging stats, ...).");
  m.def("gemm_plan_host", &gemm_plan_host, py::arg("cc"), py::arg("m"), py::arg("class_bits"),
        py::arg("class_rows"), py::arg("n"), py::arg("k"), py::arg("k_pad"), py::arg("group_size"),
        py::arg("sms") = -1, py::arg("split") = 0, py::arg("skinny") = true,
        "The GEMM's launch plan on compute capability cc with `sms` SMs (-1: the table's), as the "
        "kernel makes it (gemm_config.h plan_split): dict(tile, split, ktiles, bk, stages, "
        "k_ranges, tiles, blocks_per_sm, sms, workspace_bytes).");
  m.def("gemm_tile_table", &gemm_tile_table,
        "The GEMM's per-architecture tile table (bitfuse/gemm_config.h) as a list of dicts.");
  m.def("mma_layout_test", &mma_layout_test, py::arg("tile"), py::arg("i") = 0, py::arg("rho") = 0,
        py::arg("s") = 0, "mma_tile.h fragment layouts and the emulated ldmatrix path (tests).");
  m.def("skinny_layout_test", &skinny_layout_test, py::arg("tile"), py::arg("jx") = 0,
        py::arg("rho") = 0, py::arg("wk") = 0,
        "The skinny tile's ldmatrix B path (gemm.h skinny_ldsm_offset) on an emulated x tile whose "
        "element (r, c) is 256·r + c: dict(ldsm (32, 8) values lane receives, ldsm_conflicts).");
  m.def("b_fragment_test", &b_fragment_test, py::arg("words"), py::arg("bits"), py::arg("t"),
        py::arg("scale_bits"), py::arg("zero_bits"), py::arg("res"), py::arg("sign_byte"),
        py::arg("alpha_bits"), py::arg("dtype"),
        "mma_tile.h b_values / b_fragment for quad thread t of one run: (8 fp32 weights, 4 packed "
        "B registers, the run column of each weight).");
  m.def("round_to_act_test", &round_to_act_test, py::arg("values"), py::arg("dtype"),
        "fp32 -> fp16 (dtype 1) / bf16 (dtype 2) bits, rounded as the GEMM rounds its B operand.");
}

}  // namespace host
}  // namespace bitfuse
