"""The CUDA GEMV's bit math on the CPU (layer 3): csrc/include/bitfuse/dequant_tricks.h and
gemv.h, run through bitfuse._C host hooks, against bitfuse.pack and the torch reference.

The kernel (csrc/cuda/gemv.cu) calls exactly these __host__ __device__ functions; what only a GPU
can check (thread mapping, shared-memory swizzle, split-K reduction) is in tests/test_gpu.py.
"""

from __future__ import annotations


import numpy as np
import pytest
from _cuda_probe import assert_fails_cleanly_without_gpu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfuse import _C, pack, reference
from bitfuse.format import PackedWeight

BITS = (2, 3, 4)
words32 = st.integers(0, 2**32 - 1)


def _decode_pairs(pairs: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(runs, 16) half2 patterns + (16, 2) columns -> (runs, 32) codes, checking the magic."""
    halves = np.stack([pairs & 0xFFFF, pairs >> 16], axis=-1).astype(np.int64)  # (runs, 16, 2)
    # Every half is fp16 1024 + q: exponent bits 0x6400 and the code in the low mantissa bits.
    assert ((halves & ~np.int64(0xF)) == 0x6400).all()
    codes = np.full((pairs.shape[0], 32), -1, dtype=np.int64)
    codes[:, cols.reshape(-1)] = (halves - 0x6400).reshape(pairs.shape[0], 32)
    return codes


@pytest.mark.parametrize("bits", BITS)
def test_pair_columns_are_a_permutation(bits):
    _, cols = _C.magic_unpack_test(np.zeros(bits, dtype=np.int32), bits)
    assert sorted(cols.reshape(-1).tolist()) == list(range(32))
    # The documented order: 4-bit pair p=4i+j -> slots (8i+j, 8i+j+4); 2/3-bit p=8i+j -> slots
    # (16i+j, +8); a slot's column is pack.run_column (FORMAT.md §3.1).
    for p in range(16):
        if bits == 4:
            i, j = divmod(p, 4)
            slots = (8 * i + j, 8 * i + j + 4)
        else:
            i, j = divmod(p, 8)
            slots = (16 * i + j, 16 * i + j + 8)
        assert tuple(cols[p]) == tuple(pack.run_column(s) for s in slots)
    if bits == 4:
        # The point of the slot order: 4-bit pairs are the mma B-fragment register pairs of lane
        # t = i, i.e. columns (2t, 2t+1), (2t+8, 2t+9), (2t+16, 2t+17), (2t+24, 2t+25).
        for p in range(16):
            t, j = divmod(p, 4)
            assert tuple(cols[p]) == (2 * t + 8 * j, 2 * t + 8 * j + 1)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), data=st.data())
def test_magic_unpack_matches_pack_on_random_words(bits, data):
    runs = data.draw(st.integers(1, 6))
    words = np.array(data.draw(st.lists(words32, min_size=bits * runs, max_size=bits * runs)),
                     dtype=np.uint32)
    pairs, cols = _C.magic_unpack_test(words.view(np.int32), bits)
    got = _decode_pairs(pairs.astype(np.int64), cols)
    # pack.unpack_codes reads the same words as one row of k_pad = 32·runs codes.
    ref = pack.unpack_codes(torch.from_numpy(words.view(np.int32)).reshape(1, -1), bits, 32 * runs)
    np.testing.assert_array_equal(got.reshape(1, -1), ref.numpy().astype(np.int64))


@pytest.mark.parametrize("bits", BITS)
def test_magic_unpack_extremes(bits):
    for fill in (0, -1, 0x55555555, -0x55555556):  # all zeros, all ones, alternating patterns
        words = np.full(bits * 2, fill, dtype=np.int64).astype(np.uint32).view(np.int32)
        pairs, cols = _C.magic_unpack_test(words, bits)
        ref = pack.unpack_codes(torch.from_numpy(words).reshape(1, -1), bits, 64)
        np.testing.assert_array_equal(_decode_pairs(pairs.astype(np.int64), cols).reshape(1, -1),
                                      ref.numpy().astype(np.int64))


def _f16_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float16).view(np.uint16))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), data=st.data(), has_res=st.booleans(), plane=words32,
       scale=st.floats(0, 2.0, width=16), zero=st.floats(-2.0, 2.0, width=16),
       alpha=st.floats(0, 0.5, width=16))
def test_run_dequant_matches_reference(bits, data, has_res, plane, scale, zero, alpha):
    """One run through run_dequant (magic unpack + fma + residual) vs the reference's fp32 math."""
    words = np.array(data.draw(st.lists(words32, min_size=bits, max_size=bits)),
                     dtype=np.uint32).view(np.int32)
    got = _C.run_dequant_test(words, bits, _f16_bits(scale), _f16_bits(zero), has_res, plane,
                              _f16_bits(alpha))
    q = pack.unpack_codes(torch.from_numpy(words).reshape(1, -1), bits, 32).float()
    s16 = torch.tensor(scale, dtype=torch.float16).float()
    z16 = torch.tensor(zero, dtype=torch.float16).float()
    w = q * s16 + z16  # the reference: exact product, one rounding
    if has_res:
        signs = pack.unpack_signs(torch.tensor([[np.uint32(plane).view(np.int32)]]), 32).float()
        w = w + torch.tensor(alpha, dtype=torch.float16).float() * (signs * 2 - 1)
    np.testing.assert_array_equal(got, w.reshape(-1).numpy())  # bit-identical


# ---- the whole GEMV's CPU twin vs the torch reference --------------------------------------------

def _layer(class_bits, class_rows, k, g, residual, rank, sparse, bias, seed, compact=False):
    gen = torch.Generator().manual_seed(seed)
    n = sum(class_rows)
    k_pad = pack.padded_k(k, g)
    G = k_pad // g
    codes = []
    for b, r in zip(class_bits, class_rows):
        q = torch.randint(0, 1 << b, (r, k_pad), generator=gen, dtype=torch.int32)
        q[:, k:] = 0
        codes.append(q)
    t = dict(qweight=pack.pack_classes(codes, class_bits),
             scales=(torch.rand(n, G, generator=gen) * 0.1 + 1e-3).half(),
             zeros=(torch.rand(n, G, generator=gen) - 0.5).half(),
             perm=torch.randperm(n, generator=gen).to(torch.int32))
    if residual:
        has = torch.rand(n, generator=gen) < 0.6
        has[0] = True
        nr = int(has.sum())
        ri = torch.full((n,), -1, dtype=torch.int32)
        ri[has] = torch.randperm(nr, generator=gen).to(torch.int32)
        t.update(res_index=ri, res_plane=pack.pack_signs(torch.rand(nr, k_pad, generator=gen) < 0.5),
                 res_alpha=(torch.rand(nr, G, generator=gen) * 0.05).half())
    if rank:
        t.update(lr_down=(torch.randn(rank, k, generator=gen) * 0.1).half(),
                 lr_up=(torch.randn(n, rank, generator=gen) * 0.1).half(),
                 lr_scale=torch.rand(rank, generator=gen) + 0.5)
    if sparse:
        nnz_rows = torch.randint(0, 3, (n,), generator=gen)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), nnz_rows.cumsum(0)]).to(torch.int32)
        idx = torch.cat([torch.randperm(k, generator=gen)[: int(c)].sort().values for c in nnz_rows])
        t.update(sp_indptr=indptr, sp_indices=idx.to(torch.int32),
                 sp_values=(torch.randn(idx.numel(), generator=gen) * 0.2).half())
    if bias:
        t["bias"] = torch.randn(n, generator=gen)
    if compact:  # the same scales and offsets as compact codes (FORMAT.md §5.1)
        sc, zc, rf = pack.compact_scales(t.pop("scales"), t.pop("zeros"))
        t.update(scale_codes=sc, zero_codes=zc, scale_rows=rf)
    return PackedWeight(out_features=n, in_features=k, group_size=g, class_bits=list(class_bits),
                        class_rows=list(class_rows), row_align=16, config={}, target="",
                        tensors=t)


