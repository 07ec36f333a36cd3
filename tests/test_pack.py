"""Layer 1: the bit layouts of docs/FORMAT.md, checked bit by bit and by round trips."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitfuse import pack


def _word_bits(w: int) -> int:
    return w & 0xFFFFFFFF


@st.composite
def codes(draw, bits=None):
    b = draw(st.sampled_from([2, 3, 4])) if bits is None else bits
    rows = draw(st.integers(1, 7))
    k_pad = 32 * draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return b, torch.randint(0, 1 << b, (rows, k_pad), generator=g, dtype=torch.uint8)


@given(codes())
def test_codes_round_trip(case):
    b, q = case
    w = pack.pack_codes(q, b)
    assert w.dtype == torch.int32 and w.shape == (q.shape[0], pack.words_per_row(b, q.shape[1]))
    assert torch.equal(pack.unpack_codes(w, b, q.shape[1]), q)


@given(st.integers(1, 9), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_sign_plane_round_trip(rows, words, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, 32 * words, generator=g) > 0.5
    w = pack.pack_signs(s)
    assert w.shape == (rows, words)
    assert torch.equal(pack.unpack_signs(w, 32 * words), s)


def test_run_slot_table():
    # FORMAT.md §3.1 written out: slot j of a run holds column run_column(j); lane t of an mma quad
    # owns slots 8t..8t+7 = columns {2t, 2t+8, 2t+16, 2t+24, 2t+1, 2t+9, 2t+17, 2t+25}.
    for t in range(4):
        cols = [pack.run_column(8 * t + i) for i in range(8)]
        assert cols == [2 * t + d for d in (0, 8, 16, 24, 1, 9, 17, 25)]
    assert sorted(pack.run_slot(c) for c in range(32)) == list(range(32))
    assert all(pack.run_column(pack.run_slot(c)) == c for c in range(32))
    with pytest.raises(pack.PackError, match="run column"):
        pack.run_slot(32)


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_layout_bit_positions(bits):
    # FORMAT.md §3: the code of column k sits in slot j = 32·(k // 32) + run_slot(k % 32), which
    # is in word j / (32/b) at bits [b*(j % (32/b)), ...).
    per = 32 // bits
    for k in (per + 3, 32 + 13, 63):
        q = torch.zeros(1, 64, dtype=torch.uint8)
        v = (1 << bits) - 1  # all ones
        q[0, k] = v
        w = pack.pack_codes(q, bits)
        j = 32 * (k // 32) + pack.run_slot(k % 32)
        expect = torch.zeros(1, 64 * bits // 32, dtype=torch.int64)
        expect[0, j // per] = v << (bits * (j % per))
        assert [_word_bits(int(x)) for x in w[0]] == [int(x) for x in expect[0]]


def test_three_bit_plane_layout():
    # FORMAT.md §3: slots 0..15 low bits in word 0, 16..31 in word 1, bit 2 of all in word 2.
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 8] = 0b101   # column 8 -> slot 1: lo=01 at word0 bits 2..3, hi at word2 bit 1
    q[0, 6] = 0b110   # column 6 -> slot 24: lo=10 at word1 bits 16..17, hi at word2 bit 24
    q[0, 32 + 31] = 0b111  # second run, column 31 -> slot 31: lo=11 at word4 bits 30..31, word5 bit 31
    w = [_word_bits(int(x)) for x in pack.pack_codes(q, 3)[0]]
    assert w == [0b01 << 2, 0b10 << 16, (1 << 1) | (1 << 24), 0, 0b11 << 30, 1 << 31]


def test_all_ones_words_survive_int32_sign():
    q = torch.full((2, 32), 15, dtype=torch.uint8)
    w = pack.pack_codes(q, 4)
    assert int(w[0, 0]) == -1  # 0xFFFFFFFF stored as int32
    assert torch.equal(pack.unpack_codes(w, 4, 32), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_out_of_range_codes_are_rejected(bits):
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 3] = 1 << bits
    with pytest.raises(pack.PackError, match=f"{bits}-bit codes must lie in"):
        pack.pack_codes(q, bits)
    with pytest.raises(pack.PackError, match="2, 3 or 4"):
        pack.pack_codes(q, 5)
    with pytest.raises(pack.PackError, match="multiple of 32"):
        pack.pack_codes(torch.zeros(1, 33, dtype=torch.int64), bits)


@given(st.lists(st.tuples(st.sampled_from([2, 3, 4]), st.integers(0, 5)), min_size=1, max_size=3),
       st.integers(1, 4), st.integers(0, 1000))
def test_class_buffer_round_trip(classes, groups, seed):
    k_pad = 32 * groups
    g = torch.Generator().manual_seed(seed)
    bits = [b for b, _ in classes]
    rows = [r for _, r in classes]
    qs = [torch.randint(0, 1 << b, (r, k_pad), generator=g, dtype=torch.uint8) for b, r in classes]
    flat = pack.pack_classes(qs, bits)
    offs = pack.class_word_offsets(bits, rows, k_pad)
    assert flat.numel() == offs[-1] == sum(r * k_pad * b // 32 for b, r in classes)
    for q, back in zip(qs, pack.unpack_classes(flat, bits, rows, k_pad)):
        assert torch.equal(q, back)


def test_padded_k():
    assert pack.padded_k(200, 64) == 256 and pack.padded_k(256, 64) == 256 and pack.padded_k(1, 32) == 32
    with pytest.raises(pack.PackError):
        pack.padded_k(0, 32)


@given(k=st.integers(1, 5000), g=st.sampled_from([32, 64, 128]), bits=st.sampled_from([2, 3, 4]),
       widths=st.sampled_from([(), (2, 3), (2, 3, 4), (3, 4)]))
def test_fitted_group_size_stores_fewest_bits(k, g, bits, widths):
    def stored(gg):  # code bits over k_pad + one fp16 scale and one fp16 offset per group
        kp = pack.padded_k(k, gg)
        return kp * bits + 32 * (kp // gg)

    def rows_of_16_bytes(gg):  # every width's rows a multiple of 4 words: 128-bit loads
        return [pack.padded_k(k, gg) * b // 32 % 4 == 0 for b in sorted({bits, *widths})]

    def allowed(gg):
        keeps = all(a or not b for a, b in zip(rows_of_16_bytes(gg), rows_of_16_bytes(g)))
        return keeps or stored(gg) <= 0.75 * stored(g)

    f = pack.fitted_group_size(k, g, bits, widths)
    options = [gg for gg in (32, 64, 128) if gg <= g and allowed(gg)]
    assert f in options and g in options
    assert stored(f) == min(stored(gg) for gg in options) <= stored(g)
    if k % g == 0:
        assert f == g  # no padding to save: a smaller group only adds scale pairs


def test_fitted_group_size_examples():
    # SD1.5's 320-channel layers pad to 384 at g128; g64 fits exactly and stores fewer bits.
    assert pack.fitted_group_size(320, 128, 4) == 64
    # ... but at 3-bit g64 rows are 30 words, not 16-byte multiples, for a 10% saving: g128 stays,
    # also for a mixed layer with a 3-bit class.
    assert pack.fitted_group_size(320, 128, 3) == 128 and pack.fitted_group_size(320, 128, 4, (3, 4)) == 128
    # K = 64 at 3-bit: g64 stores 46% fewer bits, worth 32-bit loads.
    assert pack.fitted_group_size(64, 128, 3) == 64
    assert pack.fitted_group_size(1152, 128, 4) == 128
    # K = 960 at 2-bit: 1024 codes + 8 pairs (2304 bits) beat 960 codes + 15 pairs (2400 bits).
    assert pack.fitted_group_size(960, 128, 2) == 128 and pack.fitted_group_size(960, 128, 4) == 64
    with pytest.raises(pack.PackError, match="group size must be one of"):
        pack.fitted_group_size(64, 48, 4)
