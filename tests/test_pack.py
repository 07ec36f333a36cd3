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


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_layout_bit_positions(bits):
    # FORMAT.md §3: code k sits in word k / (32/b) at bits [b*(k % (32/b)), ...).
    per = 32 // bits
    q = torch.zeros(1, 64, dtype=torch.uint8)
    k, v = per + 3, (1 << bits) - 1  # second word, fourth slot, all ones
    q[0, k] = v
    w = pack.pack_codes(q, bits)
    expect = torch.zeros(1, 64 * bits // 32, dtype=torch.int64)
    expect[0, k // per] = v << (bits * (k % per))
    assert [_word_bits(int(x)) for x in w[0]] == [int(x) for x in expect[0]]


def test_three_bit_plane_layout():
    # FORMAT.md §3: codes 0..15 low bits in word 0, 16..31 in word 1, bit 2 of all in word 2.
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 1] = 0b101   # lo=01 at word0 bits 2..3, hi at word2 bit 1
    q[0, 17] = 0b110  # lo=10 at word1 bits 2..3, hi at word2 bit 17
    q[0, 32 + 31] = 0b111  # second run: lo=11 at word4 bits 30..31, hi at word5 bit 31
    w = [_word_bits(int(x)) for x in pack.pack_codes(q, 3)[0]]
    assert w == [0b01 << 2, 0b10 << 2, (1 << 1) | (1 << 17), 0, 0b11 << 30, 1 << 31]


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
