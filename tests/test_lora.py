"""LoRA adapters on quantized layers (QuantLinear.add_lora & co, bitfuse.lora; the diffusers parts are
in tests/test_lora_diffusers.py).

The oracle everywhere: the layer's dequantized weight taken BEFORE any adapter was added, plus
Σ scale·alpha/r · up @ down with the factors rounded to fp16 (how they are stored), applied as a
float64 F.linear / F.conv2d. The layer computes in fp32, so the tolerance is the fp32 accumulation
bound of tests/_tolerance.py over every summed branch (adapters included), not a loose atol.
"""

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

import bitfuse
from bitfuse import FormatError, PackedWeight, QuantConfig, QuantLinear, pack
from bitfuse.nn import QuantConv2d
from _tolerance import assert_within, branch_magnitudes, factored_branch_magnitudes, matmul_bound
from _checkpoint import edit_meta, header
from _spies import count_calls
from synthetic import heavy_tailed, linear_from

# ---- helpers --------------------------------------------------------------------------------


def factors(r, n, k, seed=0, mag=0.1):
    g = torch.Generator().manual_seed(seed)
    return mag * torch.randn(r, k, generator=g), mag * torch.randn(n, r, generator=g)


def delta(adapters, shape=None):
    """Σ scale·alpha/r · up16 @ down16 in float64; adapters: (down, up, alpha, scale)."""
    total = 0
    for down, up, alpha, scale in adapters:
        d, u = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        r = d.shape[0]
        a = r if alpha is None else alpha
        total = total + (scale * a / r) * (u.half().double() @ d.half().double())
    return total if shape is None else total.reshape(shape)


def oracle_linear(w0, bias, x, adapters):
    w = w0.double() + (delta(adapters) if adapters else 0)
    return F.linear(x.double(), w, None if bias is None else bias.double())


def check_linear(q, w0, x, adapters, what):
    y = q(x)
    y_ref = oracle_linear(w0, q.bias, x.reshape(-1, q.in_features), adapters)
    bound = matmul_bound(x.reshape(-1, q.in_features).float(), branch_magnitudes(q), x.dtype,
                         y_ref=y_ref.to(x.dtype), bias=q.bias)
    assert y.dtype == x.dtype
    assert_within(y.reshape(-1, q.out_features), y_ref, bound, what)
    return y


LAYERS = {
    # name: (out, in, config); "mixed" and "all" have several bit classes, so lr_up goes through perm.
    "plain": (48, 64, dict(bits=4, group_size=32)),
    "mixed": (256, 128, dict(bits=3, group_size=32, mixed_bits=(2, 3, 4))),
    "calibrated": (96, 80, dict(bits=3, group_size=32, rank=4)),
    "all": (256, 128, dict(bits=3, group_size=32, residual=0.5, mixed_bits=(3, 4), avg_bits=3.5, rank=3,
                            outliers=0.005)),
}
_CACHE = {}


def layer(kind):
    if kind not in _CACHE:
        n, k, cfg = LAYERS[kind]
        w = heavy_tailed(n, k, seed=len(kind), outlier_channels=20 if n >= 256 else 4)
        # round-to-nearest: the adapters do not care how the codes were chosen, and it is fast
        _CACHE[kind] = QuantLinear.from_linear(linear_from(w), QuantConfig(**cfg), method="rtn")
    q = copy.deepcopy(_CACHE[kind])
    if kind in ("mixed", "all"):
        assert q.perm is not None and not torch.equal(q.perm.long(), torch.arange(q.out_features))
    return q


@pytest.fixture(params=[True, False], ids=["cached", "op"])
def ref_cache(request):
    # cached: the torch reference's dense-weight cache (must notice every adapter change);
    # op: the factored low-rank product of reference.linear.
    bitfuse.set_reference_cache(request.param)
    yield request.param
    bitfuse.set_reference_cache(True)