def _scale_arrays(pw: PackedWeight):
    """(scales, zeros, {scale_rows: …}) as the host twins take them: fp16 pairs, or the uint8
    compact codes with their row factors."""
    if pw.compact_scales:
        return _np(pw.scale_codes), _np(pw.zero_codes), {"scale_rows": _np(pw.scale_rows)}
    return _np(pw.scales), _np(pw.zeros), {}


def _np(t):
    return None if t is None else t.numpy()


def _gemv_host(x: torch.Tensor, pw: PackedWeight, tensor_cores: bool = False) -> torch.Tensor:
    """What backend_cuda.gemv hands the kernel, run through the CPU twin (of gemv_tc.cu with
    tensor_cores, x's dtype fp16 or bf16)."""
    x32 = x.float()
    t = lr_up = extra = None
    if pw.lr_down is not None:
        t = (x32 @ pw.lr_down.float().t()) * pw.lr_scale.float()
        lr_up = pw.lr_up.half()
    if pw.sp_values is not None:
        extra = reference.sparse_apply(x32, pw)
    scales, zeros, rows = _scale_arrays(pw)
    return torch.from_numpy(_C.gemv_host(
        x32.numpy(), _np(pw.qweight), scales, zeros, _np(pw.perm),
        _np(pw.res_index), _np(pw.res_plane), _np(pw.res_alpha), _np(t), _np(lr_up), _np(extra),
        _np(pw.bias), pw.class_bits, pw.class_rows, pw.out_features, pw.in_features, pw.k_pad,
        pw.group_size, **rows, tensor_cores=tensor_cores,
        dtype=2 if x.dtype == torch.bfloat16 else 1))


