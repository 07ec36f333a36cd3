"""The implicit-GEMM conv (bitfuse/kernels/conv2d.py) against F.conv2d with the dequantized weight.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it), with small
images; `pytest -m gpu` runs the same comparisons compiled on SD1.5 conv shapes (test_gpu_*).
Layers are built from random codes (random_conv) so every bit class, branch and geometry is
covered whatever the calibrator would choose; two tests use calibrated convs end to end.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import bitfuse
from bitfuse import QuantConfig, pack
from bitfuse.format import PackedWeight
from bitfuse.nn import QuantConv2d
from _tolerance import assert_within, branch_magnitudes, matmul_bound
from _spies import count_calls

triton = pytest.importorskip("triton")
from bitfuse.kernels import KernelConfig  # noqa: E402
from bitfuse.kernels import conv_launch  # noqa: E402
from bitfuse.kernels.conv_launch import conv2d_implicit  # noqa: E402


def random_conv(cout, cin, kernel_size, classes=((4, None),), group=32, residual=False, rank=0,
                nnz=0, bias=False, seed=0, compact=False, **conv) -> QuantConv2d:
    """A QuantConv2d over a valid PackedWeight of random codes: classes = ((bits, rows), …) in
    packed order (rows None = the rest), a residual on every other row, rank-r low-rank factors,
    nnz sparse outliers, a bias; perm is a random permutation whenever there are several classes."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    k = cin * kh * kw
    kp = pack.padded_k(k, group)
    bits = [b for b, _ in classes]
    rows = [r if r is not None else cout - sum(r_ for _, r_ in classes if r_) for _, r in classes]
    codes = [torch.randint(0, 2 ** b, (r, kp), generator=g) for b, r in zip(bits, rows)]
    steps = torch.cat([torch.full((r,), 0.04 / 2 ** b) for b, r in zip(bits, rows)])[:, None]
    scales = steps * (0.5 + torch.rand(cout, kp // group, generator=g))
    levels = torch.cat([torch.full((r,), 2.0 ** b - 1) for b, r in zip(bits, rows)])[:, None]
    t = {"qweight": pack.pack_classes(codes, bits), "scales": scales.half(),
         "zeros": (-scales * levels / 2 + 0.002 * torch.randn(cout, kp // group, generator=g)).half()}
    if compact:  # the same scales and offsets as compact codes (FORMAT.md §5.1)
        sc, zc, rf = pack.compact_scales(t.pop("scales").float(), t.pop("zeros").float())
        t.update(scale_codes=sc, zero_codes=zc, scale_rows=rf)
    if len(classes) > 1:
        t["perm"] = torch.randperm(cout, generator=g).to(torch.int32)
    if residual:
        ri = torch.full((cout,), -1, dtype=torch.int32)
        ri[::2] = torch.arange((cout + 1) // 2, dtype=torch.int32)
        rr = (cout + 1) // 2
        t["res_index"] = ri
        t["res_plane"] = pack.pack_signs(torch.rand(rr, kp, generator=g) < 0.5)
        t["res_alpha"] = (scales[::2] * 0.25).half()
    if rank:
        t["lr_down"] = (0.1 * torch.randn(rank, k, generator=g)).half()
        t["lr_up"] = (0.1 * torch.randn(cout, rank, generator=g)).half()
        t["lr_scale"] = 0.5 + torch.rand(rank, generator=g)
    if nnz:
        flat = torch.randperm(cout * k, generator=g)[:nnz].sort().values
        r_, c_ = flat // k, flat % k
        t["sp_indptr"] = torch.cat([torch.zeros(1, dtype=torch.long),
                                    torch.bincount(r_, minlength=cout).cumsum(0)]).to(torch.int32)
        t["sp_indices"] = c_.to(torch.int32)
        t["sp_values"] = (0.3 * torch.randn(nnz, generator=g)).half()
    if bias:
        t["bias"] = 0.1 * torch.randn(cout, generator=g)
    pw = PackedWeight(out_features=cout, in_features=k, group_size=group, class_bits=bits,
                      class_rows=rows, row_align=16, config={}, target="cpu", tensors=t).validate()
    return QuantConv2d(pw, cin, (kh, kw), **conv)


def reference(q: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d in fp32 with the dequantized weight (all branches) and the bias: (B, O, Ho, Wo)."""
    bias = q.bias.float() if q.bias is not None else None
    return F.conv2d(x.float(), q.dequantize_conv(), bias, q.stride, q.padding, q.dilation)


def check(q: QuantConv2d, x: torch.Tensor, y: torch.Tensor, what: str, gemm: bool = True) -> None:
    """y (B, O, Ho, Wo) against reference() within the fp accumulation bound of every output,
    each a K = C·kh·kw dot product (tests/_tolerance.py)."""
    y_ref = reference(q, x)
    assert y.shape == y_ref.shape and y.dtype == x.dtype, (what, y.shape, y_ref.shape, y.dtype)
    cols = F.unfold(x.float(), q.kernel_size, dilation=q.dilation, padding=q.padding,
                    stride=q.stride).transpose(1, 2).reshape(-1, q.in_features)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, q.out_channels)  # noqa: E731
    # tl.dot rounds the dequantized weight to x's dtype; the GEMV path multiplies in fp32.
    operand = x.dtype if gemm and x.dtype != torch.float32 else None
    bound = matmul_bound(cols, branch_magnitudes(q), x.dtype, y_ref=rows(y_ref), operand_dtype=operand,
                         bias=q.bias)
    assert_within(rows(y), rows(y_ref), bound, what)


def run(q: QuantConv2d, x: torch.Tensor, config=None) -> torch.Tensor:
    """The launcher directly; its (B, Ho, Wo, O) output viewed as (B, O, Ho, Wo)."""
    y = conv2d_implicit(x, q.packed, q.kernel_size, q.stride, q.padding, q.dilation, config=config)
    return y.permute(0, 3, 1, 2)


def image(b, c, h, w, dtype=torch.float16, channels_last=False, seed=0):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# (cout, cin, kernel, conv kwargs, H, W): stride 1/2, padding 0/1/2, dilation 1/2, non-square and
# even kernels, 1×1 with padding; channel counts that are multiples of no tile; batch 2.
GEOMETRIES = {
    "3x3 s1 p1": (19, 5, 3, dict(padding=1), 7, 6),
    "3x3 s2 p1": (20, 6, 3, dict(stride=2, padding=1), 9, 8),
    "3x3 s1 p0": (17, 6, 3, dict(), 7, 9),
    "3x3 d2 p2": (24, 4, 3, dict(dilation=2, padding=2), 8, 7),
    "3x5 s(2,1) p(1,2)": (16, 5, (3, 5), dict(stride=(2, 1), padding=(1, 2)), 9, 6),
    "1x3 p(0,1)": (21, 3, (1, 3), dict(padding=(0, 1)), 5, 8),
    "1x1 p1": (18, 7, 1, dict(padding=1), 5, 6),
    "2x2 s2 d(1,2) p(1,0)": (20, 6, 2, dict(stride=2, dilation=(1, 2), padding=(1, 0)), 8, 9),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry(name, channels_last):
    cout, cin, k, kw, h, w = GEOMETRIES[name]
    # every geometry also checks the gathers of the low-rank pre-pass and of the sparse outliers
    q = random_conv(cout, cin, k, bias=True, rank=2, nnz=12, seed=len(name), **kw)
    x = image(2, cin, h, w, channels_last=channels_last, seed=cout)
    y = run(q, x)
    check(q, x, y, f"{name} {'channels_last' if channels_last else 'nchw'}")
    if name == "3x3 s1 p1" and not channels_last:
        # The bound is tight enough to see wrong taps: the kernel mirrored left-right fails it.
        with pytest.raises(AssertionError, match="max \\|err\\|/bound"):
            check(q, x, run(q, x.flip(-1)).flip(-1), "mirrored")


BRANCHES = {
    "residual": dict(residual=True),
    "mixed": dict(),
    "lowrank": dict(rank=5),
    "sparse": dict(nnz=40),
    "bias": dict(bias=True),
    "all": dict(residual=True, rank=5, nnz=40, bias=True),
}
MIXED = {2: ((3, 16), (2, None)), 3: ((4, 16), (3, 16), (2, None)), 4: ((2, 16), (4, None))}


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bits_and_branches(bits, branch):
    classes = MIXED[bits] if branch in ("mixed", "all") else ((bits, None),)
    q = random_conv(40, 6, 3, classes=classes, padding=1, seed=bits, **BRANCHES[branch])
    x = image(2, 6, 6, 7, seed=bits)
    check(q, x, run(q, x), f"W{bits} {branch}")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compact_scales(bits):
    q = random_conv(40, 12, 3, classes=MIXED[bits], padding=1, seed=bits, compact=True, residual=True,
                    rank=3, nnz=20, bias=True)
    assert q.packed.compact_scales
    x = image(2, 12, 6, 7, seed=bits)
    check(q, x, run(q, x), f"W{bits} compact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dtypes(dtype, channels_last):
    # bf16: the interpreter runs the product in fp32 (its bf16 tl.dot is wrong, docs/STATUS.md);
    # the bound still allows bf16 operand rounding, as on a GPU.
    q = random_conv(40, 5, (3, 2), classes=MIXED[3], group=64, residual=True, rank=3, nnz=30,
                    bias=True, stride=(1, 2), padding=1, seed=7)
    x = image(2, 5, 7, 8, dtype=dtype, channels_last=channels_last)
    check(q, x, run(q, x), f"{dtype}")


@pytest.mark.parametrize("config", [
    None,                                          # M = 4 <= 8: the GEMV path (interpreter config: split-K 2)
    KernelConfig("gemm", 16, 16, 32, split_k=3),  # small tiles: several M, N and K tiles
])
def test_paths_and_split_k(config):
    q = random_conv(24, 7, 3, classes=((4, 16), (3, None)), group=32, residual=True, rank=3, nnz=20,
                    bias=True, stride=2, padding=1, seed=3)
    x = image(1, 7, 4, 3) if config is None or config.path == "gemv" else image(2, 7, 7, 5)
    y1 = run(q, x, config)
    assert torch.equal(y1, run(q, x, config)), "split-K must be deterministic"
    check(q, x, y1, f"{config}", gemm=config is not None and config.path == "gemm")


@pytest.mark.parametrize("table,channels_last", [("h100", False), ("rtx30", True)])
def test_every_gpu_table_gemm_config_under_the_interpreter(table, channels_last):
    """The GEMM configs a GPU launches (not only the interpreter's): 16- to 128-row M tiles of
    gathered pixels, 64/128-column N tiles clipped at a class boundary at row 320 (not a multiple
    of 128), K tiles of 32 and 64 over a 3×3 × 40-channel K, 8 warps, every branch; one input
    layout per table (both layouts are covered at the small configs above)."""
    from bitfuse.kernels import tuning

    q = random_conv(384, 40, 3, classes=((3, 320), (4, None)), group=64, residual=True, rank=4,
                    nnz=60, bias=True, padding=1, seed=11)
    x = image(1, 40, 5, 26, channels_last=channels_last)  # M = 130: partial tiles of every size
    for _, cfg in tuning.TABLES[table]["gemm"]:
        check(q, x, run(q, x, cfg), f"{table} {cfg}")


def test_module_forward_runs_the_implicit_gemm(monkeypatch):
    """BITFUSE_BACKEND=triton: QuantConv2d (calibrated from an nn.Conv2d) takes the implicit GEMM
    for k×k convs, returns NCHW-shaped channels-last output; the torch path stays im2col."""
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the GPU run is test_gpu_conv_sd15")
    calls = count_calls(monkeypatch, conv_launch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(9, 24, 3, padding=1, stride=2)
    q = QuantConv2d.from_conv(conv, QuantConfig(bits=3, group_size=32, residual=True, rank=2, outliers=0.01))
    x = torch.randn(2, 9, 8, 7).half()
    y_torch = q(x)
    assert not calls, "the torch reference must not run the Triton conv"
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    y = q(x)
    assert calls, "the implicit-GEMM launcher was not called"
    assert y.shape == y_torch.shape and y.is_contiguous(memory_format=torch.channels_last)
    check(q, x, y, "QuantConv2d forward, triton")
    # a 1×1 conv without padding stays a linear over channels (no conv launch)
    calls.clear()
    q1 = QuantConv2d.from_conv(torch.nn.Conv2d(32, 16, 1), QuantConfig(bits=4, group_size=32))
    q1(torch.randn(1, 32, 3, 3).half())
    assert not calls


def test_custom_op_opcheck_and_compile(monkeypatch):
    """bitfuse::conv2d: schema, fake impl and AOT dispatch (opcheck), its im2col path on the torch
    backend, and torch.compile(fullgraph) of QuantConv2d running the implicit GEMM through it."""
    if torch.cuda.is_available():
        pytest.skip("interpreter check")
    calls = count_calls(monkeypatch, conv_launch)
    q = random_conv(20, 4, 3, classes=((4, 16), (3, None)), residual=True, rank=2, nnz=10, bias=True,
                    padding=1, seed=5)
    x = image(1, 4, 5, 6, dtype=torch.float32)
    args = (x,) + bitfuse.ops.op_args(q.packed) + ([3, 3], [1, 1], [1, 1], [1, 1])
    y_op = torch.ops.bitfuse.conv2d(*args)               # torch backend: im2col + linear op
    assert not calls and y_op.shape == (1, 5, 6, 20)
    check(q, x, y_op.permute(0, 3, 1, 2), "op, torch backend")
    # (on the torch backend: the fake impl does not depend on the backend, and the schema check
    # mode makes every interpreted Triton step slow)
    torch.library.opcheck(torch.ops.bitfuse.conv2d.default, args)
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    check(q, x, compiled(x), "torch.compile, triton")
    assert calls, "the compiled module must run the implicit GEMM"


def test_bad_input():
    q = random_conv(20, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"QuantConv2d\(4 -> 20\) expects \(B, 4, H, W\) or \(4, H, W\), got \(1, 5, 6, 6\)"):
        q(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match=r"expects \(B, 4, H, W\) or \(4, H, W\), got \(5, 6, 6\)"):
        q(torch.randn(5, 6, 6))
    x = torch.randn(4, 6, 6)  # unbatched, as nn.Conv2d takes it
    with torch.no_grad():
        assert torch.equal(q(x), q(x.unsqueeze(0)).squeeze(0))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        q(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="got torch.int32"):
        q(torch.ones(1, 4, 6, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        random_conv(20, 4, 3)(torch.randn(1, 4, 2, 6))
    # the launcher itself, called directly
    with pytest.raises(ValueError, match=r"x has 5 channels, but the packed weight's in_features 36 = C·3·3 needs C = 4"):
        conv2d_implicit(torch.randn(1, 5, 6, 6).half(), q.packed, 3, 1, 1, 1)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32, got torch.float64"):
        conv2d_implicit(torch.randn(1, 4, 6, 6).double(), q.packed, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="4-D"):
        conv2d_implicit(torch.randn(4, 6, 6).half(), q.packed, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        conv2d_implicit(torch.randn(1, 4, 6, 6).half(), q.packed, 3, 0, 1, 1)
    assert conv2d_implicit(torch.randn(0, 4, 6, 6).half(), q.packed, 3, 1, 1, 1).shape == (0, 6, 6, 20)


# ---- compiled, on a GPU -------------------------------------------------------------------------
# SD1.5 UNet 3×3 convs at 512² (64×64 latents), batch 1: resnet convs at each width, a stride-2
# downsample, and an up-block conv on concatenated skips. Every shape runs the three recipes, each
# with a different dtype / input layout (the CPU-side bound is what makes a case slow).
SD15 = {
    "320@64": (320, 320, 64, {}), "320@64 s2": (320, 320, 64, dict(stride=2)),
    "640@32": (640, 640, 32, {}), "1280@16": (1280, 1280, 16, {}), "1280@8": (1280, 1280, 8, {}),
    "960->320@64": (320, 960, 64, {}),
}
GPU_RECIPES = {
    "w4 fp16 nchw": (dict(classes=((4, None),), group=128), torch.float16, False),
    "w3+res fp16 channels_last": (dict(classes=((3, None),), group=128, residual=True), torch.float16, True),
    "mixed+all bf16 nchw": (dict(classes=((4, 64), (3, None)), group=64, residual=True, rank=32,
                                 bias=True), torch.bfloat16, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", list(GPU_RECIPES))
@pytest.mark.parametrize("name", list(SD15))
def test_gpu_conv_sd15(name, recipe):
    cout, cin, hw, kw = SD15[name]
    opts, dtype, channels_last = GPU_RECIPES[recipe]
    nnz = cout * cin * 9 // 500 if "all" in recipe else 0   # 0.2% outliers
    q = random_conv(cout, cin, 3, padding=1, seed=1, nnz=nnz, **opts, **kw)
    x = image(1, cin, hw, hw, dtype=dtype, channels_last=channels_last)
    y = run(copy.deepcopy(q).cuda(), x.cuda()).cpu()
    check(q, x, y, f"GPU {name} {recipe}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["", "triton"], ids=["auto", "triton"])
def test_gpu_module_forward_and_small_m(monkeypatch, backend):
    """QuantConv2d on CUDA tensors, automatic dispatch and the triton backend forced; M = 2 (the
    GEMV path with split-K) and an odd image with M = 306 (the tl.dot path)."""
    if backend:
        monkeypatch.setenv("BITFUSE_BACKEND", backend)
    q = random_conv(320, 64, 3, classes=((4, 64), (3, None)), residual=True, rank=8, nnz=200,
                    bias=True, padding=1, stride=2, seed=2)
    qc = copy.deepcopy(q).cuda()
    for shape, m in [((1, 64, 2, 3), 2), ((2, 64, 33, 17), 306)]:
        x = image(*shape)
        check(q, x, run(qc, x.cuda()).cpu(), f"GPU {shape}", gemm=m > 8)
        check(q, x, qc(x.cuda()).cpu(), f"GPU module {backend or 'auto'} {shape}")