# ---- one layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_add_matches_oracle(kind, dtype, ref_cache):
    q = layer(kind)
    w0, r0 = q.dequantize(), q._lr_rank()
    down, up = factors(5, q.out_features, q.in_features, seed=1)
    info = q.add_lora("a", down, up, alpha=2.0, scale=0.75)
    assert (info.offset, info.rank, info.alpha, info.scale) == (r0, 5, 2.0, 0.75)
    assert q.lr_down.dtype == torch.float16 and q.lr_scale.dtype == torch.float32
    assert q.lr_down.shape == (r0 + 5, q.in_features) and q.lr_up.shape == (q.out_features, r0 + 5)
    # lr_up is indexed by packed row: row i holds original output channel perm[i]
    perm = q.perm.long() if q.perm is not None else torch.arange(q.out_features)
    assert torch.equal(q.lr_up[:, r0:], up.half()[perm])
    assert torch.equal(q.lr_down[r0:], down.half())
    assert torch.equal(q.lr_scale[r0:], torch.full((5,), 0.75 * 2.0 / 5))
    q.packed.validate()
    x = torch.randn(2, 3, q.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    check_linear(q, w0, x, [(down, up, 2.0, 0.75)], f"{kind} {dtype}")


def test_two_adapters_set_scale_in_place_and_remove(ref_cache):
    q = layer("all")
    x = torch.randn(4, q.in_features, generator=torch.Generator().manual_seed(3))
    y0, w0, r0 = q(x), q.dequantize(), q._lr_rank()
    saved = {n: (None if getattr(q, n) is None else getattr(q, n).clone()) for n in ("lr_down", "lr_up", "lr_scale")}
    a = factors(4, q.out_features, q.in_features, seed=4)
    b = factors(7, q.out_features, q.in_features, seed=5, mag=0.05)
    q.add_lora("a", *a)                          # alpha None: factor 1
    q.add_lora("b", *b, alpha=14.0, scale=0.5)   # alpha/r = 2
    assert [(i.name, i.offset, i.rank) for i in q.loras.values()] == [("a", r0, 4), ("b", r0 + 4, 7)]
    check_linear(q, w0, x, [(*a, None, 1.0), (*b, 14.0, 0.5)], "two adapters")

    # set_lora_scale writes the adapter's lr_scale entries in place: same tensors, same shapes
    ptrs = {n: (getattr(q, n).data_ptr(), tuple(getattr(q, n).shape)) for n in ("lr_down", "lr_up", "lr_scale")}
    q.set_lora_scale("b", -1.5)
    assert {n: (getattr(q, n).data_ptr(), tuple(getattr(q, n).shape)) for n in ptrs} == ptrs
    assert q.loras["b"].scale == -1.5 and q.loras["a"].scale == 1.0
    check_linear(q, w0, x, [(*a, None, 1.0), (*b, 14.0, -1.5)], "b rescaled")
    q.set_lora_scale("a", 0.0)
    q.set_lora_scale("b", 0.0)
    # scale 0: no adapter, up to fp rounding (the branch's sums still run over the zeroed terms)
    check_linear(q, w0, x, [], "both at scale 0")

    # removing "a" moves "b" down; the rest still matches
    q.set_lora_scale("b", 0.5)
    q.remove_lora("a")
    assert [(i.name, i.offset, i.rank) for i in q.loras.values()] == [("b", r0, 7)]
    q.packed.validate()
    check_linear(q, w0, x, [(*b, 14.0, 0.5)], "after removing a")
    q.remove_lora("b")
    assert not q.loras
    for n, t in saved.items():  # the calibrated branch, exactly as it was (or no tensors at all)
        assert (getattr(q, n) is None) if t is None else torch.equal(getattr(q, n), t), n
    assert torch.equal(q(x), y0), "after removing every adapter the output must be bit-identical"


@pytest.mark.parametrize("kind", ["plain", "calibrated"])
def test_remove_is_bit_identical_on_every_path(kind, ref_cache):
    q = layer(kind)
    x = torch.randn(3, q.in_features).half()
    y0 = q(x)
    had_branch = q.lr_down is not None
    q.add_lora("x", *factors(3, q.out_features, q.in_features, seed=6))
    assert not torch.equal(q(x), y0)
    q.remove_lora("x")
    assert (q.lr_down is not None) == had_branch
    assert torch.equal(q(x), y0)


def test_scale_zero_without_calibrated_branch_is_exact():
    q = layer("plain")
    x = torch.randn(3, q.in_features)
    y0 = q(x)
    q.add_lora("x", *factors(3, q.out_features, q.in_features), scale=0.0)
    assert torch.equal(q(x), y0)  # dense + (up·0)@down = dense + 0 exactly


def test_add_lora_refuses_bad_input():
    q = layer("plain")
    n, k = q.out_features, q.in_features
    down, up = factors(2, n, k)
    q.add_lora("a", down, up)
    before = {n_: t.clone() for n_, t in q.named_buffers()}
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        q.add_lora("a", down, up)
    with pytest.raises(ValueError, match=r"shape mismatch: down \(2, 63\)"):
        q.add_lora("b", down[:, :63], up)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        q.add_lora("b", down, up[:, :1])
    bad = down.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"LoRA 'b' on QuantLinear\(64 -> 48\): 'down' holds NaN or Inf"):
        q.add_lora("b", bad, up)
    big = up.to(torch.bfloat16).clone()
    big[0, 0] = 70000.0  # representable in bf16, not in fp16
    with pytest.raises(ValueError, match="'up' has .*beyond fp16 range"):
        q.add_lora("b", down, big)
    with pytest.raises(ValueError, match="non-finite"):
        q.add_lora("b", down, up, scale=float("inf"))
    with pytest.raises(KeyError, match="no LoRA adapter 'zz'"):
        q.set_lora_scale("zz", 1.0)
    with pytest.raises(KeyError, match="no LoRA adapter 'zz'"):
        q.remove_lora("zz")
    with pytest.raises(ValueError, match="non-finite"):
        q.set_lora_scale("a", float("nan"))
    after = dict(q.named_buffers())
    assert before.keys() == after.keys() and all(torch.equal(before[n_], after[n_]) for n_ in before)
    assert list(q.loras) == ["a"] and q.loras["a"].scale == 1.0


