"""LoRA on quantized diffusers models: bitfuse.load_lora on a tiny UNet (diffusers / PEFT and
kohya key formats) and the pipeline router (bitfuse.integrations.diffusers.load_lora). Apart from
tests/test_lora.py so that its GPU tests run on an image without diffusers."""

import copy
import re

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear
from bitfuse.nn import QuantConv2d
from _tolerance import UNIT_ROUNDOFF, gamma
from test_lora import delta

# ---- load_lora on a tiny diffusers UNet -------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
from bitfuse.integrations.diffusers import tiny_unet, unet_inputs  # noqa: E402

# (fqn, kind) of the targets: linears (incl. a cross-attention one with K=128), 1×1 and 3×3 convs
TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
]


@pytest.fixture(scope="module")
def qunet():
    unet = tiny_unet()
    # The targets and their neighbours (the first down block) are quantized; the rest stays float,
    # which keeps the copies and forwards below cheap. conv_out (4 outputs) is never quantized.
    bitfuse.quantize_(unet, QuantConfig(bits=4, group_size=32, convs=True), progress=False,
                      calib_options={"method": "rtn"},
                      filter_fn=lambda m, fqn: fqn in TARGETS or fqn.startswith("down_blocks.0."))
    return unet


def lora_tensors(unet, rank=4, seed=0, targets=TARGETS):
    """fqn -> (down, up) with the shapes a LoRA trainer writes (conv: (r, C, kh, kw), (O, r, 1, 1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for fqn in targets:
        m = unet.get_submodule(fqn)
        if isinstance(m, QuantConv2d):
            d = 0.05 * torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            u = 0.05 * torch.randn(m.out_channels, rank, 1, 1, generator=g)
        else:
            d = 0.05 * torch.randn(rank, m.in_features, generator=g)
            u = 0.05 * torch.randn(m.out_features, rank, generator=g)
        out[fqn] = (d, u)
    return out


def peft_keys(t, prefix="unet."):
    sd = {}
    for fqn, (d, u) in t.items():
        sd[f"{prefix}{fqn}.lora_A.weight"], sd[f"{prefix}{fqn}.lora_B.weight"] = d, u
    return sd


def legacy_keys(t):
    sd = {}
    for fqn, (d, u) in t.items():
        attn, _, proj = fqn.rpartition(".")
        if proj in ("to_q", "to_k", "to_v"):  # attention-processor style for attention projections
            sd[f"{attn}.processor.{proj}_lora.down.weight"], sd[f"{attn}.processor.{proj}_lora.up.weight"] = d, u
        else:
            sd[f"{fqn}.lora.down.weight"], sd[f"{fqn}.lora.up.weight"] = d, u
    return sd


def kohya_keys(t, alpha, dotted=False):
    sd = {}
    for fqn, (d, u) in t.items():
        k = fqn if dotted else "lora_unet_" + fqn.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = d, u
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def check_applied(before, after, t, alpha, scale, rank=4, others_untouched=True):
    """Each target's dequantized weight moved by exactly scale·alpha/r·up16@down16 (fp32 bound);
    alpha: one value or {fqn: alpha}. Every other quantized layer holds no adapter."""
    for fqn, m in after.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if fqn not in t:
            assert not (others_untouched and m.loras), fqn
            continue
        a = alpha.get(fqn) if isinstance(alpha, dict) else alpha
        w0, w1 = before.get_submodule(fqn).dequantize().double(), m.dequantize().double()
        d, u = t[fqn]
        dw = delta([(d, u, a, scale)], w0.shape)
        strength = abs(scale * (rank if a is None else a) / rank)
        mag = strength * (u.reshape(u.shape[0], -1).half().double().abs() @ d.reshape(rank, -1).half().double().abs())
        bound = 2 * gamma(rank + 2) * mag + 2 * UNIT_ROUNDOFF[torch.float32] * (w0 + dw).abs() + 1e-30
        err = (w1 - w0 - dw).abs()
        assert float((err / bound).max()) <= 1, fqn


@pytest.mark.parametrize("fmt", ["peft", "legacy", "kohya", "kohya-dotted"])
def test_load_lora_key_formats(qunet, fmt):
    unet = copy.deepcopy(qunet)
    t = lora_tensors(unet, seed=1)
    sd, alpha = {"peft": (peft_keys(t), None), "legacy": (legacy_keys(t), None),
                 "kohya": (kohya_keys(t, 2.0), 2.0), "kohya-dotted": (kohya_keys(t, 0.5, dotted=True), 0.5)}[fmt]
    report = bitfuse.load_lora(unet, sd, "style", scale=0.7)
    assert sorted(report.applied) == sorted(TARGETS) and not report.skipped
    check_applied(qunet, unet, t, alpha, 0.7)
    infos = bitfuse.list_loras(unet)["style"]
    assert set(infos) == set(TARGETS)
    assert all(i.rank == 4 and i.alpha == (alpha or 4.0) and i.scale == 0.7 for i in infos.values())


def test_load_lora_alpha_argument_and_per_key_alpha(qunet, tmp_path):
    unet = copy.deepcopy(qunet)
    t = lora_tensors(unet, seed=2)
    sd = peft_keys(t, prefix="")
    sd[f"{TARGETS[0]}.alpha"] = torch.tensor(8.0)  # one module with its own alpha
    path = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    bitfuse.load_lora(unet, str(path), "a")
    assert unet.get_submodule(TARGETS[0]).loras["a"].alpha == 8.0
    assert unet.get_submodule(TARGETS[1]).loras["a"].alpha == 4.0
    bitfuse.load_lora(unet, sd, "b", alpha=1.0, scale=2.0)  # the argument wins over the keys
    assert {i.alpha for i in bitfuse.list_loras(unet)["b"].values()} == {1.0}


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_level_scale_swap_and_remove(qunet):
    unet = copy.deepcopy(qunet)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        y0 = unet(*inputs).sample
    t1, t2 = lora_tensors(unet, seed=3), lora_tensors(unet, seed=4, targets=TARGETS[:2])
    bitfuse.load_lora(unet, peft_keys(t1), "one")
    bitfuse.load_lora(unet, kohya_keys(t2, 4.0), "two", scale=0.5)
    assert list(bitfuse.list_loras(unet)) == ["one", "two"]
    ptrs = [m.lr_scale.data_ptr() for _, m in unet.named_modules() if isinstance(m, QuantLinear) and m.loras]
    assert sorted(bitfuse.set_lora_scale(unet, "one", 0.25)) == sorted(TARGETS)
    assert ptrs == [m.lr_scale.data_ptr() for _, m in unet.named_modules() if isinstance(m, QuantLinear) and m.loras]
    # the same as loading at that scale in the first place, buffer for buffer
    direct = copy.deepcopy(qunet)
    bitfuse.load_lora(direct, peft_keys(t1), "one", scale=0.25)
    bitfuse.load_lora(direct, kohya_keys(t2, 4.0), "two", scale=0.5)
    assert _same_state(unet, direct) and bitfuse.list_loras(unet) == bitfuse.list_loras(direct)
    with pytest.raises(ValueError, match="non-finite"):
        bitfuse.set_lora_scale(unet, "one", float("inf"))
    assert _same_state(unet, direct), "a refused scale must change no layer"
    bitfuse.remove_lora(unet, "one")
    assert list(bitfuse.list_loras(unet)) == ["two"]
    bitfuse.remove_lora(unet, "two")
    assert _same_state(unet, qunet) and not bitfuse.list_loras(unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, y0)
    with pytest.raises(KeyError, match="no quantized layer of the model has a LoRA adapter 'two'"):
        bitfuse.set_lora_scale(unet, "two", 1.0)


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


ALL = set(TARGETS)
# case: (edit of a valid PEFT dict, error text, the targets strict=False still applies)
BAD = {
    "unknown key": (lambda sd, t: sd.update({"unet.no_such.block.lora_A.weight": torch.zeros(4, 64),
                                             "unet.no_such.block.lora_B.weight": torch.zeros(64, 4)}),
                    "no_such.block' matches no module", ALL),
    "unquantized target": (lambda sd, t: sd.update({"conv_out.lora_A.weight": torch.zeros(4, 64, 3, 3),
                                                    "conv_out.lora_B.weight": torch.zeros(4, 4, 1, 1)}),
                           "'conv_out' is a Conv2d, not a QuantLinear/QuantConv2d", ALL),
    "shape mismatch": (lambda sd, t: sd.update({f"unet.{TARGETS[1]}.lora_A.weight": torch.zeros(4, 64)}),
                       r"shape mismatch: down (4, 64)", ALL - {TARGETS[1]}),
    "missing half": (lambda sd, t: sd.pop(f"unet.{TARGETS[2]}.lora_B.weight"), "has no up", ALL - {TARGETS[2]}),
    "nan": (lambda sd, t: sd.update({f"unet.{TARGETS[3]}.lora_B.weight": _nan(t[TARGETS[3]][1])}),
            "'up' holds NaN or Inf", ALL - {TARGETS[3]}),
    "unsupported": (lambda sd, t: sd.update({f"unet.{TARGETS[0]}.lora_magnitude_vector": torch.ones(64)}),
                    "DoRA is not supported", ALL),
}


@pytest.mark.parametrize("case", list(BAD))
def test_strict_errors_leave_the_model_untouched(qunet, case):
    unet = copy.deepcopy(qunet)
    t = lora_tensors(unet, seed=5)
    sd = peft_keys(t)
    edit, text, still = BAD[case]
    edit(sd, t)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(text)) as e:
        bitfuse.load_lora(unet, sd, "x")
    assert "nothing was applied" in str(e.value)
    assert not bitfuse.list_loras(unet)
    now = unet.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    # strict=False applies the rest and says what it left out, and why
    report = bitfuse.load_lora(unet, sd, "x", strict=False)
    assert set(report.applied) == still
    assert any(text in why for _, why in report.skipped), report.skipped
    assert set(bitfuse.list_loras(unet)["x"]) == still
    check_applied(qunet, unet, {f: t[f] for f in still}, None, 1.0)


def test_strict_error_lists_problems_and_duplicate_name(qunet):
    unet = copy.deepcopy(qunet)
    t = lora_tensors(unet, seed=6)
    bitfuse.load_lora(unet, peft_keys(t), "x")
    with pytest.raises(ValueError, match=r"10 problem\(s\)[\s\S]*already has an adapter named 'x'"):
        bitfuse.load_lora(unet, peft_keys(t), "x")
    sd = {f"unet.missing_{i}.lora_A.weight": torch.zeros(1, 1) for i in range(14)}
    with pytest.raises(ValueError, match=r"14 problem\(s\)[\s\S]*and 4 more"):
        bitfuse.load_lora(unet, sd, "y")


# ---- the diffusers pipeline router ----------------------------------------------------------


def test_pipeline_load_lora_routes_components(tmp_path):
    pytest.importorskip("transformers")
    from bitfuse.integrations import diffusers as bd

    pipe = bd.tiny_sd_pipeline(str(tmp_path))
    bitfuse.quantize_(pipe.unet, QuantConfig(bits=4, group_size=32), progress=False, calib_options={"method": "rtn"})
    # a component left in float (the text encoder, usually): its keys get one clear reason
    te_key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    only_te = {f"{te_key}.lora_A.weight": torch.zeros(2, 32), f"{te_key}.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(ValueError, match=r"component 'text_encoder' is not quantized .* pass components=\[\] "):
        bd.load_lora(pipe, only_te, "te")
    report = bd.load_lora(pipe, only_te, "te", strict=False)
    assert not report.applied and len(report.skipped) == 2 and not bd.list_loras(pipe)
    for comp in (pipe.text_encoder,):
        bitfuse.quantize_(comp, QuantConfig(bits=4, group_size=32), progress=False, calib_options={"method": "rtn"})
    ref_unet, ref_te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet_t = lora_tensors(pipe.unet, seed=7, targets=TARGETS[:3])
    # SD LoRA files name CLIP's modules "text_model.encoder…" (transformers 4); transformers 5's
    # CLIPTextModel has no text_model level, and the loader must find them either way.
    inner = "text_model." if hasattr(pipe.text_encoder, "text_model") else ""
    te_q, te_fc = (f"{inner}encoder.layers.0.self_attn.q_proj", f"{inner}encoder.layers.1.mlp.fc1")
    te_t = lora_tensors(pipe.text_encoder, seed=8, targets=[te_q, te_fc])
    sd = peft_keys(unet_t, prefix="unet.")
    sd[f"text_encoder.text_model.{te_q[len(inner):]}.lora_A.weight"] = te_t[te_q][0]
    sd[f"text_encoder.text_model.{te_q[len(inner):]}.lora_B.weight"] = te_t[te_q][1]
    k = "lora_te_text_model_" + te_fc[len(inner):].replace(".", "_")  # kohya's text-encoder naming
    sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = te_t[te_fc]
    sd[f"{k}.alpha"] = torch.tensor(2.0)

    bad = dict(sd)
    bad[f"text_encoder.text_model.{te_q[len(inner):]}.lora_B.weight"] = _nan(te_t[te_q][1])
    with pytest.raises(ValueError, match=re.escape(f"text_encoder.{te_q}: 'up' holds NaN")):
        bd.load_lora(pipe, bad, "p")
    assert not bd.list_loras(pipe), "a problem in one component must leave every component untouched"

    report = bd.load_lora(pipe, sd, "p", scale=0.5)
    assert sorted(report.applied) == sorted([f"unet.{f}" for f in unet_t]
                                            + [f"text_encoder.{te_q}", f"text_encoder.{te_fc}"])
    assert not report.skipped
    check_applied(ref_unet, pipe.unet, unet_t, None, 0.5)
    check_applied(ref_te, pipe.text_encoder, te_t, {te_q: None, te_fc: 2.0}, 0.5)
    assert set(bd.list_loras(pipe)) == {"unet", "text_encoder"}
    assert len(bd.set_lora_scale(pipe, "p", 1.0)) == 5
    assert len(bd.remove_lora(pipe, "p")) == 5 and not bd.list_loras(pipe)
    assert _same_state(pipe.unet, ref_unet) and _same_state(pipe.text_encoder, ref_te)

    # two keys naming one module ("unet.x" and the unprefixed "x") are a problem, not an overwrite
    first = next(k for k in sd if k.startswith("unet."))
    dup = dict(sd)
    dup[first[len("unet."):]] = sd[first] * 100
    with pytest.raises(ValueError, match=re.escape(f"names the same 'unet' key '{first[len('unet.'):]}' as {first}")):
        bd.load_lora(pipe, dup, "d")
    assert not bd.list_loras(pipe)

    # components= limits the targets; the other component's keys are reported, not errors
    report = bd.load_lora(pipe, sd, "u", components=["unet"])
    assert sorted(report.applied) == sorted(f"unet.{f}" for f in unet_t)
    assert {k for k, _ in report.skipped} == {k for k in sd if not k.startswith("unet.")}
    assert set(bd.list_loras(pipe)) == {"unet"}
