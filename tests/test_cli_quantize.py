"""`bitfuse quantize`: a checkpoint from a built-in config, and no half-written files."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig

pytest.importorskip("diffusers")
from bitfuse.integrations.diffusers import tiny_unet, unet_inputs  # noqa: E402


def test_quantize_cli_writes_a_loadable_checkpoint_and_report(tmp_path):
    ckpt, rep = tmp_path / "unet.safetensors", tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "quantize", "--model", "tiny", "--recipe", "w3res",
                        "--out", str(ckpt), "--report", str(rep)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    layers = json.loads(rep.read_text())["layers"]
    assert len(layers) > 40 and all(row["bpw"] > 3 for row in layers)
    meta = bitfuse.io.read_metadata(str(ckpt))
    some = next(iter(meta["layers"].values()))
    assert some["config"]["bits"] == 3 and some["target"] in ("cpu", "orin", "rtx30", "rtx40", "h100")
    assert some["bpw"] > 3
    unet = bitfuse.load_quantized(tiny_unet(seed=7), str(ckpt))
    with torch.no_grad():
        assert torch.isfinite(unet(*unet_inputs(unet)).sample).all()
    assert sorted(os.listdir(tmp_path)) == ["report.json", "unet.safetensors"]  # no temp files left


def test_quantize_cli_compact_scales(tmp_path):
    from bitfuse.cli import main
    ckpts = {}
    for flag in ([], ["--compact-scales"]):
        ckpts[bool(flag)] = tmp_path / f"unet{len(flag)}.safetensors"
        assert main(["quantize", "--model", "tiny", "--recipe", "w4", "--out", str(ckpts[bool(flag)])] + flag) == 0
    meta = {c: bitfuse.io.read_metadata(str(p))["layers"] for c, p in ckpts.items()}
    compact = [n for n, m in meta[True].items() if "scale_codes" in m["tensors"]]
    assert compact and all(meta[True][n]["config"]["compact_scales"] for n in meta[True])
    assert not any("scale_codes" in m["tensors"] for m in meta[False].values())
    # a compact layer stores fewer bits than the same layer with fp16 pairs (same group size)
    for n in compact:
        if meta[True][n]["group_size"] == meta[False][n]["group_size"]:
            assert meta[True][n]["bpw"] < meta[False][n]["bpw"]
    unet = bitfuse.load_quantized(tiny_unet(seed=7), str(ckpts[True]))
    with torch.no_grad():
        assert torch.isfinite(unet(*unet_inputs(unet)).sample).all()


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = bitfuse.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), QuantConfig(group_size=32))
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"an older checkpoint")

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bitfuse.save_quantized(model, str(path))
    assert path.read_bytes() == b"an older checkpoint"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_quantize_cli_bad_recipe():
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "quantize", "--recipe", "w9", "--out", "/tmp/x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown recipe 'w9'" in r.stderr


def test_quantize_cli_activation_aware_gptq(tmp_path):
    """--calib N collects XᵀX of the linears over random inputs at several timesteps, and
    --rounding gptq uses it: the codes differ from the data-free checkpoint's and the model still
    runs; --rounding gptq without --calib is refused."""
    from bitfuse.cli import main

    free, aware = tmp_path / "free.safetensors", tmp_path / "aware.safetensors"
    assert main(["quantize", "--model", "tiny", "--recipe", "w4-linear", "--out", str(free)]) == 0
    assert main(["quantize", "--model", "tiny", "--recipe", "w4-linear", "--calib", "2", "--calib-steps", "2",
                 "--rounding", "gptq", "--out", str(aware)]) == 0
    a = bitfuse.load_quantized(tiny_unet(seed=7), str(aware))
    f = bitfuse.load_quantized(tiny_unet(seed=7), str(free))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    qa, qf = a.get_submodule(name).packed, f.get_submodule(name).packed
    assert not torch.equal(qa.qweight, qf.qweight)
    # --gptq-order natural reaches calibrate(): the act-order default rounds differently
    natural = tmp_path / "natural.safetensors"
    assert main(["quantize", "--model", "tiny", "--recipe", "w4-linear", "--calib", "2", "--calib-steps", "2",
                 "--rounding", "gptq", "--gptq-order", "natural", "--out", str(natural)]) == 0
    qn = bitfuse.load_quantized(tiny_unet(seed=7), str(natural)).get_submodule(name).packed
    assert not torch.equal(qa.qweight, qn.qweight)
    with torch.no_grad():
        assert torch.isfinite(a(*unet_inputs(a)).sample).all()
    with pytest.raises(SystemExit, match="needs activations: add --calib"):
        main(["quantize", "--model", "tiny", "--rounding", "gptq", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--calib must be >= 0 and --calib-steps >= 1, got -1 and 4"):
        main(["quantize", "--model", "tiny", "--calib", "-1", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="got 2 and 0"):
        main(["quantize", "--model", "tiny", "--calib", "2", "--calib-steps", "0", "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_quantize_cli_convs_with_statistics_in_passes(tmp_path, caplog):
    """A recipe with convs collects their patch statistics too; --calib-memory small enough to
    need several passes still gives every layer GPTQ (no layer rounded to nearest for want of
    XᵀX), and a negative --calib-memory is refused."""
    from bitfuse.cli import main
    from bitfuse.nn import QuantConv2d

    out = tmp_path / "convs.safetensors"
    with caplog.at_level("INFO", logger="bitfuse"):
        # 0.05 GiB = 51 MiB: the widest tiny-UNet layer (a conv, K = 256·9, 40.5 MiB of XᵀX)
        # fits alone, all of them (207 MiB) do not
        assert main(["quantize", "--model", "tiny", "--recipe", "w4g128", "--calib", "1", "--calib-steps", "1",
                     "--rounding", "gptq", "--calib-memory", "0.05", "--out", str(out)]) == 0
    assert "calibration passes" in caplog.text and "rounded to nearest" not in caplog.text
    unet = bitfuse.load_quantized(tiny_unet(seed=7), str(out))
    assert any(isinstance(m, QuantConv2d) for m in unet.modules())
    with torch.no_grad():
        assert torch.isfinite(unet(*unet_inputs(unet)).sample).all()
    roomy = tmp_path / "roomy.safetensors"
    assert main(["quantize", "--model", "tiny", "--recipe", "w4g128", "--calib", "1", "--calib-steps", "1",
                 "--rounding", "gptq", "--out", str(roomy)]) == 0
    r = bitfuse.load_quantized(tiny_unet(seed=7), str(roomy))
    conv = "down_blocks.0.resnets.0.conv1"
    # the first conv sees the float model in both runs: the same statistics, the same GPTQ codes
    assert torch.equal(unet.get_submodule(conv).packed.qweight, r.get_submodule(conv).packed.qweight)
    with pytest.raises(SystemExit, match="--calib-memory must be a number of GiB >= 0"):
        main(["quantize", "--model", "tiny", "--calib", "1", "--calib-memory", "-1", "--out", str(tmp_path / "x.safetensors")])


def test_quantize_cli_layerwise_allocation(tmp_path, capsys):
    """--avg-bpw B chooses W2 g64 / W3 g128 / W4 g128 per linear layer under the budget (by
    output sensitivity, fitted on half the --calib inputs and scored on the other half at other
    timesteps); the checkpoint holds several widths and loads."""
    from bitfuse.cli import main

    out = tmp_path / "alloc.safetensors"
    # the default recipe (w4) takes the convs too: the allocation covers them, with their patch
    # statistics (collect(convs=True)) and GPTQ
    assert main(["quantize", "--model", "tiny", "--calib", "2", "--calib-steps", "2",
                 "--rounding", "gptq", "--avg-bpw", "3.2", "--out", str(out)]) == 0
    unet = bitfuse.load_quantized(tiny_unet(seed=7), str(out))
    from bitfuse.nn import QuantConv2d

    convs = [m.packed for m in unet.modules() if isinstance(m, QuantConv2d)]
    linears = [m.packed for m in unet.modules()
               if isinstance(m, bitfuse.QuantLinear) and not isinstance(m, QuantConv2d)]
    packed = convs + linears
    assert len({p.class_bits[0] for p in packed}) >= 2
    assert min(p.class_bits[0] for p in convs) < 4  # the convs were allocated, not left at the recipe's W4
    numel = sum(p.out_features * p.in_features for p in packed)
    assert sum(p.bpw * p.out_features * p.in_features for p in packed) / numel <= 3.2
    with torch.no_grad():
        assert torch.isfinite(unet(*unet_inputs(unet)).sample).all()
    for calib in ("0", "1"):
        with pytest.raises(SystemExit, match="--avg-bpw scores layers .* add --calib N with N >= 2"):
            main(["quantize", "--model", "tiny", "--calib", calib, "--avg-bpw", "3",
                  "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--candidates are the choices of --avg-bpw"):
        main(["quantize", "--model", "tiny", "--candidates", "w2g64", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--avg-bpw must be a positive number"):
        main(["quantize", "--model", "tiny", "--calib", "2", "--avg-bpw", "-1", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--candidates takes .* got 'w5g64'"):
        main(["quantize", "--model", "tiny", "--calib", "2", "--avg-bpw", "3", "--candidates", "w2g64,w5g64",
              "--out", str(tmp_path / "x.safetensors")])
    assert main(["quantize", "--model", "tiny", "--recipe", "w4-linear", "--calib", "2", "--calib-steps", "1",
                 "--avg-bpw", "2.0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "reachable minimum" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_quantize_cli_transformer_from_a_local_folder(tmp_path):
    """A transformer denoiser (SD3: joint attention) from --path, with statistics and a per-layer
    allocation: the checkpoint loads into a fresh model of that folder's config and runs."""
    import diffusers

    from bitfuse.cli import main
    from bitfuse.e2e import make_inputs

    kw = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=64,
              pooled_projection_dim=64, pos_embed_max_size=16)
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(**kw).save_pretrained(str(tmp_path / "transformer"))
    ckpt = tmp_path / "sd3.safetensors"
    assert main(["quantize", "--model", "sd3-medium", "--path", str(tmp_path / "transformer"), "--calib", "4",
                 "--calib-steps", "2", "--rounding", "gptq", "--avg-bpw", "3.3", "--out", str(ckpt)]) == 0
    layers = bitfuse.io.read_metadata(str(ckpt))["layers"]
    assert len({m["config"]["bits"] for m in layers.values()}) > 1  # the allocation mixes widths
    assert "proj_out" not in layers and "context_embedder" in layers  # the output layer stays float
    everything = tmp_path / "all.safetensors"
    assert main(["quantize", "--model", "sd3-medium", "--path", str(tmp_path / "transformer"),
                 "--keep-float", "none", "--out", str(everything)]) == 0
    assert "proj_out" in bitfuse.io.read_metadata(str(everything))["layers"]
    with pytest.raises(SystemExit, match=r"--keep-float names \['proj_outt'\], which are not linear or conv"):
        main(["quantize", "--model", "sd3-medium", "--path", str(tmp_path / "transformer"),
              "--keep-float", "proj_out,proj_outt", "--out", str(tmp_path / "x.safetensors")])
    torch.manual_seed(1)
    model = bitfuse.load_quantized(diffusers.SD3Transformer2DModel(**kw).eval(), str(ckpt))
    lat, cond = make_inputs(model, 1, torch.device("cpu"), torch.float32, None)
    with torch.no_grad():
        assert torch.isfinite(model(hidden_states=lat, timestep=torch.tensor([500.0]), **cond).sample).all()