def test_compiled_module_sees_in_place_scale_without_recompiling():
    q = layer("calibrated")
    q.add_lora("a", *factors(3, q.out_features, q.in_features, seed=8))
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(q, backend=backend, fullgraph=True)
    x = torch.randn(2, q.in_features)
    assert torch.allclose(compiled(x), q(x), rtol=1e-5, atol=1e-6)
    q.set_lora_scale("a", -2.0)
    y_eager = q(x)
    assert torch.allclose(compiled(x), y_eager, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1, "set_lora_scale must not force a recompilation"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def random_layer(n, k, rank, mixed, seed):
    """A QuantLinear over random codes (no calibration: fast), with two bit classes and a random
    perm when mixed, and a rank-`rank` calibrated-style branch."""
    g = torch.Generator().manual_seed(seed)
    kp = pack.padded_k(k, 32)
    bits, rows = ([4, 3], [16, n - 16]) if mixed else ([3], [n])
    codes = [torch.randint(0, 2 ** b, (r, kp), generator=g) for b, r in zip(bits, rows)]
    t = {"qweight": pack.pack_classes(codes, bits),
         "scales": (0.01 * (0.5 + torch.rand(n, kp // 32, generator=g))).half(),
         "zeros": (-0.04 + 0.01 * torch.randn(n, kp // 32, generator=g)).half(),
         "bias": 0.1 * torch.randn(n, generator=g)}
    if mixed:
        t["perm"] = torch.randperm(n, generator=g).to(torch.int32)
    if rank:
        t["lr_down"] = (0.1 * torch.randn(rank, k, generator=g)).half()
        t["lr_up"] = (0.1 * torch.randn(n, rank, generator=g)).half()
        t["lr_scale"] = torch.ones(rank)
    return QuantLinear(PackedWeight(out_features=n, in_features=k, group_size=32, class_bits=bits,
                                    class_rows=rows, row_align=16, config={}, target="cpu", tensors=t))


@settings(max_examples=25)
@given(n=st.integers(17, 70), k=st.integers(1, 150), rank=st.integers(0, 3), r=st.integers(1, 9),
       mixed=st.booleans(), alpha=st.sampled_from([None, 1.0, 16.0]), m=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_odd_shapes_and_ranks(n, k, rank, r, mixed, alpha, m, seed):
    q = random_layer(n, k, rank, mixed, seed)
    w0 = q.dequantize()
    down, up = factors(r, n, k, seed=seed)
    q.add_lora("h", down, up, alpha=alpha, scale=0.3)
    q.add_lora("i", *factors(2, n, k, seed=seed + 1))
    check_linear(q, w0, torch.randn(m, k), [(down, up, alpha, 0.3), (*factors(2, n, k, seed=seed + 1), None, 1.0)],
                 f"n={n} k={k} r={r}")
    q.remove_lora("h")
    check_linear(q, w0, torch.randn(m, k), [(*factors(2, n, k, seed=seed + 1), None, 1.0)], "after remove")


# ---- convs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cin,cout,k,kw", [
    (16, 40, 3, dict(padding=1)),
    (12, 24, (3, 5), dict(padding=(1, 2), stride=2)),
    (64, 32, 1, {}),
])
def test_conv_lora_matches_conv2d(cin, cout, k, kw, ref_cache):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, **kw)
    q = QuantConv2d.from_conv(conv, QuantConfig(bits=3, group_size=32, residual=True, rank=2))
    w0 = q.dequantize_conv()
    kh, kwid = q.kernel_size
    g = torch.Generator().manual_seed(1)
    down = 0.1 * torch.randn(4, cin, kh, kwid, generator=g)     # a LoRA down conv, same kernel
    up = 0.1 * torch.randn(cout, 4, 1, 1, generator=g)         # then a 1×1 up conv
    q.add_lora("c", down, up, alpha=8.0)
    lin_down, lin_up = factors(2, cout, q.in_features, seed=3)  # the linear form is accepted too
    q.add_lora("l", lin_down, lin_up, scale=-0.5)
    adapters = [(down, up, 8.0, 1.0), (lin_down, lin_up, None, -0.5)]
    x = torch.randn(2, cin, 9, 11, generator=g)
    y = q(x)
    w = w0.double() + delta(adapters, w0.shape)
    y_ref = F.conv2d(x.double(), w, q.bias.double(), q.stride, q.padding, q.dilation)
    cols = F.unfold(x, q.kernel_size, dilation=q.dilation, padding=q.padding,
                    stride=q.stride).transpose(1, 2).reshape(-1, q.in_features)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, cout)  # noqa: E731
    bound = matmul_bound(cols, branch_magnitudes(q), torch.float32, bias=q.bias)
    assert_within(rows(y), rows(y_ref), bound, f"conv {k} {kw}")
    with pytest.raises(ValueError, match=rf"for this conv also down \(r, {cin}, {kh}, {kwid}\)"):
        q.add_lora("bad", down[:, 1:], up)  # one channel short


# ---- Triton (interpreter) --------------------------------------------------------------------


def test_triton_forward_with_adapter_under_the_interpreter(monkeypatch):
    # As tests/test_triton.py: BITFUSE_BACKEND=triton runs the fused kernels through the normal
    # forward, on CPU tensors under TRITON_INTERPRET=1 (conftest); the GPU run is test_gpu.
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the GPU run is test_gpu_triton")
    import bitfuse.kernels.launch as launch
    from bitfuse.kernels import tuning

    calls = count_calls(monkeypatch, launch)
    w = heavy_tailed(64, 96, seed=3, outlier_channels=8)
    q = QuantLinear.from_linear(linear_from(w), QuantConfig(bits=3, group_size=32, rank=2, mixed_bits=(2, 3, 4)))
    assert q.perm is not None
    w0 = q.dequantize()
    down, up = factors(3, 64, 96, seed=9)
    q.add_lora("t", down, up, alpha=6.0, scale=0.5)
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    for m in (2, 17):  # the GEMV and the GEMM path
        x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).half()
        y = q(x)
        path = tuning.choose_path(m, "cpu")
        y_ref = oracle_linear(w0, q.bias, x, [(down, up, 6.0, 0.5)])
        # GEMM rounds the dequantized weight to x's dtype for tl.dot; GEMV multiplies in fp32.
        bound = matmul_bound(x.float(), branch_magnitudes(q), x.dtype, y_ref=y_ref.half(), bias=q.bias,
                             operand_dtype=torch.float16 if path == "gemm" else None)
        assert_within(y, y_ref, bound, f"triton {path} M={m}")
    assert calls, "the Triton launcher was not called"


def test_triton_implicit_gemm_conv_with_adapter_under_the_interpreter(monkeypatch):
    # As tests/test_conv_triton.py: a k×k QuantConv2d on BITFUSE_BACKEND=triton runs the implicit
    # GEMM, whose low-rank pre-pass gathers the patches for the adapter's down conv too.
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the GPU run is test_gpu_conv_sd15")
    from bitfuse.kernels import conv_launch

    calls = count_calls(monkeypatch, conv_launch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 20, 3, padding=1, stride=2)
    q = QuantConv2d.from_conv(conv, QuantConfig(bits=3, group_size=32, rank=2), method="rtn")
    w0 = q.dequantize_conv()
    g = torch.Generator().manual_seed(2)
    down, up = 0.1 * torch.randn(3, 6, 3, 3, generator=g), 0.1 * torch.randn(20, 3, 1, 1, generator=g)
    q.add_lora("c", down, up, alpha=1.5, scale=2.0)
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    x = torch.randn(2, 6, 7, 6, generator=g).half()
    y = q(x)
    assert calls, "the implicit-GEMM launcher was not called"
    w = w0.double() + delta([(down, up, 1.5, 2.0)], w0.shape)
    y_ref = F.conv2d(x.double(), w, q.bias.double(), q.stride, q.padding, q.dilation)
    cols = F.unfold(x.float(), q.kernel_size, padding=q.padding, stride=q.stride)
    cols = cols.transpose(1, 2).reshape(-1, q.in_features)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 20)  # noqa: E731
    bound = matmul_bound(cols, branch_magnitudes(q), x.dtype, y_ref=rows(y_ref).half(), bias=q.bias,
                         operand_dtype=torch.float16)
    assert_within(rows(y), rows(y_ref), bound, "triton implicit GEMM with a conv LoRA")


# ---- checkpoints ------------------------------------------------------------------------------


def _small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 48))


