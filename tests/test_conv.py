"""QuantConv2d against F.conv2d with its dequantized weight; convs in quantize_ and checkpoints."""

import logging

import pytest
import torch
import torch.nn.functional as F

import bitfuse
from bitfuse import QuantConfig
from bitfuse.nn import QuantConv2d
from _tolerance import assert_within, branch_magnitudes, matmul_bound


def _conv(cin, cout, k, seed=0, **kw):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(cin, cout, k, **kw)


@pytest.mark.parametrize(
    "cin,cout,k,kw",
    [
        (64, 32, 1, {}),
        (64, 32, 1, dict(stride=2)),
        (16, 40, 3, dict(padding=1)),
        (16, 40, 3, dict(padding=1, stride=2)),
        (8, 24, 3, dict(padding=2, dilation=2, bias=False)),
        (12, 20, (3, 5), dict(padding=(1, 2))),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_matches_conv2d_with_dequantized_weight(cin, cout, k, kw, dtype):
    conv = _conv(cin, cout, k, **kw)
    q = QuantConv2d.from_conv(conv, QuantConfig(bits=3, group_size=32, residual=True, rank=2, outliers=0.01))
    x = torch.randn(2, cin, 9, 11).to(dtype)
    y = q(x)
    W = q.dequantize_conv()
    assert W.shape == conv.weight.shape
    bias = conv.bias.detach() if conv.bias is not None else None
    y_ref = F.conv2d(x.float(), W, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    assert y.shape == y_ref.shape and y.dtype == dtype
    # bound from the patch view: every output is a K = cin·kh·kw dot product
    cols = F.unfold(x.float(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride).transpose(1, 2).reshape(-1, W[0].numel())
    y_ref_rows = y_ref.to(dtype).permute(0, 2, 3, 1).reshape(-1, cout)
    bound = matmul_bound(cols, branch_magnitudes(q), dtype, y_ref=y_ref_rows, bias=bias)
    assert_within(y.permute(0, 2, 3, 1).reshape(-1, cout), y_ref_rows, bound, f"conv {k} {kw} {dtype}")


def test_conv_rejects_bad_input():
    q = QuantConv2d.from_conv(_conv(16, 32, 3, padding=1), QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"expects \(B, 16, H, W\)"):
        q(torch.randn(1, 15, 8, 8))
    with pytest.raises(ValueError, match="groups=2"):
        QuantConv2d.from_conv(torch.nn.Conv2d(16, 32, 3, groups=2), QuantConfig(group_size=32))


def test_quantize_covers_convs_only_when_asked(caplog):
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1, groups=4), torch.nn.Conv2d(32, 48, 1))
    bitfuse.quantize_(model, QuantConfig(bits=4, group_size=32))
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())
    with caplog.at_level(logging.INFO, logger="bitfuse"):
        bitfuse.quantize_(model, QuantConfig(bits=4, group_size=32, convs=True))
    assert isinstance(model[0], QuantConv2d) and isinstance(model[3], QuantConv2d)
    assert isinstance(model[2], torch.nn.Conv2d) and "groups=4" in caplog.text


def test_unet_with_convs_save_load(tmp_path):
    pytest.importorskip("diffusers")
    from bitfuse.integrations.diffusers import tiny_unet, unet_inputs

    unet = tiny_unet()
    with torch.no_grad():
        ref = unet(*unet_inputs(unet)).sample
    bitfuse.quantize_(unet, QuantConfig(bits=4, group_size=32, convs=True))
    n_conv = sum(isinstance(m, QuantConv2d) for m in unet.modules())
    assert n_conv >= 10
    with torch.no_grad():
        out = unet(*unet_inputs(unet)).sample
    # Measured 0.21 relative error with W4 g32 on every linear and conv of this random-weight
    # UNet (0.03 with linears only; conv_in alone costs 0.09): errors add up layer by layer.
    assert float((out - ref).norm() / ref.norm()) < 0.3
    path = str(tmp_path / "unet.safetensors")
    bitfuse.save_quantized(unet, path)
    fresh = bitfuse.load_quantized(tiny_unet(seed=4), path)
    with torch.no_grad():
        assert torch.equal(fresh(*unet_inputs(fresh)).sample, out)
    bad = tiny_unet(width=32)
    with pytest.raises(bitfuse.CheckpointError, match="architecture mismatch"):
        bitfuse.load_quantized(bad, path)


# ---- conv calibration statistics (collect(convs=True)) -----------------------------------------

@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=1, stride=2), dict(padding=2, dilation=2),
                                dict(kernel_size=(3, 5), padding=(1, 2)), dict(kernel_size=1, stride=2)])