@pytest.mark.parametrize("class_bits,class_rows", [([4], [7]), ([3], [33]), ([2], [16]),
                                                   ([2, 3, 4], [16, 32, 5]), ([4, 2], [16, 9])])
@pytest.mark.parametrize("k,g", [(100, 32), (200, 64), (257, 128), (33, 32)])
@pytest.mark.parametrize("branches", ["plain", "residual", "all", "all+compact"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_host_matches_reference(class_bits, class_rows, k, g, branches, m):
    from _tolerance import assert_within, branch_magnitudes, matmul_bound

    full = branches.startswith("all")
    pw = _layer(class_bits, class_rows, k, g, residual=branches != "plain", rank=4 if full else 0,
                sparse=full, bias=full, seed=k + m + len(class_bits), compact=branches == "all+compact")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    y = _gemv_host(x, pw)
    xf = x.float()
    y_ref = reference.linear(xf, pw)  # fp32 reference, before any cast

    class _Q:  # branch_magnitudes wants an object with .packed
        packed = pw

    bound = matmul_bound(xf, branch_magnitudes(_Q), torch.float32, bias=pw.bias)
    assert_within(y, y_ref, bound, f"gemv_host {class_bits} {k=} {g=} {branches} {m=}")


@pytest.mark.parametrize("class_bits,class_rows", [([4], [7]), ([3], [33]), ([2], [16]),
                                                   ([2, 3, 4], [16, 32, 5])])
@pytest.mark.parametrize("k,g", [(100, 32), (200, 64), (257, 128)])
@pytest.mark.parametrize("branches", ["plain", "residual", "all+compact"])
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (3, torch.bfloat16), (8, torch.float16)])
def test_gemv_tc_host_matches_reference(class_bits, class_rows, k, g, branches, m, dtype):
    """The tensor-core GEMV's twin (gemv_tc.h: codes exact in A, x in B, scales per group in fp32)
    against the fp32 reference, within the bound of the factored sums."""
    from _tolerance import assert_within, factored_branch_magnitudes, matmul_bound

    full = branches.startswith("all")
    pw = _layer(class_bits, class_rows, k, g, residual=branches != "plain", rank=4 if full else 0,
                sparse=full, bias=full, seed=k + m + len(class_bits), compact=branches == "all+compact")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = _gemv_host(x, pw, tensor_cores=True)
    xf = x.float()
    y_ref = reference.linear(xf, pw)

    class _Q:
        packed = pw

    bound = matmul_bound(xf, factored_branch_magnitudes(_Q), torch.float32, bias=pw.bias)
    assert_within(y, y_ref, bound, f"gemv_tc_host {class_bits} {k=} {g=} {branches} {m=} {dtype}")