@pytest.fixture()
def lora_ckpt(tmp_path):
    m = bitfuse.quantize_(_small_model(), QuantConfig(bits=4, group_size=32, rank=2, mixed_bits=(3, 4)),
                          calib_options={"method": "rtn"}, progress=False)
    x = torch.randn(5, 64)
    y0 = m(x)
    m[0].add_lora("style", *factors(3, 96, 64, seed=1), alpha=1.5, scale=0.8)
    m[0].add_lora("detail", *factors(2, 96, 64, seed=2))
    m[2].add_lora("style", *factors(4, 48, 96, seed=3), scale=-0.25)
    path = str(tmp_path / "m.safetensors")
    bitfuse.save_quantized(m, path)
    return m, path, x, y0


def test_save_load_keeps_adapters(lora_ckpt):
    m, path, x, y0 = lora_ckpt
    meta = json.loads(header(path)[1]["__metadata__"]["bitfuse"])
    assert [e["name"] for e in meta["layers"]["0"]["lora"]] == ["style", "detail"]
    fresh = bitfuse.load_quantized(_small_model(seed=5), path)
    for i in (0, 2):
        assert fresh[i].loras == m[i].loras
    assert torch.equal(fresh(x), m(x))
    assert bitfuse.list_loras(fresh).keys() == {"style", "detail"}
    # swapping after a load works as before it: rescale in place, then remove everything
    bitfuse.set_lora_scale(fresh, "style", 0.1)
    m[0].set_lora_scale("style", 0.1)
    m[2].set_lora_scale("style", 0.1)
    assert torch.equal(fresh(x), m(x))
    bitfuse.remove_lora(fresh, "style")
    bitfuse.remove_lora(fresh, "detail")
    assert torch.equal(fresh(x), y0)
    assert "lora" not in fresh[0].packed.meta()


