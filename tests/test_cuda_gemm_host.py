"""The CUDA tensor-core GEMM on the CPU (layer 3): csrc/include/bitfuse/mma_tile.h, gemm.h and
gemm_config.h through bitfuse._C, against the PTX ISA's fragment layouts, bitfuse.pack and the
torch reference.

`_C.gemm_host` runs csrc/cuda/gemm.cu's algorithm block by block, warp by warp and lane by lane
with the kernel's own header functions: tile table, class plan, copy plan into an emulated shared
memory (cp.async zero-fill, swizzle), per-lane B decode, ldmatrix from the lanes' row addresses,
mma.m16n8k16 emulated from the ISA layouts, split-K scratch, epilogue staging, and split-K across
blocks (the kernel's plan, k ranges, fp32 partials, per-tile counters, the reduction by the block
that counts last). What only a GPU can check (the PTX itself, the pipeline's timing, real bank
behaviour, the memory ordering of the split-K counters, speed) is in tests/test_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _cuda_probe import assert_fails_cleanly_without_gpu
from _tolerance import assert_within, branch_magnitudes, factored_branch_magnitudes, matmul_bound
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cuda_host import _f16_bits, _layer, _np, _scale_arrays

from bitfuse import _C, pack, reference, targets

DTYPES = {1: torch.float16, 2: torch.bfloat16}
ARCHS = (86, 87, 89, 90)


# ---- fragment layouts, written out from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
# floating point type", "ldmatrix") independently of mma_tile.h ----------------------------------

def _ptx_a(lane, i):
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _ptx_b(lane, i):  # (k, n)
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def _ptx_c(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


SIZES = ("skinny", "small", "large")  # gemm_config.h: M <= 16 (groups 32/64/128), M <= 64, above


def _tiles():
    return sorted({r[s]["id"] for r in _C.gemm_tile_table() for s in SIZES})


def _tile_info(tile):
    return next(r[s] for r in _C.gemm_tile_table() for s in SIZES if r[s]["id"] == tile)


def _expected_tile(cc, m, g):
    """The tile the table gives m rows of x at group size g on compute capability cc."""
    row = next(r for r in _C.gemm_tile_table() if r["cc"] == cc)
    if m <= row["skinny_max_m"] and g in row["skinny_group_sizes"]:
        return row["skinny"]["id"]
    return row["small" if m <= row["small_max_m"] else "large"]["id"]


def _dense_mags(pw, tile):
    """|W| pieces for the bound of a GEMM result: the skinny tile sums the factored products
    (exact codes times x, then s, m, α per group: factored_magnitude), the others Ŵ rounded to
    x's dtype (operand rounding, see _check)."""

    class _Q:  # the magnitude helpers want an object with .packed
        packed = pw

    return factored_branch_magnitudes(_Q) if _tile_info(tile)["swap"] else branch_magnitudes(_Q)


def test_fragment_layouts_are_the_ptx_isa():
    d = _C.mma_layout_test(0)
    for lane in range(32):
        assert [tuple(d["a"][lane, i]) for i in range(8)] == [_ptx_a(lane, i) for i in range(8)]
        assert [tuple(d["b"][lane, i]) for i in range(4)] == [_ptx_b(lane, i) for i in range(4)]
        assert [tuple(d["c"][lane, i]) for i in range(4)] == [_ptx_c(lane, i) for i in range(4)]
    # each layout covers its matrix exactly once
    assert len({tuple(d["a"][lane, i]) for lane in range(32) for i in range(8)}) == 256
    assert len({tuple(d["b"][lane, i]) for lane in range(32) for i in range(4)}) == 128
    assert len({tuple(d["c"][lane, i]) for lane in range(32) for i in range(4)}) == 128


