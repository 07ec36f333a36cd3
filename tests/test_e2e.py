"""`bitfuse bench e2e` on the tiny model (CPU): it runs, reports honestly, and checks its input."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
from bitfuse.e2e import LAYER_TYPES, E2EError, LayerTimer, layer_type, run  # noqa: E402


def test_e2e_tiny_cli_writes_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "e2e", "--model", "tiny", "--steps", "2",
                        "--cuda-graphs", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CPU timings" in r.stdout and "PROJECTION" in r.stdout
    assert "--cuda-graphs ignored: not on CPU" in r.stdout
    assert "where the time goes" in r.stdout and "QuantConv2d" in r.stdout
    res = json.loads((tmp_path / "e2e_tiny_w4.json").read_text())
    for key in ("device", "versions", "backend", "recipe", "float_step_ms", "bitfuse_step_ms",
                "weight_bytes_fp16", "weight_bytes_bitfuse", "fidelity", "orin"):
        assert key in res, key
    assert res["cuda_gemv"] in ("tc", "simt")  # which CUDA GEMV a GPU run's M <= 8 layers used
    assert res["cuda_gemm_m16"] in ("skinny", "small")  # and which GEMM tile its M 9..16 layers used
    assert res["weight_reduction"] > 2.5  # W4 g64 on linears and convs (small layers stay fp16)
    assert res["fidelity"]["cosine"] > 0.9
    o = res["orin"]
    assert o["per_step_ms"]["Orin Nano"] > o["per_step_ms"]["AGX Orin 64GB"] > 0
    for dev in ("AGX Orin 64GB", "Orin Nano"):
        # the roofline sums per-layer maxima: at least each total bound, at most their sum
        assert max(o["memory_bound_ms"][dev], o["compute_bound_ms"][dev]) <= o["roofline_ms"][dev] * (1 + 1e-9)
        assert o["roofline_ms"][dev] <= (o["memory_bound_ms"][dev] + o["compute_bound_ms"][dev]) * (1 + 1e-9)
        # compute bound is exactly flops / peak
        assert o["compute_bound_ms"][dev] == pytest.approx(o["flops_per_step"] / (o["fp16_tflops"][dev] * 1e12) * 1e3)
    assert o["flops_per_step"] > 0 and "lower bound" in o["fp16_tflops_source"]
    assert res["cuda_graphs"]["status"].startswith("ignored: not on CPU")
    bd = res["breakdown"]
    assert "CPU: perf_counter" in bd["method"]
    for side in ("float", "bitfuse"):
        b = bd[side]
        assert set(b["per_type_ms"]) == set(LAYER_TYPES) and set(b["fraction"]) == set(LAYER_TYPES)
        assert sum(b["per_type_ms"].values()) == pytest.approx(b["step_ms"], rel=1e-6)
        assert all(v >= 0 for v in b["per_type_ms"].values())
    # the float UNet has no bitfuse layers; the quantized one runs its linears and convs through them
    assert bd["float"]["calls"]["QuantLinear"] == bd["float"]["calls"]["QuantConv2d"] == 0
    assert bd["bitfuse"]["calls"]["QuantLinear"] > 0 and bd["bitfuse"]["calls"]["QuantConv2d"] > 0
    assert bd["bitfuse"]["per_type_ms"]["QuantLinear"] > 0 and bd["bitfuse"]["per_type_ms"]["QuantConv2d"] > 0
    assert bd["float"]["calls"]["attention"] == bd["bitfuse"]["calls"]["attention"] > 0
    md = (tmp_path / "e2e_tiny_w4.md").read_text()
    assert "| per-step latency |" in md and "| QuantConv2d |" in md and "not a measurement" in md


def test_layer_timer_self_time_and_categories():
    """Nested hooked modules count once, as self time; unhooked glue goes to 'other'."""
    import time

    import torch

    from bitfuse import QuantConfig
    from bitfuse.nn import QuantConv2d, QuantLinear

    class Slow(torch.nn.Module):  # an "attention" wrapping a linear: its self time excludes the linear
        def __init__(self):
            super().__init__()
            self.proj = QuantLinear.from_linear(torch.nn.Linear(64, 64), QuantConfig(group_size=64))

        def forward(self, x):
            time.sleep(0.1)
            return self.proj(x)

    Slow.__name__ = "Attention"

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = QuantConv2d.from_conv(torch.nn.Conv2d(64, 64, 1), QuantConfig(group_size=64))
            self.norm = torch.nn.GroupNorm(8, 64)
            self.attn = Slow()

        def forward(self, x):
            x = self.norm(self.conv(x))
            time.sleep(0.15)  # glue
            return self.attn(x.flatten(2).transpose(1, 2))

    net = Net().eval()
    assert [layer_type(m) for m in (net.conv, net.norm, net.attn, net.attn.proj)] == \
        ["QuantConv2d", "norm", "attention", "QuantLinear"]
    x = torch.randn(1, 64, 4, 4)
    with torch.no_grad():
        net(x)  # warm-up: first calls build caches, which is not what this test times
        with LayerTimer(net, "cpu") as timer:
            t0 = time.perf_counter()
            net(x)
            total = time.perf_counter() - t0
    assert not net.attn._forward_pre_hooks and not net.conv._forward_hooks  # hooks removed
    r = timer.result(total)
    assert r["calls"] == {"QuantLinear": 1, "QuantConv2d": 1, "float Linear": 0, "float Conv2d": 0,
                          "attention": 1, "norm": 1}
    ms = r["per_type_ms"]
    # Sleeps of 100 ms in attention and 150 ms of glue: a sleep attributed to the wrong type would
    # move >= 100 ms; the margins leave room for a loaded machine (sleeps only overshoot).
    assert 95 <= ms["attention"] < 190 and ms["other"] >= 145
    assert ms["QuantLinear"] < 60 and ms["QuantConv2d"] > 0
    assert sum(ms.values()) == pytest.approx(1e3 * total)


def test_e2e_bad_input(tmp_path):
    with pytest.raises(E2EError, match="unknown model 'sd99'"):
        run(model="sd99")
    with pytest.raises(E2EError, match="unknown recipe"):
        run(recipe="w9")
    with pytest.raises(E2EError, match="not a diffusers model folder"):
        run(model="tiny", path=str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(E2EError, match="could not load"):
        run(model="tiny", path=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "e2e", "--model", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr


def _tiny_denoiser(model: str):
    """A tiny denoiser of the class `model` names (the e2e benchmark's other models are GPU-sized)."""
    import diffusers

    from bitfuse.integrations.diffusers import tiny_dit
    from bitfuse.integrations.pipelines import tiny_pixart_pipeline

    if model == "dit-xl-2":
        return tiny_dit()
    if model == "pixart-alpha":
        return tiny_pixart_pipeline().transformer
    if model == "sd15-unet":
        from bitfuse.integrations.diffusers import tiny_unet
        return tiny_unet()
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=16)