def test_checkpoint_without_adapter_table_loads_as_calibrated_branch(lora_ckpt):
    # An older checkpoint (or one whose table was dropped): every component is "calibrated",
    # lr_scale as stored, so the output is the same; there are just no adapters to swap.
    m, path, x, _ = lora_ckpt
    edit_meta(path, lambda meta: [lm.pop("lora", None) for lm in meta["layers"].values()])
    fresh = bitfuse.load_quantized(_small_model(), path)
    assert not fresh[0].loras and fresh[0]._lr_rank() == 2 + 3 + 2
    assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("edit,match", [
    (lambda e: e[0].__setitem__("scale", 0.9), r"adapter 'style': lr_scale\[2:5\] .* disagrees with the adapter table"),
    (lambda e: e[0].__setitem__("alpha", 3.0), "disagrees with the adapter table"),
    (lambda e: e[1].__setitem__("offset", 4), "back to back"),
    (lambda e: e[1].__setitem__("rank", 5), "hold 8 components, the low-rank branch has rank 7"),
    (lambda e: e[1].__setitem__("name", "style"), "repeats a name"),
    (lambda e: e[1].pop("alpha"), "malformed adapter table entry"),
])
def test_adapter_table_that_disagrees_with_the_tensors_is_refused(lora_ckpt, edit, match):
    _, path, _, _ = lora_ckpt
    edit_meta(path, lambda meta: edit(meta["layers"]["0"]["lora"]))
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(bitfuse.CheckpointError, match=match) as e:
        bitfuse.load_quantized(model, path)
    assert isinstance(e.value.__cause__, FormatError)
    assert isinstance(model[0], torch.nn.Linear)  # left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- on a GPU (`pytest -m gpu`; none has been lent yet) ------------------------------------------