@pytest.mark.parametrize("m,k", [(8, 2300), (5, 4200), (1, 16500)])
def test_gemv_tc_host_chunks_and_warps(m, k):
    """K past one staged x chunk (16384 / m_stage columns) and past the warps' first blocks: every
    run is summed once, whichever warp and chunk takes it; the residual's last group is partial."""
    from _tolerance import assert_within, factored_branch_magnitudes, matmul_bound

    pw = _layer([4, 3], [16, 16], k, 64, residual=True, rank=0, sparse=False, bias=True, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).half()
    y = _gemv_host(x, pw, tensor_cores=True)

    class _Q:
        packed = pw

    y_ref = reference.linear(x.float(), pw)
    bound = matmul_bound(x.float(), factored_branch_magnitudes(_Q), torch.float32, bias=pw.bias)
    assert_within(y, y_ref, bound, f"gemv_tc_host chunks {m=} {k=}")


def test_gemv_tc_lane_fragments_are_the_columns_of_the_run():
    """Lane t's A registers (gemv_tc.h lane_codes, via mma_tile.h lane_magic) hold, for k16 step s,
    the codes of columns 16s + 2t + {0, 1} (a0) and 16s + 2t + {8, 9} (a2): the mma's own layout
    (a_col), so A·B pairs each code with its column of x. Checked for every width against pack.py
    through the twin: a layer whose row holds one nonzero code per column position."""
    for bits in (2, 3, 4):
        k = 32
        for col in range(32):
            codes = torch.zeros(16, k, dtype=torch.int32)
            codes[:, col] = (1 << bits) - 1
            pw = _layer([bits], [16], k, 32, False, 0, False, False, seed=col)
            pw.tensors["qweight"] = pack.pack_classes([codes], [bits])
            pw.tensors["scales"] = torch.ones(16, 1).half()
            pw.tensors["zeros"] = torch.zeros(16, 1).half()
            x = torch.zeros(1, k).half()
            x[0, col] = 1.0
            y = _gemv_host(x, pw, tensor_cores=True)
            assert torch.equal(y, torch.full((1, 16), float((1 << bits) - 1))), (bits, col, y)
            x[0, col] = 0.0
            x[0, (col + 1) % 32] = 1.0
            assert torch.equal(_gemv_host(x, pw, tensor_cores=True), torch.zeros(1, 16)), (bits, col)


def test_gemv_host_rejects_unaligned_classes():
    pw = _layer([4, 2], [8, 8], 64, 32, False, 0, False, False, seed=0)
    x = torch.randn(1, 64).half()
    with pytest.raises(ValueError, match="multiples of 16"):
        _gemv_host(x, pw)
    with pytest.raises(ValueError, match="m must be"):
        _gemv_host(torch.randn(9, 64).half(), _layer([4], [16], 64, 32, False, 0, False, False, 0))


# ---- the CUDA entry point without a GPU -----------------------------------------------------------

def _gemv_call(**over):
    args = dict(x_ptr=256, out_ptr=256, qweight_ptr=256, scales_ptr=256, zeros_ptr=256, perm_ptr=0,
                res_index_ptr=0, res_plane_ptr=0, res_alpha_ptr=0, t_ptr=0, lr_up_ptr=0,
                extra_ptr=0, bias_ptr=0, class_bits=[4], class_rows=[16], m=1, n=16, k=32,
                k_pad=32, group_size=32, r=0, dtype=1, stream=0)
    args.update(over)
    return args


def test_gemv_cuda_fails_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu(
        "_C.gemv_cuda(256, 256, 256, 256, 256, 0, 0, 0, 0, 0, 0, 0, 0, [4], [16], 1, 16, 32, 32, 32, 0, 1, 0)",
        "tests/test_gpu.py covers gemv_cuda")