@pytest.mark.parametrize("tile", _tiles())
def test_ldmatrix_through_the_swizzle_yields_the_a_fragment(tile):
    """The x tile written through the swizzle, read back by the kernel's ldmatrix addresses,
    gives every lane exactly its A elements of the ISA layout, without bank conflicts."""
    info = _tile_info(tile)
    mt = info["bm"] // info["wm"] // 16
    for i in sorted({0, mt - 1}):
        for rho in sorted({0, info["bk"] // 32 - 1}):
            for s in (0, 1):
                d = _C.mma_layout_test(tile, i, rho, s)
                assert d["ldsm_conflicts"] == 0
                for lane in range(32):
                    want = [256 * (16 * i + r) + 32 * rho + 16 * s + c
                            for r, c in (_ptx_a(lane, e) for e in range(8))]
                    assert d["ldsm"][lane].tolist() == want, (tile, i, rho, s, lane)


@pytest.mark.parametrize("tile", sorted({r["skinny"]["id"] for r in _C.gemm_tile_table()}))
def test_skinny_ldmatrix_yields_the_b_fragments(tile):
    """The skinny tile's B operand is x: the ldmatrix.x4 of n8 tile jx and run rho gives lane l,
    in register 2s + h, the ISA's B register h of k16 step s for x row (column n) 8jx + l / 4:
    k = 16s + 2t + 8h + {0, 1} of the run (t = l % 4), through the swizzle, without conflicts."""
    info = _tile_info(tile)
    for wk in range(info["wk"]):
        for jx in range(info["bm"] // 8):
            for rho in sorted({0, 1, info["bk"] // 32 - 1}):
                d = _C.skinny_layout_test(tile, jx, rho, wk)
                assert d["ldsm_conflicts"] == 0
                for lane in range(32):
                    want = []
                    for s_ in (0, 1):
                        for e in range(4):  # B elements b0..b3 of step s_: registers 2s_, 2s_ + 1
                            k, n = _ptx_b(lane, e)
                            want.append(256 * (8 * jx + n) + 32 * rho + 16 * s_ + k)
                    assert d["ldsm"][lane].tolist() == want, (tile, jx, rho, lane)


def test_round_to_act_is_round_to_nearest_even():
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(4000, generator=gen) * 10 ** torch.randint(-9, 6, (4000,), generator=gen),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25,
                                 3 * 2.0**-26, 2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                                 float("inf"), float("-inf"), 1e-45, 3.0e38])])
    for code, dt in DTYPES.items():
        got = _C.round_to_act_test(v.numpy(), code).astype(np.int64)
        want = v.to(dt).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
        np.testing.assert_array_equal(got, want)
    nan = _C.round_to_act_test(np.array([np.nan], dtype=np.float32), 1)[0]
    assert (nan & 0x7C00) == 0x7C00 and (nan & 0x3FF)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from((2, 3, 4)), t=st.integers(0, 3), data=st.data(), res=st.booleans(),
       sign=st.integers(0, 255), scale=st.floats(0, 2.0, width=16),
       zero=st.floats(-2.0, 2.0, width=16), alpha=st.floats(0, 0.5, width=16),
       dtype=st.sampled_from((1, 2)))
def test_b_fragment_is_the_lanes_slots(bits, t, data, res, sign, scale, zero, alpha, dtype):
    """Quad thread t's 8 weights of a run are the reference's Ŵ at the columns the ISA puts in its
    B registers (k = 2t + {0, 1, 8, 9} of both k16 steps), bit for bit, and its registers are
    them rounded to the activation dtype, low column in the low half."""
    words = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=bits, max_size=bits)),
                     dtype=np.uint32).view(np.int32)
    vals, regs, cols = _C.b_fragment_test(words, bits, t, _f16_bits(scale), _f16_bits(zero), res,
                                          sign, _f16_bits(alpha), dtype)
    q = pack.unpack_codes(torch.from_numpy(words).reshape(1, -1), bits, 32).float()[0]
    w = q * torch.tensor(scale, dtype=torch.float16).float() + torch.tensor(zero, dtype=torch.float16).float()
    if res:
        # the lane's sign byte: bit j is slot 8t + j (FORMAT.md §6), placed as a full plane word
        plane = torch.tensor([np.uint32(sign << (8 * t)).view(np.int32)], dtype=torch.int32)
        s = pack.unpack_signs(plane.reshape(1, 1), 32).float()[0] * 2 - 1
        w = w + torch.tensor(alpha, dtype=torch.float16).float() * s
    for v in range(8):
        pair, half = v >> 1, v & 1
        step, reg = pair >> 1, pair & 1
        k, _ = _ptx_b(t, 2 * reg + half)  # lane t of group 0 holds element 2·reg + half
        assert cols[v] == 16 * step + k
    np.testing.assert_array_equal(vals, w[cols].numpy())
    halves = _C.round_to_act_test(vals, dtype).astype(np.uint32)
    np.testing.assert_array_equal(regs, halves[0::2] | (halves[1::2] << 16))


# ---- the whole GEMM's CPU twin vs the torch reference ---------------------------------------------

BRANCHES = {  # name -> (residual, rank, sparse, bias)
    "plain": (False, 0, False, False),
    "bias": (False, 0, False, True),
    "residual": (True, 0, False, False),
    "lowrank": (False, 4, False, False),
    "sparse": (False, 0, True, False),
    "all": (True, 4, True, True),
    "all+compact": (True, 4, True, True, True),  # compact scales (FORMAT.md §5.1)
}