@functools.lru_cache(maxsize=None)
def _gpu_layer():
    # Built once (rtn: the kernels, not the calibration, are under test; the GPU session's time
    # is short), copied by each test.
    w = heavy_tailed(1088, 1000, seed=5, outlier_channels=8)
    # avg_bits 3.5: with avg_bits = bits the permutation's 32 bits a row make one class cheaper
    q = QuantLinear.from_linear(linear_from(w), QuantConfig(bits=3, group_size=64, mixed_bits=(3, 4), avg_bits=3.5,
                                                            rank=8, residual=0.5, outliers=0.005),
                                method="rtn")
    assert len(q.class_bits) > 1, q.class_bits  # a mixed layer (perm), as the tests below say
    return q


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("m", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_adapters_on_each_backend(monkeypatch, backend, m, dtype):
    """A mixed layer (perm) with a calibrated branch and two adapters, on the CUDA kernels (GEMV
    for M <= 8, GEMM above; t pre-scaled by lr_scale in Python) and the Triton ones (lr_scale in
    the down kernel): against the oracle, then after set_lora_scale, then with the adapters
    removed (the calibrated layer's own output, bit for bit)."""
    if not bitfuse.backends()[backend]["available"]:
        pytest.fail(f"GPU present but the {backend} backend is unavailable: "
                    f"{bitfuse.backends()[backend]['reason']}")
    monkeypatch.setenv("BITFUSE_BACKEND", backend)
    q = copy.deepcopy(_gpu_layer()).cuda()
    w0 = q.dequantize().cpu()
    x = torch.randn(m, 1000, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
    y_plain = q(x)
    a1, a2 = factors(16, 1088, 1000, seed=1), factors(4, 1088, 1000, seed=2)
    q.add_lora("one", *a1, alpha=8.0, scale=1.0)
    q.add_lora("two", *a2, scale=0.5)
    # The GEMMs round Ŵ to x's dtype for the tensor cores, except CUDA's at M <= 16 (the skinny
    # tile) and its tensor-core GEMV, which sum exact codes and apply the scales per group
    # (factored magnitudes, no operand rounding).
    factored = backend == "cuda" and m <= 16
    operand = None if factored or m <= 8 else dtype
    mags_of = factored_branch_magnitudes if factored else branch_magnitudes

    def check(adapters, what):
        y = q(x).cpu()
        y_ref = oracle_linear(w0, q.bias.cpu(), x.cpu(), adapters)
        bound = matmul_bound(x.cpu().float(), mags_of(copy.deepcopy(q).cpu()), dtype,
                             y_ref=y_ref.to(dtype), bias=q.bias.cpu(), operand_dtype=operand)
        assert_within(y, y_ref, bound, f"{backend} M={m} {dtype}: {what}")

    check([(*a1, 8.0, 1.0), (*a2, None, 0.5)], "two adapters")
    ptr = q.lr_scale.data_ptr()
    q.set_lora_scale("one", 0.25)
    assert q.lr_scale.data_ptr() == ptr
    check([(*a1, 8.0, 0.25), (*a2, None, 0.5)], "after set_lora_scale")
    q.remove_lora("one")
    q.remove_lora("two")
    assert torch.equal(q(x), y_plain)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_set_lora_scale_inside_a_cuda_graph(monkeypatch, backend):
    """The hot swap the README promises: capture a forward with an adapter, change its scale in
    place, replay: the replay gives the eager output at the new scale, bit for bit."""
    if not bitfuse.backends()[backend]["available"]:
        pytest.fail(f"GPU present but the {backend} backend is unavailable")
    monkeypatch.setenv("BITFUSE_BACKEND", backend)
    w = heavy_tailed(512, 384, seed=6)
    q = QuantLinear.from_linear(linear_from(w), QuantConfig(bits=4, group_size=64, rank=4), method="rtn").cuda()
    q.add_lora("style", *factors(8, 512, 384, seed=3), scale=1.0)
    for m in (1, 32):  # GEMV and GEMM paths
        x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).half().cuda()
        q.set_lora_scale("style", 1.0)
        q(x)  # eager first call: autotuning, HBP build, split-K counters, Triton compile
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            q(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_graph = q(x)
        for scale in (0.0, 0.5, 2.0):
            q.set_lora_scale("style", scale)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y_graph, q(x)), f"{backend} M={m} scale {scale}"


# ---- found by review (2026-11-29) --------------------------------------------------------------


def test_swaps_never_reuse_a_stale_reference_cache():
    # The CPU forward caches the dense weight. It was keyed on buffer addresses: remove + add
    # often got the freed addresses back, and the layer kept the removed adapter's output
    # (1-2 swaps in 20 here, before the fix).
    q = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)), QuantConfig(bits=4, group_size=64),
                                method="rtn")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def fp16_factors(seed):
        down, up = factors(4, 32, 64, seed=seed, mag=1.0)
        return down.half(), (10 * up).half()

    for i in range(40):
        q.add_lora("a", *fp16_factors(2 * i))
        q(x)
        q.remove_lora("a")
        q.add_lora("b", *fp16_factors(2 * i + 1))
        y, y_op = q(x), bitfuse.reference.linear(x, q._view())  # cached vs uncached
        assert torch.allclose(y, y_op, rtol=1e-4, atol=1e-4), f"swap {i}: stale cached weight"
        q.remove_lora("b")