def test_collect_conv_patch_statistics(kw):
    """A conv's statistics are over F.unfold's patches, in weight.reshape(O, -1)'s K order, for
    batched and unbatched inputs alike."""
    from bitfuse.calibrate import collect

    kw = dict(kw)
    k = kw.pop("kernel_size", 3)
    conv = _conv(5, 8, k, **kw)
    x = [torch.randn(2, 5, 9, 11), torch.randn(5, 7, 6)]
    st = collect(torch.nn.Sequential(conv), x, convs=True)["0"]
    cols = torch.cat([F.unfold(a.reshape(-1, *a.shape[-3:]), conv.kernel_size, dilation=conv.dilation,
                               padding=conv.padding, stride=conv.stride).transpose(1, 2).reshape(-1, st.in_features)
                      for a in x]).double()
    assert st.in_features == 5 * conv.kernel_size[0] * conv.kernel_size[1] and st.count == cols.shape[0]
    assert torch.allclose(st.xtx, cols.T @ cols, rtol=1e-5, atol=1e-4)
    assert torch.allclose(st.sq_sum, cols.square().sum(0), rtol=1e-6)
    # the patches really are what the conv multiplies: the conv output from them
    with torch.no_grad():
        out = conv(x[1]).reshape(8, -1).T
        y = cols[-out.shape[0]:].float() @ conv.weight.reshape(8, -1).T + conv.bias
    assert torch.allclose(y, out, atol=1e-5)
    # convs are recorded only when asked; unsupported convs (grouped) never
    assert collect(torch.nn.Sequential(conv), x) == {}
    grouped = torch.nn.Conv2d(4, 8, 3, groups=2)
    assert collect(torch.nn.Sequential(grouped), [torch.randn(1, 4, 6, 6)], convs=True) == {}


def test_collect_max_full_bytes_keeps_the_narrowest():
    from bitfuse.calibrate import collect
    from bitfuse.calibrate.collect import full_layers

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 32))
    x = [torch.randn(2, 8, 4, 4)]
    every = collect(model, x, convs=True)
    assert all(st.xtx is not None for st in every.values())
    # widths 72, 16, 256: 8·(16² + 72²) bytes hold the two narrow ones, not the linear
    some = collect(model, x, convs=True, max_full_bytes=8 * (16 ** 2 + 72 ** 2))
    assert {n for n, st in some.items() if st.xtx is not None} == {"0", "1"}
    assert torch.equal(some["3"].sq_sum, every["3"].sq_sum)
    assert full_layers({"a": 4, "b": 2}, 0) == set() and full_layers({"a": 4}, None) == {"a"}
    with pytest.raises(ValueError, match="max_full_bytes must be >= 0"):
        full_layers({"a": 4}, -1)


def test_conv_gptq_from_patch_statistics_lowers_output_error(caplog):
    """Activation-aware calibration of a conv: GPTQ on its patch statistics lowers the conv's
    output error against nearest rounding on correlated inputs; a conv whose statistics kept only
    the diagonal (max_full_bytes) is rounded to nearest, with a warning, not refused."""
    from bitfuse.calibrate import collect

    torch.manual_seed(3)
    conv = _conv(16, 32, 3, padding=1)
    base = torch.randn(4, 4, 12, 12)
    x = [base.repeat(1, 4, 1, 1) + 0.1 * torch.randn(4, 16, 12, 12)]  # correlated channels
    stats = collect(torch.nn.Sequential(conv), x, convs=True)
    cfg = QuantConfig(bits=3, group_size=32, convs=True)
    errs = {}
    for rounding in ("nearest", "gptq"):
        m = torch.nn.Sequential(_conv(16, 32, 3, padding=1))
        bitfuse.quantize_(m, cfg, calib_data=stats, calib_options={"rounding": rounding}, progress=False)
        with torch.no_grad():
            errs[rounding] = float((m(x[0]) - conv(x[0])).square().mean())
    assert errs["gptq"] < 0.8 * errs["nearest"], errs
    diag = collect(torch.nn.Sequential(conv), x, convs=True, max_full_bytes=0)
    m = torch.nn.Sequential(_conv(16, 32, 3, padding=1))
    with caplog.at_level(logging.WARNING, logger="bitfuse"):
        bitfuse.quantize_(m, cfg, calib_data=diag, calib_options={"rounding": "gptq"}, progress=False)
    assert "rounded to nearest: 0" in caplog.text
    with torch.no_grad():
        near = bitfuse.quantize_(torch.nn.Sequential(_conv(16, 32, 3, padding=1)), cfg, calib_data=diag, progress=False)
        assert torch.equal(m(x[0]), near(x[0]))


def test_quantconv_takes_unbatched_input_like_conv2d():
    conv = _conv(8, 16, 3, padding=1)
    q = QuantConv2d.from_conv(conv, QuantConfig(bits=4, group_size=32))
    x = torch.randn(8, 6, 5)
    with torch.no_grad():
        assert torch.allclose(q(x), q(x.unsqueeze(0)).squeeze(0))
        assert q(x).shape == conv(x).shape
    with pytest.raises(ValueError, match=r"expects \(B, 8, H, W\) or \(8, H, W\)"):
        q(torch.randn(4, 6, 5))
