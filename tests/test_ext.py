"""bitfuse._C: the C++/CUDA index math (csrc/include/bitfuse/format.h) against bitfuse.pack.

The extension is part of the install, so a failed import is a test failure, not a skip. Nothing
here needs a GPU: dequantize_host is the CPU twin of the CUDA kernel (same header code), and the
CUDA entry point is only checked to fail cleanly where no GPU is usable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _cuda_probe import assert_fails_cleanly_without_gpu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfuse import _C, pack, reference
from bitfuse.version import __version__

BITS = (2, 3, 4)


def _codes(rows: int, k_pad: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, k_pad), generator=g, dtype=torch.int32)


# ---- index math --------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 9), k_words=st.integers(1, 16),
       seed=st.integers(0, 2**31 - 1))
def test_unpack_codes_matches_pack(bits, rows, k_words, seed):
    k_pad = 32 * k_words
    q = _codes(rows, k_pad, bits, seed)
    words = pack.pack_codes(q, bits)
    got = _C.unpack_codes(words.numpy(), bits, k_pad)
    assert got.dtype == np.uint8 and got.shape == (rows, k_pad)
    np.testing.assert_array_equal(got, pack.unpack_codes(words, bits, k_pad).numpy())
    np.testing.assert_array_equal(got, q.numpy())


@pytest.mark.parametrize("bits", BITS)
def test_unpack_codes_all_ones(bits):
    # Every word is 0xFFFFFFFF (int32 -1): the top bits must not pick up sign extension.
    k_pad = 64
    words = torch.full((2, pack.words_per_row(bits, k_pad)), -1, dtype=torch.int32)
    got = _C.unpack_codes(words.numpy(), bits, k_pad)
    assert (got == (1 << bits) - 1).all()
    # uint32 words (same bits) are accepted too
    np.testing.assert_array_equal(_C.unpack_codes(words.numpy().view(np.uint32), bits, k_pad), got)


@pytest.mark.parametrize("bits,k,code,word,shift", [
    # FORMAT.md §3 spelled out for single codes, independent of pack.py. Column c of a run goes to
    # slot 8t + 4l + 2s + h where c = 16s + 8h + 2t + l (§3.1).
    (4, 13, 0b1011, 2, 20),           # c=13: s0 h1 t2 l1 -> slot 21: word 21/8 = 2, bits 4*(21%8) = 20
    (4, 0, 0b0111, 0, 0),             # c=0 -> slot 0
    (2, 37, 0b10, 3, 8),              # run 1, c=5: s0 h0 t2 l1 -> slot 20, position 52:
                                      # word 52/16 = 3, bits 2*(52%16) = 8
    (3, 49, 0b101, (3, 5), (12, 6)),  # run 1, c=17: s1 h0 t0 l1 -> slot 6: low bits in word
                                      # 3+6/16 = 3 at bit 2*6 = 12, bit 2 in word 3+2 = 5 at bit 6
])
def test_layout_positions(bits, k, code, word, shift):
    k_pad = 64
    words = np.zeros((1, pack.words_per_row(bits, k_pad)), dtype=np.uint32)
    if bits == 3:
        words[0, word[0]] |= np.uint32((code & 3) << shift[0])
        words[0, word[1]] |= np.uint32((code >> 2) << shift[1])
    else:
        words[0, word] |= np.uint32(code << shift)
    expect = np.zeros((1, k_pad), dtype=np.uint8)
    expect[0, k] = code
    np.testing.assert_array_equal(_C.unpack_codes(words.view(np.int32), bits, k_pad), expect)
    np.testing.assert_array_equal(
        pack.unpack_codes(torch.from_numpy(words.view(np.int32)), bits, k_pad).numpy(), expect)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), k_words=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_unpack_signs_matches_pack(rows, k_words, seed):
    k_pad = 32 * k_words
    g = torch.Generator().manual_seed(seed)
    signs = torch.rand(rows, k_pad, generator=g) < 0.5
    words = pack.pack_signs(signs)
    got = _C.unpack_signs(words.numpy(), k_pad)
    assert got.dtype == np.bool_ and got.shape == (rows, k_pad)
    np.testing.assert_array_equal(got, pack.unpack_signs(words, k_pad).numpy())
    np.testing.assert_array_equal(got, signs.numpy())


@settings(max_examples=40, deadline=None)
@given(classes=st.lists(st.tuples(st.sampled_from(BITS), st.integers(0, 200)), max_size=5),
       k_words=st.integers(1, 16))
def test_class_word_offsets_matches_pack(classes, k_words):
    k_pad = 32 * k_words
    bits = [b for b, _ in classes]
    rows = [r for _, r in classes]
    assert _C.class_word_offsets(bits, rows, k_pad) == pack.class_word_offsets(bits, rows, k_pad)


def test_index_math_rejects_bad_arguments():
    w = np.zeros((2, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        _C.unpack_codes(w, 5, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.unpack_codes(w, 4, 40)
    with pytest.raises(ValueError, match="shape"):
        _C.unpack_codes(w, 4, 64)  # 64 4-bit codes are 8 words, not 4
    with pytest.raises(ValueError, match="int32"):
        _C.unpack_codes(w.astype(np.int64), 4, 32)
    with pytest.raises(ValueError, match="int32"):
        _C.unpack_codes(w.astype(np.float32), 4, 32)
    with pytest.raises(ValueError, match="shape"):
        _C.unpack_signs(np.zeros((2, 3), dtype=np.int32), 64)
    with pytest.raises(ValueError, match="differ in length"):
        _C.class_word_offsets([4, 2], [16], 64)
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        _C.class_word_offsets([1], [16], 64)


# ---- dequantize_host vs a torch dequant built on pack.py ---------------------------------------

def _make_layer(class_bits, class_rows, k, group_size, residual, seed):
    """A random packed layer (numpy arrays, FORMAT.md layouts) with a non-identity perm."""
    g = torch.Generator().manual_seed(seed)
    n = sum(class_rows)
    k_pad = pack.padded_k(k, group_size)
    G = k_pad // group_size
    codes = []
    for b, r in zip(class_bits, class_rows):
        q = torch.randint(0, 1 << b, (r, k_pad), generator=g, dtype=torch.int32)
        q[:, k:] = 0  # padding codes are 0
        codes.append(q)
    qweight = pack.pack_classes(codes, class_bits)
    scales = (torch.rand(n, G, generator=g) * 0.1 + 0.001).half()
    zeros = (torch.rand(n, G, generator=g) - 1.0).half()
    scales[0, 0] = 0.0  # a constant group: scale 0, offset = the constant
    perm = torch.randperm(n, generator=g).to(torch.int32)
    layer = dict(qweight=qweight, scales=scales, zeros=zeros, perm=perm,
                 res_index=None, res_plane=None, res_alpha=None)
    if residual:
        has = torch.rand(n, generator=g) < 0.6
        has[0], has[-1] = True, False  # at least one row with and one without
        nr = int(has.sum())
        res_index = torch.full((n,), -1, dtype=torch.int32)
        res_index[has] = torch.randperm(nr, generator=g).to(torch.int32)
        layer.update(
            res_index=res_index,
            res_plane=pack.pack_signs(torch.rand(nr, k_pad, generator=g) < 0.5),
            res_alpha=(torch.rand(nr, G, generator=g) * 0.05).half(),
        )
    geom = dict(class_bits=list(class_bits), class_rows=list(class_rows), n=n, k=k, k_pad=k_pad,
                group_size=group_size)
    return layer, geom


def _torch_dequant(layer, geom):
    """Ŵ_b + R̂ (FORMAT.md §1) with torch ops on pack.unpack_*, in original row order, (n, k)."""
    g, kp, k = geom["group_size"], geom["k_pad"], geom["k"]
    q = torch.cat(pack.unpack_classes(layer["qweight"], geom["class_bits"], geom["class_rows"], kp))
    # float64 makes q*s + m exact, so rounding it once to fp32 is what the kernel's fma gives.
    w = (q.double() * layer["scales"].double().repeat_interleave(g, 1)
         + layer["zeros"].double().repeat_interleave(g, 1)).float()
    if layer["res_index"] is not None:
        ri = layer["res_index"].long()
        rows = torch.nonzero(ri >= 0).flatten()
        signs = pack.unpack_signs(layer["res_plane"], kp).float() * 2 - 1
        alpha = layer["res_alpha"].float().repeat_interleave(g, 1)
        w[rows] += (alpha * signs)[ri[rows]]
    out = torch.empty_like(w)
    out[layer["perm"].long()] = w
    return out[:, :k]


def _np(t):
    return None if t is None else t.numpy()


@pytest.mark.parametrize("class_bits,class_rows", [([4], [7]), ([3, 4], [16, 5]),
                                                   ([4, 2], [16, 9]), ([2, 3, 4], [16, 16, 3])])
@pytest.mark.parametrize("k,group_size", [(100, 32), (200, 64), (128, 128), (33, 32)])
@pytest.mark.parametrize("residual", [False, True])
def test_dequantize_host_matches_torch(class_bits, class_rows, k, group_size, residual):
    layer, geom = _make_layer(class_bits, class_rows, k, group_size, residual, seed=k + len(class_bits))
    got = _C.dequantize_host(**{name: _np(t) for name, t in layer.items()}, **geom)
    assert got.dtype == np.float32 and got.shape == (geom["n"], k)
    ref = _torch_dequant(layer, geom)
    if residual:  # the residual add may round once more on either side
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=2e-7, atol=1e-7)
    else:  # one fma against an exact product rounded once: bit-identical
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=0)


@pytest.mark.parametrize("class_bits,class_rows", [([4], [7]), ([2, 3, 4], [16, 16, 3])])
@pytest.mark.parametrize("residual", [False, True])
def test_dequantize_host_compact_scales_match_reference(class_bits, class_rows, residual):
    """Compact scales (FORMAT.md §5.1) through format.h's compact_params: the reference's weight
    bit for bit without a residual (exact products, one rounding of the offset and of the fma)."""
    from bitfuse.format import PackedWeight
    layer, geom = _make_layer(class_bits, class_rows, 300, 32, residual, seed=5)
    sc, zc, rf = pack.compact_scales(layer.pop("scales"), layer.pop("zeros"))
    got = _C.dequantize_host(**{name: _np(t) for name, t in layer.items()}, scales=sc.numpy(),
                             zeros=zc.numpy(), scale_rows=rf.numpy(), **geom)
    tensors = {n: t for n, t in layer.items() if t is not None}
    tensors.update(scale_codes=sc, zero_codes=zc, scale_rows=rf)
    pw = PackedWeight(out_features=geom["n"], in_features=geom["k"], group_size=32,
                      class_bits=class_bits, class_rows=class_rows, row_align=16, config={}, target="",
                      tensors=tensors).validate()
    ref = reference.dense_weight(pw)
    if residual:
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=2e-7, atol=1e-7)
    else:
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):  # fp16 scales with scale_rows: a clear error
        _C.dequantize_host(**{name: _np(t) for name, t in layer.items()},
                           scales=np.zeros(sc.shape, np.float16), zeros=zc.numpy(),
                           scale_rows=rf.numpy(), **geom)


def test_dequantize_host_identity_perm_is_none():
    layer, geom = _make_layer([4], [5], 64, 32, residual=False, seed=1)
    with_perm = _C.dequantize_host(**{name: _np(t) for name, t in layer.items()}, **geom)
    layer["perm"] = torch.arange(geom["n"], dtype=torch.int32)
    ident = _C.dequantize_host(**{name: _np(t) for name, t in layer.items()}, **geom)
    layer["perm"] = None
    np.testing.assert_array_equal(_C.dequantize_host(**{n: _np(t) for n, t in layer.items()}, **geom),
                                  ident)
    assert not np.array_equal(with_perm, ident)


def test_dequantize_host_rejects_bad_arguments():
    layer, geom = _make_layer([4, 2], [16, 4], 64, 32, residual=True, seed=2)
    args = {name: _np(t) for name, t in layer.items()}

    def call(**over):
        return _C.dequantize_host(**{**args, **geom, **over})

    call()
    with pytest.raises(ValueError, match="sum to"):
        call(class_rows=[16, 3])
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        call(class_bits=[4, 5])
    with pytest.raises(ValueError, match="k_pad"):
        call(k_pad=96)
    with pytest.raises(ValueError, match="qweight"):
        call(qweight=args["qweight"][:-1])
    with pytest.raises(ValueError, match="float16"):
        call(scales=args["scales"].astype(np.float32))
    with pytest.raises(ValueError, match="scales"):
        call(scales=args["scales"][:, :1])
    with pytest.raises(ValueError, match="permutation"):
        call(perm=np.zeros(geom["n"], dtype=np.int32))
    with pytest.raises(ValueError, match="together"):
        call(res_plane=None)
    bad = args["res_index"].copy()
    bad[0] = 99
    with pytest.raises(ValueError, match="res_index"):
        call(res_index=bad)


# ---- build facts and the CUDA entry point --------------------------------------------------------

def test_build_info():
    assert _C.version() == __version__
    archs = _C.cuda_archs()
    if _C.cuda_built():
        assert archs
    else:
        assert archs == ""
        assert _C.cuda_status() == "built without CUDA"
        assert _C.cuda_device_count() == 0
    if os.environ.get("BITFUSE_EXPECT_CUDA") == "1":
        assert _C.cuda_built(), "BITFUSE_EXPECT_CUDA=1 but bitfuse._C was built without CUDA"
        assert {"86", "87", "89", "90"} <= set(archs.split(";")), archs


def test_cuda_queries_and_dequantize_fail_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu(
        "_C.dequantize_cuda(256, 256, 256, 0, 0, 0, 0, 256, [4], [1], 1, 32, 32, 32, 0, 0)",
        "the GPU tests cover dequantize_cuda")


def test_dequantize_cuda_validates_arguments():
    if not _C.cuda_built():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.dequantize_cuda(256, 256, 256, 0, 0, 0, 0, 256, [4], [1], 1, 32, 32, 32, 0, 0)
        return
    # Bad arguments are rejected before CUDA is touched, with or without a GPU.
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        _C.dequantize_cuda(256, 256, 256, 0, 0, 0, 0, 256, [5], [1], 1, 32, 32, 32, 0, 0)
    with pytest.raises(ValueError, match="sum to"):
        _C.dequantize_cuda(256, 256, 256, 0, 0, 0, 0, 256, [4], [2], 1, 32, 32, 32, 0, 0)
    with pytest.raises(ValueError, match="out_dtype"):
        _C.dequantize_cuda(256, 256, 256, 0, 0, 0, 0, 256, [4], [1], 1, 32, 32, 32, 3, 0)
    with pytest.raises(ValueError, match="qweight_ptr"):
        _C.dequantize_cuda(0, 256, 256, 0, 0, 0, 0, 256, [4], [1], 1, 32, 32, 32, 0, 0)
    with pytest.raises(ValueError, match="res_plane_ptr"):
        _C.dequantize_cuda(256, 256, 256, 0, 256, 0, 256, 256, [4], [1], 1, 32, 32, 32, 0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None,
                    reason="needs ldd")
def test_no_torch_or_cudart_link():
    out = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True).stdout
    assert "torch" not in out and "libc10" not in out, out
    assert "libcudart" not in out, out  # the CUDA runtime is linked statically