def test_adapter_factors_are_copies():
    q = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)), QuantConfig(bits=4, group_size=32),
                                method="rtn")
    down, up = (t.half().contiguous() for t in factors(2, 32, 64, seed=3))
    q.add_lora("a", down, up)
    before = q(torch.ones(1, 64))
    down.mul_(10)
    up.mul_(10)
    assert torch.equal(q(torch.ones(1, 64)), before)


def test_load_state_dict_keeps_the_adapter_table_true():
    a = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)), QuantConfig(bits=4, group_size=32),
                                method="rtn")
    a.add_lora("s", *factors(4, 32, 64, seed=4), alpha=2.0, scale=1.0)
    b = copy.deepcopy(a)
    b.set_lora_scale("s", 0.25)
    b.load_state_dict(a.state_dict())  # in place: lr_scale now holds a's strength
    assert b.loras["s"].scale == 1.0
    x = torch.randn(2, 64)
    assert torch.equal(b(x), a(x))
    b.packed.validate()  # the table agrees with the tensors, so save_quantized writes a loadable file
    # a loaded lr_scale that is not one strength per adapter cannot be described by the table
    bad = {k: v.clone() for k, v in a.state_dict().items()}
    bad["lr_scale"][1] = 3.0
    bad["bias"] += 1
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"do not fit the LoRA adapters \['s'\]"):
        b.load_state_dict(bad)
    # refused before anything was copied: the layer is as it was
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    b.packed.validate()