def _branch_layer(class_bits, class_rows, k, g, branches, seed):
    res, rank, sparse, bias, *compact = BRANCHES[branches]
    return _layer(class_bits, class_rows, k, g, res, rank, sparse, bias, seed=seed, compact=bool(compact))


def _gemm_host(x, pw, dtype=1, cc=90, tile=-1, misaligned=False, sms=-1, split=0, reverse=False,
               **kw):
    """What backend_cuda.gemm hands the kernel, through the CPU twin; x fp32 holding dtype values."""
    t = lr_up = extra = None
    if pw.lr_down is not None:
        t = (x @ pw.lr_down.float().t()) * pw.lr_scale.float()
        lr_up = pw.lr_up.half()
    if pw.sp_values is not None:
        extra = reference.sparse_apply(x, pw)
    scales, zeros, rows = _scale_arrays(pw)
    y, info = _C.gemm_host(
        x.numpy(), dtype, cc, _np(pw.qweight), scales, zeros, _np(pw.perm),
        _np(pw.res_index), _np(pw.res_plane), _np(pw.res_alpha), _np(t), _np(lr_up), _np(extra),
        _np(pw.bias), pw.class_bits, pw.class_rows, pw.out_features, pw.in_features, pw.k_pad,
        pw.group_size, tile=tile, misaligned_weights=misaligned, sms=sms, split=split,
        reverse_splits=reverse, **rows, **kw)
    return torch.from_numpy(y), info


def _x(pw, m, dtype, seed):
    return torch.randn(m, pw.in_features, generator=torch.Generator().manual_seed(seed)).to(DTYPES[dtype]).float()


def _check(pw, m, dtype=1, cc=90, tile=-1, misaligned=False, seed=0, what="", sms=-1, split=0,
           reverse=False):
    x = _x(pw, m, dtype, seed)
    y, info = _gemm_host(x, pw, dtype, cc, tile, misaligned, sms, split, reverse)
    if tile < 0:
        assert info["tile"] == _expected_tile(cc, m, pw.group_size), info
    # Small and large tiles: Ŵ is the reference's fp32 value bit for bit, rounded once to the
    # activation dtype for the tensor core (operand_dtype), products exact, fp32 accumulation in
    # another order. The skinny tile: no rounding before the fp32 sums of the factored products.
    skinny = _tile_info(info["tile"])["swap"]
    bound = matmul_bound(x, _dense_mags(pw, info["tile"]), torch.float32,
                         operand_dtype=None if skinny else DTYPES[dtype], bias=pw.bias)
    assert_within(y, reference.linear(x, pw), bound, what)
    assert info["ldsm_conflicts"] == 0, info
    assert info["lds_conflicts"] == 0 and (info["lds"] > 0) == skinny, info
    info["y"], info["x"], info["order_bound"] = y, x, matmul_bound(
        x, _dense_mags(pw, info["tile"]), torch.float32, bias=pw.bias)
    return info


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g,k", [(32, 71), (64, 200), (128, 257)])
@pytest.mark.parametrize("branches", list(BRANCHES))
def test_gemm_host_matches_reference(bits, g, k, branches):
    """Every width × group × branch, small-M tile (M = 17: one m16 tile and a masked one)."""
    pw = _branch_layer([bits], [37], k, g, branches, seed=bits * 7 + k)
    _check(pw, 17, cc=ARCHS[(bits + k) % 4], what=f"{bits}b g{g} k{k} {branches}")