@pytest.mark.parametrize("model", ["sd15-unet", "dit-xl-2", "pixart-alpha", "sd3-medium"])
def test_e2e_every_model_from_a_local_folder(tmp_path, model):
    """Every model's conditioning, sampler, quantization and report, on a tiny folder of its class
    (what `--path` loads): the GPU run of the full-size configs goes through the same code."""
    _tiny_denoiser(model).save_pretrained(str(tmp_path / "den"))
    res = run(model=model, path=str(tmp_path / "den"), steps=2, out_dir=str(tmp_path))
    assert res["sampler"] == ("FlowMatchEulerDiscrete" if model == "sd3-medium" else "DDIM")
    assert res["kept_float"] == {"sd15-unet": ["conv_in", "conv_out"], "dit-xl-2": ["proj_out_1", "proj_out_2"]
                                 }.get(model, ["proj_out"])
    assert res["fidelity"]["cosine"] > 0.99, res["fidelity"]
    assert res["weight_reduction"] > 1.5 and res["orin"]["flops_per_step"] > 0
    assert res["breakdown"]["bitfuse"]["calls"]["QuantLinear"] > 0
    assert (tmp_path / f"e2e_{model}_w4.json").is_file()


def test_e2e_flow_loop_is_the_sd3_pipelines_own(tmp_path):
    """The benchmark's flow-matching loop gives the latents StableDiffusion3Pipeline gives for
    the same noise and conditioning (so its timings and fidelity are of the real sampler)."""
    import torch

    pytest.importorskip("transformers")
    from bitfuse.e2e import denoise, make_inputs
    from bitfuse.integrations.pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(str(tmp_path))
    den = pipe.transformer
    lat, cond = make_inputs(den, 1, torch.device("cpu"), torch.float32, 32)
    ours = denoise(den, lat, cond, 3, torch.device("cpu"))["latents"]
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                  latents=lat, num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                  output_type="latent").images
    assert not torch.equal(ours, lat)
    torch.testing.assert_close(ours, torch.as_tensor(theirs), rtol=0, atol=0)