def test_inference_mode_layers_and_adapters():
    # Adapters are often loaded inside inference code: the layer must keep working outside it,
    # and set_lora_scale must still write in place. (A layer quantized inside inference_mode has
    # inference buffers without version counters: its CPU forward skips the dense cache.)
    x = torch.randn(2, 64)
    down, up = factors(4, 32, 64, seed=5)
    with torch.inference_mode():
        q = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)),
                                    QuantConfig(bits=4, group_size=32), method="rtn")
        w0 = q.dequantize()
        q.add_lora("t", down, up)
        y_in = q(x)
    bound = matmul_bound(x, branch_magnitudes(q), x.dtype, bias=q.bias)
    assert_within(y_in, oracle_linear(w0, q.bias, x, [(down, up, None, 1.0)]), bound, "inside")
    assert_within(q(x), oracle_linear(w0, q.bias, x, [(down, up, None, 1.0)]), bound, "outside")
    q.set_lora_scale("t", 0.5)
    assert_within(q(x), oracle_linear(w0, q.bias, x, [(down, up, None, 0.5)]), bound, "rescaled")
    with torch.inference_mode():
        q.set_lora_scale("t", 0.0)
        assert_within(q(x), oracle_linear(w0, q.bias, x, []), bound, "off, inside")


def test_copies_never_reuse_the_original_cache():
    # deepcopy (and pickling) used to carry the dense-weight cache with a key naming the copy's
    # fresh buffers: after the same number of in-place updates the copy returned the original's
    # weight.
    q = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)), QuantConfig(bits=4, group_size=32),
                                method="rtn")
    down, up = factors(4, 32, 64, seed=6)
    w0 = q.dequantize()
    q.add_lora("s", down, up)
    x = torch.randn(2, 64)
    q.set_lora_scale("s", 0.5)
    q(x)  # cached at 0.5
    c = copy.deepcopy(q)
    c.set_lora_scale("s", 3.0)
    bound = matmul_bound(x, branch_magnitudes(c), x.dtype, bias=c.bias)
    assert_within(c(x), oracle_linear(w0, c.bias, x, [(down, up, None, 3.0)]), bound, "copy at 3.0")


def test_cache_built_in_inference_mode_serves_autograd_later():
    q = QuantLinear.from_linear(linear_from(heavy_tailed(32, 64, seed=1)), QuantConfig(bits=4, group_size=32),
                                method="rtn")
    x = torch.randn(2, 64)
    with torch.inference_mode():
        y0 = q(x)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    y.sum().backward()  # would fail on a cached inference tensor
    assert torch.equal(y.detach(), y0) and xg.grad is not None