MIXED = [([2, 3, 4], [16, 32, 5]), ([4, 2], [7, 9]), ([3, 4, 2], [64, 0, 21]), ([4, 3], [1, 130])]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g,k", [(32, 71), (64, 200), (128, 257), (128, 1000)])
@pytest.mark.parametrize("branches", list(BRANCHES))
def test_gemm_host_skinny_matches_reference(bits, g, k, branches):
    """The skinny tile (M <= 16: exact codes times x, the scales per group): every width × group
    × branch, M from 1 to 16 (one n8 tile of x and a masked one, both), K ending inside a run and
    spanning several k tiles, fp16 and bf16, both architectures' skinny tiles; its weight-word
    loads free of bank conflicts (checked by the twin for every warp and run)."""
    pw = _branch_layer([bits], [70], k, g, branches, seed=bits * 13 + k)
    for i, m in enumerate((1, 7, 9, 16)):
        cc = ARCHS[(bits + i + k) % 4]
        dtype = 1 + (bits + i) % 2
        info = _check(pw, m, dtype, cc, seed=i, what=f"{bits}b g{g} k{k} {branches} m={m} sm_{cc}")
        assert _tile_info(info["tile"])["swap"]


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_skinny_hoisted_copies_are_the_copy_plan(bits, misaligned):
    """The skinny tile's interior k tiles take their copies from a per-thread hoisted plan
    (gemm.h SkinnyCopies); the twin issues those and fails unless each such k tile's copies are
    exactly stage_copies' (checked inside). K = 1000 at BK = 128: 7 interior k tiles a block and
    a partial last one; with split-K the splits start at other k tiles; classes whose rows take
    4-byte copies, and a block whose first k tile is the last, keep the copy plan."""
    pw = _layer([bits, 4], [45, 20], 1000, 64, True, 2, True, True, seed=bits)
    for split in (1, 3):
        info = _check(pw, 12, 1, 90, misaligned=misaligned, split=split, what=f"{bits}b S={split}")
        if misaligned:
            assert info["hoisted_tiles"] == 0
        else:  # both classes 16-byte copyable: every block's interior k tiles are hoisted
            assert info["hoisted_tiles"] == info["tiles"] * 7, info
    one = _layer([bits], [30], 100, 32, True, 0, False, False, seed=bits)  # one k tile, not interior
    assert _check(one, 16, 2, 86, what="one k tile")["hoisted_tiles"] == 0


def test_skinny_tile_takes_only_its_group_sizes():
    """M <= 16 runs the skinny tile for groups of 32/64/128 and the small tile for any other
    group size (a PackedWeight may carry one), with the right result; M = 17 the small tile."""
    pw = _layer([4], [40], 600, 256, True, 2, False, True, seed=5)
    for cc in ARCHS:
        row = next(r for r in _C.gemm_tile_table() if r["cc"] == cc)
        assert _check(pw, 16, 1, cc, what=f"g256 sm_{cc}")["tile"] == row["small"]["id"]
        assert _plan(cc, 16, 40, 600, g=128)["tile"] == row["skinny"]["id"]
        assert _plan(cc, 17, 40, 600, g=128)["tile"] == row["small"]["id"]
        assert _plan(cc, 16, 40, 600, g=128, skinny=False)["tile"] == row["small"]["id"]


@pytest.mark.parametrize("m", [9, 16, 17, 40, 64, 65, 130])
@pytest.mark.parametrize("dtype", [1, 2])
@pytest.mark.parametrize("compact", [False, True], ids=["fp16-scales", "compact-scales"])
def test_gemm_host_mixed_classes_all_branches(m, dtype, compact):
    """Mixed classes (boundaries not multiples of 16, an empty class, a 1-row class) with every
    branch, over M across the small/large switch, fp16 and bf16, each architecture's tiles."""
    for i in ((m + dtype) % 4, (m + dtype + 2) % 4):  # every layout twice over the M × dtype grid
        cb, cr = MIXED[i]
        pw = _layer(cb, cr, 133 + 2 * i, [32, 64, 128, 64][i], True, 3, True, True, seed=m + i,
                    compact=compact)  # compact scales: FORMAT.md §5.1
        cc = ARCHS[(m + i) % 4]
        _check(pw, m, dtype, cc, seed=i, what=f"{cb} {cr} m={m} dt={dtype} sm_{cc}")  # checks the tile


@pytest.mark.parametrize("tile", _tiles())
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("compact", [False, True], ids=["fp16-scales", "compact-scales"])
def test_gemm_host_every_tile_and_copy_width(tile, misaligned, compact):
    """Each tile of the table, with 16-byte weight copies where the rows allow them and with
    4-byte ones only; K spans several k tiles of every tile and ends inside a run. Compact scales
    are read directly, not staged: both forms with both copy widths."""
    pw = _layer([4, 2, 3], [80, 16, 19], 389, 64, True, 2, False, True, seed=tile, compact=compact)
    info = _check(pw, 70, 2 if tile % 2 else 1, tile=tile, misaligned=misaligned,
                  what=f"tile {tile} misaligned={misaligned}")
    if misaligned:
        assert info["vec_classes"] == 0
    else:
        assert info["vec_classes"] >= 1  # the 4-bit class at word 0 is 16-byte copyable