def test_gemv_tc_cuda_fails_cleanly_without_gpu():
    assert_fails_cleanly_without_gpu(
        "_C.gemv_cuda(256, 256, 256, 256, 256, 0, 0, 0, 0, 0, 0, 0, 0, [4], [16], 1, 16, 32, 32, 32, "
        "0, 1, 0, tensor_cores=True)", "tests/test_gpu.py covers gemv_cuda(tensor_cores=True)")


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_gemv_cuda_validates_arguments(tensor_cores):
    if not _C.cuda_built():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.gemv_cuda(**_gemv_call(tensor_cores=tensor_cores))
        return
    for over, msg in [(dict(m=9), "m must be"), (dict(m=0), "m must be"),
                      (dict(dtype=0), "dtype"), (dict(class_bits=[5]), "2, 3 or 4 bits"),
                      (dict(class_rows=[15]), "sum to"), (dict(x_ptr=0), "x_ptr"),
                      (dict(res_index_ptr=256), "res_plane_ptr"), (dict(t_ptr=256), "lr_up_ptr"),
                      (dict(t_ptr=256, lr_up_ptr=256), "r >= 1"), (dict(extra_ptr=258), "aligned"),
                      (dict(class_bits=[4, 2], class_rows=[8, 8]), "multiples of 16")]:
        with pytest.raises(ValueError, match=msg):
            _C.gemv_cuda(**_gemv_call(tensor_cores=tensor_cores, **over))


def test_gemv_kernel_choice(monkeypatch):
    """BITFUSE_CUDA_GEMV / kernel= pick the CUDA GEMV; the tensor-core one is the default, and a
    layer whose group size it does not take falls back to SIMT unless tc was asked for by name."""
    from bitfuse import backend_cuda as bc

    monkeypatch.delenv("BITFUSE_CUDA_GEMV", raising=False)
    assert bc.gemv_kernel() == "tc" and bc.gemv_kernel("SIMT") == "simt"
    monkeypatch.setenv("BITFUSE_CUDA_GEMV", "simt")
    assert bc.gemv_kernel() == "simt" and bc.gemv_kernel("tc") == "tc"
    monkeypatch.setenv("BITFUSE_CUDA_GEMV", "wmma")
    with pytest.raises(ValueError, match="BITFUSE_CUDA_GEMV"):
        bc.gemv_kernel()
    monkeypatch.delenv("BITFUSE_CUDA_GEMV")
    pw64 = _layer([4], [16], 100, 64, False, 0, False, False, seed=0)
    pw256 = _layer([4], [16], 300, 256, False, 0, False, False, seed=0)
    assert bc._gemv_tensor_cores(pw64, None) and not bc._gemv_tensor_cores(pw64, "simt")
    assert not bc._gemv_tensor_cores(pw256, None)  # group 256: the SIMT GEMV
    with pytest.raises(ValueError, match="group sizes"):
        bc._gemv_tensor_cores(pw256, "tc")
    x = torch.randn(1, 300).half()
    with pytest.raises(ValueError, match="group sizes"):
        _gemv_host(x, pw256, tensor_cores=True)


def test_gemm_kernel_choice(monkeypatch):
    """BITFUSE_CUDA_GEMM / kernel= pick the GEMM tile for M <= 16: the skinny one by default;
    a bad name is an error that names the variable; the constant matches the extension's table."""
    from bitfuse import _C
    from bitfuse import backend_cuda as bc

    monkeypatch.delenv("BITFUSE_CUDA_GEMM", raising=False)
    assert bc.gemm_kernel() == "skinny" and bc.gemm_kernel("Small") == "small"
    monkeypatch.setenv("BITFUSE_CUDA_GEMM", "small")
    assert bc.gemm_kernel() == "small" and bc.gemm_kernel("skinny") == "skinny"
    monkeypatch.setenv("BITFUSE_CUDA_GEMM", "wide")
    with pytest.raises(ValueError, match="BITFUSE_CUDA_GEMM"):
        bc.gemm_kernel()
    assert {r["skinny_max_m"] for r in _C.gemm_tile_table()} == {bc.SKINNY_MAX_M}