def test_gemm_host_check_can_fail():
    """The comparison is sharp: one flipped code word is far outside the bound."""
    pw = _layer([4], [24], 96, 32, False, 0, False, False, seed=1)
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)).half().float()
    y, _ = _gemm_host(x, pw)
    pw.tensors["qweight"] = pw.qweight.clone()
    pw.qweight[5] ^= 0x0F0F0F0F
    with pytest.raises(AssertionError, match="bound"):
        bound = matmul_bound(x, [reference.dense_weight(pw).abs()], torch.float32,
                             operand_dtype=torch.float16)
        assert_within(y, reference.linear(x, pw), bound, "flipped word")


def test_gemm_host_rejects_bad_arguments():
    pw = _layer([4], [16], 64, 32, False, 0, False, False, seed=0)
    x = torch.randn(16, 64).half().float()
    with pytest.raises(ValueError, match="dtype"):
        _gemm_host(x, pw, dtype=3)
    with pytest.raises(ValueError, match="sm_80"):
        _gemm_host(x, pw, cc=75)
    with pytest.raises(ValueError, match="exactly"):
        _gemm_host(torch.randn(16, 64) / 3, pw)  # not fp16 values
    with pytest.raises(ValueError, match="x must be"):
        _gemm_host(torch.randn(16, 65).half().float(), pw)


# ---- split-K across blocks ------------------------------------------------------------------------

def _plan(cc, m, n, k, g=128, bits=(4,), rows=None, sms=-1, split=0, skinny=True):
    rows = rows or [n]
    return _C.gemm_plan_host(cc, m, list(bits), list(rows), n, k, pack.padded_k(k, g), g, sms=sms,
                             split=split, skinny=skinny)


def _wave(cc, tile_id):
    row = next(r for r in _C.gemm_tile_table() if r["cc"] == cc)
    size = next(s for s in SIZES if row[s]["id"] == tile_id)
    return row["sms"] * row[f"{size}_blocks"]


@pytest.mark.parametrize("cc", ARCHS)
def test_split_plan_properties(cc):
    """gemm_config.h split_count over a sweep of shapes: S = 1 when the grid fills a wave; else
    at most ~2 waves of blocks, each split at least STAGES k tiles, fp32 partial traffic at most
    the 4-bit weight bytes (8·S·m <= K/2); k ranges contiguous, balanced and covering K; the
    workspace is (S, m, n) fp32."""
    seen_split = False
    for m in (9, 16, 17, 33, 64, 65, 128, 200, 256, 1024, 4096):
        for n in (64, 192, 1000, 4096, 11008):
            for k in (64, 257, 1024, 4096, 11008):
                p = _plan(cc, m, n, k)
                s, tiles, kt = p["split"], p["tiles"], p["ktiles"]
                wave = _wave(cc, p["tile"])
                assert p["blocks_per_sm"] * p["sms"] == wave
                assert 1 <= s <= 16
                if tiles >= wave:
                    assert s == 1, p
                if s > 1:
                    seen_split = True
                    assert s <= -(-2 * wave // tiles), p
                    assert kt // s >= p["stages"], p
                    assert 8 * s * m <= pack.padded_k(k, 32) // 2, p
                ranges = p["k_ranges"]
                assert len(ranges) == s and ranges[0][0] == 0 and ranges[-1][1] == kt
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                sizes = [b - a for a, b in ranges]
                assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
                assert p["workspace_bytes"] == (4 * s * m * n if s > 1 else 0)
    assert seen_split
    # for one layer and one tile, more rows of x never split more (more tiles, the traffic term)
    for lo, hi in ((1, 16), (17, 64), (65, 8192)):
        splits = [_plan(cc, m, 4096, 4096)["split"] for m in range(lo, hi + 1, 7)]
        assert splits == sorted(splits, reverse=True), (cc, lo, splits)


def test_split_plan_issue_shapes():
    """The issue's case (M = 16, N = K = 4096): split on the big GPUs, not on Orin (its 16 SMs
    are already full with 64 blocks); large M is never split; S follows the SM count given."""
    want = {86: 8, 87: 1, 89: 10, 90: 8}  # the skinny tile (3 blocks an SM, 3 or 4 stages)
    for cc, s in want.items():
        p = _plan(cc, 16, 4096, 4096)
        assert p["split"] == s, (cc, p)
        assert p["tiles"] == 64
        for m in (256, 1024, 4096, 8192):
            assert _plan(cc, m, 4096, 4096)["split"] == 1, (cc, m)
    assert _plan(90, 16, 4096, 4096, sms=16)["split"] == 1  # a grid that fills the GPU: no split
    assert _plan(90, 16, 4096, 4096, sms=1000)["split"] == 8  # capped by ktiles / stages (32 / 4)
    assert _plan(89, 64, 4096, 4096)["split"] == 4  # the traffic term: 2·128/64
    # forced S (tests): clipped to the k tiles, never an empty split
    assert _plan(90, 16, 64, 100, split=5)["split"] == 1  # 1 k tile of 128
    assert _plan(86, 17, 64, 300, split=50)["split"] == 5  # the small tile: 5 k tiles of 64
    assert _plan(86, 16, 64, 300, split=50)["split"] == 3  # the skinny tile: 3 k tiles of 128
    assert _plan(86, 16, 64, 300, split=1)["split"] == 1
    # M = 16 on the skinny tile and, with skinny=False, on the small tile: both split on the big GPUs
    for cc in (86, 89, 90):
        row = next(r for r in _C.gemm_tile_table() if r["cc"] == cc)
        assert _plan(cc, 16, 4096, 4096)["tile"] == row["skinny"]["id"]
        small = _plan(cc, 16, 4096, 4096, skinny=False)
        assert small["tile"] == row["small"]["id"] and small["split"] > 1


SPLITS = (2, 3, 64)  # 64: clipped to one k tile a split


@pytest.mark.parametrize("m", [16, 17])  # the skinny and the small tile
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("branches", list(BRANCHES))
def test_gemm_host_split_k_matches_unsplit(bits, branches, m):
    """Forced S > 1 for every width × branch, odd K and N: the result is within the fp32
    summation-order bound of the S = 1 result (same operands, partial sums added in another
    order) and within the reference bound; the blocks' arrival order does not change a bit (the
    reduction is always s = 0..S-1); every partial is stored once and every counter ends at 0
    (checked inside the twin)."""
    k = [455, 389, 333][bits - 2]
    g = [32, 64, 128][bits - 2]
    pw = _branch_layer([bits], [45], k, g, branches, seed=bits * 11 + len(branches))
    cc = ARCHS[bits % 4]
    what = f"{bits}b g{g} k{k} {branches} sm_{cc}"
    base = _check(pw, m, cc=cc, split=1, what=what + " S=1")
    assert base["split"] == 1 and base["workspace_bytes"] == 0
    x, y1 = base["x"], base["y"]
    for split in SPLITS:
        info = _check(pw, m, cc=cc, split=split, what=f"{what} S={split}")
        assert info["split"] == min(split, info["ktiles"]) > 1
        assert info["workspace_bytes"] == 4 * info["split"] * m * pw.out_features
        cover = [c for a, b in info["k_ranges"] for c in range(a, b)]
        assert cover == list(range(info["ktiles"]))
        assert_within(info["y"], y1, base["order_bound"], f"{what} S={split} vs S=1")
        rev = _check(pw, m, cc=cc, split=split, reverse=True, what=f"{what} S={split} reversed")
        assert torch.equal(rev["y"], info["y"]), "split-K result depends on the arrival order"


@pytest.mark.parametrize("m", [9, 17, 64, 65, 130])
@pytest.mark.parametrize("dtype", [1, 2])
def test_gemm_host_split_k_mixed_classes(m, dtype):
    """Forced S = 3 with mixed classes (unaligned boundaries, an empty class, a 1-row class) and
    every branch, small and large tiles (M across the switch, masked M), fp16 and bf16, each
    architecture's tiles, odd K: vs the reference and vs S = 1."""
    for i in ((m + dtype) % 4, (m + dtype + 2) % 4):
        cb, cr = MIXED[i]
        pw = _layer(cb, cr, 901 + 2 * i, [32, 64, 128, 64][i], True, 3, True, True, seed=m + i)
        cc = ARCHS[(m + i + dtype) % 4]
        what = f"{cb} {cr} m={m} dt={dtype} sm_{cc}"
        info = _check(pw, m, dtype, cc, seed=i, split=3, what=what)
        plan = _plan(cc, m, pw.out_features, pw.in_features, pw.group_size, cb, cr, split=3)
        assert info["split"] == plan["split"] == 3 and info["k_ranges"] == plan["k_ranges"]
        one = _check(pw, m, dtype, cc, seed=i, split=1, what=what + " S=1")
        assert_within(info["y"], one["y"], one["order_bound"], what + " vs S=1")


def test_gemm_host_split_k_by_the_table():
    """Without forcing anything, the table's SM count splits small grids, and the twin runs
    exactly the plan: 4 N tiles (150 + 42 rows) on an RTX 4090's 128 SMs, on the skinny tile and
    on the small one; 2 large tiles on an H100."""
    pw = _layer([4, 2], [150, 42], 1024, 128, True, 0, False, True, seed=3)
    plan = _plan(89, 16, 192, 1024, 128, [4, 2], [150, 42])
    assert plan["split"] == 2 and plan["tile"] == 6  # min(ceil(768/4), 16, 8/3 = 2, 2·32/16 = 4)
    info = _check(pw, 16, 1, 89, what="table plan, skinny tile")
    assert info["split"] == 2 and info["sms"] == 128 and info["k_ranges"] == plan["k_ranges"]
    plan = _plan(89, 16, 192, 1024, 128, [4, 2], [150, 42], skinny=False)
    assert plan["split"] == 4 and plan["tile"] == 0  # min(ceil(512/4), 16, 16/3 = 5, 2·32/16 = 4)
    info = _check(pw, 16, 1, 89, tile=0, what="table plan, small tile")
    assert info["split"] == 4 and info["k_ranges"] == plan["k_ranges"]
    pw = _layer([3, 4], [67, 64], 2101, 64, False, 2, True, True, seed=4)
    plan = _plan(90, 65, 131, 2101, 64, [3, 4], [67, 64])
    assert plan["split"] == 2 and plan["tile"] == 5  # min(132, 16, 33/4, 2·66/65 = 2)
    info = _check(pw, 65, 2, 90, what="table plan, large tile")
    assert info["split"] == 2 and info["k_ranges"] == plan["k_ranges"]


# ---- the low-rank up-projection, staged in shared memory -----------------------------------------

# 130: more than one chunk of sm_86/89's small tile (88 columns) and large tile (72); odd ranks
# leave an odd last chunk
LR_RANKS = (1, 4, 33, 64, 130)


def _bits(y):
    return y.contiguous().view(torch.int32)


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rank", LR_RANKS)
def test_gemm_host_lowrank_staged(rank, split, cc):
    """The low-rank term t·L_upᵀ staged per block in shared memory (gemm.h lr_stage / lr_sums:
    t rows and lr_up rows in chunks of the tile's LR_CHUNK columns of r, summed from there), in
    the block's epilogue (S = 1) and in split-K's reducing block (S = 3, or 2 where K has 2 k
    tiles), with mixed classes and
    every other branch, the small and the large tile of each architecture: within the reference
    bound, and bit for bit what fused_epilogue's scalar per-output loop gives (the kernel before
    the staging: lowrank_staged=False), also with chunks forced to 7 columns (many chunks, odd
    starts and an odd last one). Its shared reads are free of bank conflicts, and with r in one
    chunk every t and lr_up element is loaded once per block."""
    table = {r["cc"]: r for r in _C.gemm_tile_table()}[cc]
    for m, dtype in ((13, 2), (17, 1), (130, 2)):  # skinny, small, large tiles
        i = (rank + cc + m) % 4
        cb, cr = MIXED[i]
        k, g = 133 + 2 * i, [32, 64, 128, 64][i]
        pw = _layer(cb, cr, k, g, True, rank, True, True, seed=rank + m + i)
        what = f"r={rank} S={split} sm_{cc} m={m} {cb} {cr}"
        info = _check(pw, m, dtype, cc, seed=i, split=split, what=what)
        assert info["split"] == min(split, info["ktiles"]) and (split == 1) == (info["split"] == 1)
        assert info["lr_conflicts"] == 0 and info["lr_reads"] > 0, info
        x, y = info["x"], info["y"]
        scalar, _ = _gemm_host(x, pw, dtype, cc, split=split, lowrank_staged=False)
        assert torch.equal(_bits(y), _bits(scalar)), what + ": staged != fused_epilogue's loop"
        small, sinfo = _gemm_host(x, pw, dtype, cc, split=split, lr_chunk=7)
        assert sinfo["lr_chunk"] == 7 and sinfo["lr_conflicts"] == 0
        assert torch.equal(_bits(small), _bits(scalar)), what + ": 7-column chunks"
        tile = _tile_info(_expected_tile(cc, m, g))
        assert info["tile"] == tile["id"]
        m_tiles = -(-m // tile["bm"])
        n_tiles = info["tiles"] // m_tiles
        if rank <= info["lr_chunk"]:  # one chunk: each block loads its t rows and lr_up rows once
            assert info["lr_loads"] == (m * n_tiles + pw.out_features * m_tiles) * rank, info
        else:
            assert info["lr_chunks"] > n_tiles * m_tiles


def test_gemm_host_lowrank_chunk_sizes():
    """LR_CHUNK per tile is what the stages leave after the epilogue tiles (gemm.h); a forced
    chunk larger than it is refused."""
    pw = _layer([4], [16], 64, 32, False, 2, False, False, seed=0)
    x = _x(pw, 16, 1, 0)
    chunks = {}
    for tile in _tiles():
        _, info = _gemm_host(x, pw, 1, tile=tile)
        chunks[tile] = info["lr_chunk"]
    assert chunks == {0: 88, 1: 272, 2: 400, 3: 72, 4: 152, 5: 216, 6: 104, 7: 160}
    with pytest.raises(ValueError, match="lr_chunk"):
        _gemm_host(x, pw, 1, tile=0, lr_chunk=89)


def test_tile_table_matches_target_profiles():
    """One row per CUDA target profile, with its SM count and shared memory (targets.py), tiles
    that fit one SM's shared memory, and a small-M tile that covers every small M in one block row."""
    rows = _C.gemm_tile_table()
    assert sorted(r["cc"] for r in rows) == sorted(10 * a + b for a, b in targets._BY_CAPABILITY)
    for r in rows:
        prof = targets.PROFILES[targets._BY_CAPABILITY[divmod(r["cc"], 10)]]
        assert (r["sms"], r["smem_per_sm_kb"]) == (prof.sms, prof.smem_per_sm_kb)
        for size in SIZES:
            t = r[size]
            assert t["smem"] <= (prof.smem_per_sm_kb - 1) * 1024, (r["cc"], size, t)
            assert r[f"{size}_blocks"] * (t["smem"] + 1024) <= prof.smem_per_sm_kb * 1024, (r["cc"], size)
            assert t["threads"] == 32 * t["wm"] * t["wn"] * t["wk"]
            assert t["swap"] == (size == "skinny")
        assert r["small"]["bm"] >= r["small_max_m"] and r["small"]["wm"] == 1
        assert r["skinny"]["bm"] >= r["skinny_max_m"] and r["skinny"]["bk"] % 128 == 0


# ---- the CUDA entry point without a GPU -----------------------------------------------------------

def _gemm_call(**over):
    args = dict(x_ptr=256, lda=32, out_ptr=256, qweight_ptr=256, scales_ptr=256, zeros_ptr=256,
                perm_ptr=0, res_index_ptr=0, res_plane_ptr=0, res_alpha_ptr=0, nr=0, t_ptr=0,
                lr_up_ptr=0, extra_ptr=0, bias_ptr=0, class_bits=[4], class_rows=[16], m=16, n=16,
                k=32, k_pad=32, group_size=32, r=0, dtype=1, stream=0)
    args.update(over)
    return args


def test_gemm_cuda_fails_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu(
        "_C.gemm_cuda(256, 32, 256, 256, 256, 256, 0, 0, 0, 0, 0, 0, 0, 0, 0, [4], [16], 16, 16, "
        "32, 32, 32, 0, 1, 0)", "tests/test_gpu.py covers gemm_cuda")


def test_gemm_cuda_plan_fails_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu("_C.gemm_cuda_plan(16, [4], [16], 16, 32, 32, 32)",
                                     "tests/test_gpu.py covers gemm_cuda_plan")


def test_gemm_cuda_validates_arguments():
    if not _C.cuda_built():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.gemm_cuda(**_gemm_call())
        return
    for over, msg in [(dict(m=0), "m must be"), (dict(dtype=0), "dtype"),
                      (dict(class_bits=[5]), "2, 3 or 4 bits"), (dict(class_rows=[15]), "sum to"),
                      (dict(lda=31), "lda"), (dict(lda=36), "lda"), (dict(x_ptr=264), "x_ptr"),
                      (dict(scales_ptr=258), "scales_ptr"), (dict(res_index_ptr=256), "res_plane_ptr"),
                      (dict(res_index_ptr=256, res_plane_ptr=256, res_alpha_ptr=256), "nr"),
                      (dict(t_ptr=256), "lr_up_ptr"), (dict(t_ptr=256, lr_up_ptr=256), "r >= 1"),
                      (dict(extra_ptr=258), "aligned"), (dict(k_pad=64), "k_pad"),
                      (dict(workspace_ptr=264), "workspace_ptr"), (dict(counters_ptr=258), "counters_ptr"),
                      (dict(workspace_bytes=-1), ">= 0"), (dict(split=-1), "split")]:
        with pytest.raises(ValueError, match=msg):
            _C.gemm_cuda(**_gemm_call(**over))
