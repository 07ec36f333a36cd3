"""quantize_pipeline on tiny diffusers pipelines assembled from configs, run end to end on CPU."""

import numpy as np
import pytest
import torch

import bitfuse
from bitfuse import QuantConfig

pytest.importorskip("diffusers")
from bitfuse.cli import fidelity  # noqa: E402
from bitfuse.integrations.pipelines import (  # noqa: E402
    load_pipeline, quantize_pipeline, save_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline,
    tiny_sd_pipeline,
)


def _run(pipe):
    out = pipe(class_labels=[1], num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    return torch.as_tensor(np.asarray(out))


def test_dit_pipeline_quantized_end_to_end(tmp_path):
    pipe = tiny_dit_pipeline()
    ref = _run(pipe)
    assert quantize_pipeline(pipe, QuantConfig(bits=4, group_size=64)) is pipe
    assert any(isinstance(m, bitfuse.QuantLinear) for m in pipe.transformer.modules())
    out = _run(pipe)
    fid = fidelity(ref, out)
    # Measured on this pipeline: 23.2 dB, cosine 0.9916 for W4 g64 (4 DDIM steps, random
    # weights; the adaLN modulation layers amplify weight error). A broken layer gives < 10 dB.
    assert fid["psnr_db"] > 20 and fid["cosine"] > 0.98, fid
    written = save_pipeline(pipe, str(tmp_path))
    assert set(written) == {"transformer"}
    fresh = tiny_dit_pipeline()  # same VAE (as from the same local folder) ...
    with torch.no_grad():
        for p in fresh.transformer.parameters():  # ... but the denoiser must come from the file
            p.normal_()
    load_pipeline(fresh, str(tmp_path))
    assert torch.equal(_run(fresh), out)


def test_pipeline_component_errors():
    pipe = tiny_dit_pipeline()
    with pytest.raises(ValueError, match=r"no component\(s\) \['unet'\]"):
        quantize_pipeline(pipe, QuantConfig(group_size=64), components=["unet"])
    with pytest.raises(ValueError, match="not being quantized"):
        quantize_pipeline(pipe, QuantConfig(group_size=64), calib={"vae": {}})
    with pytest.raises(FileNotFoundError, match="no bitfuse checkpoint for component 'transformer'"):
        load_pipeline(pipe, "/nonexistent")
    with pytest.raises(ValueError, match="layer_configs names components that are not being quantized"):
        quantize_pipeline(pipe, QuantConfig(group_size=64), layer_configs={"vae": {}})
    # calib_options reach calibrate(): GPTQ without statistics is refused
    with pytest.raises(ValueError, match="rounding='gptq' needs calibration activations"):
        quantize_pipeline(pipe, QuantConfig(group_size=64), calib_options={"rounding": "gptq"})


def test_pipeline_layerwise_allocation_end_to_end():
    """Statistics and sensitivity from the pipeline's own calls, a per-layer choice under a
    budget, quantize_pipeline(layer_configs=...), and the pipeline still runs close to float."""
    from bitfuse.calibrate import allocate_bits
    from bitfuse.integrations import diffusers as bd

    pipe = tiny_dit_pipeline()
    ref = _run(pipe)
    calls = [dict(class_labels=[1], output_type="latent", generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    fit = bd.collect(pipe, calls[:1], steps=2)["transformer"]
    held = bd.collect(pipe, calls[1:], steps=2)["transformer"]
    sens = bd.sensitivity(pipe, calls[:1], steps=2, probes=2)["transformer"]
    cands = [QuantConfig(bits=2, group_size=32), QuantConfig(bits=4, group_size=32)]
    configs = allocate_bits(pipe.transformer, cands, 3.2, calib_data=fit, holdout=held, sensitivity=sens)
    assert {c.bits for c in configs.values()} == {2, 4}
    quantize_pipeline(pipe, QuantConfig(bits=4, group_size=32), layer_configs={"transformer": configs},
                      calib={"transformer": fit})
    widths = {n: m.packed.class_bits[0] for n, m in pipe.transformer.named_modules()
              if isinstance(m, bitfuse.QuantLinear)}
    assert all(widths[n] == c.bits for n, c in configs.items())
    fid = fidelity(ref, _run(pipe))
    cheap = tiny_dit_pipeline()
    quantize_pipeline(cheap, cands[0])
    # measured: 22.1 dB for the allocation at 3.2 bpw, 17.1 dB for all W2 g32 (3.0 bpw)
    assert fid["psnr_db"] > 20 and fid["psnr_db"] > fidelity(ref, _run(cheap))["psnr_db"] + 3, fid


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()


def test_sd_pipeline_quantized_end_to_end(tmp_path):
    pytest.importorskip("transformers")

    def run(p):
        out = p("a cat", num_inference_steps=4, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images
        return torch.as_tensor(np.asarray(out))

    pipe = tiny_sd_pipeline(str(tmp_path))
    ref = run(pipe)
    quantize_pipeline(pipe, QuantConfig(bits=4, group_size=32), components=("unet", "text_encoder"))
    out = run(pipe)
    fid = fidelity(ref, out)
    # Measured: 44.0 dB, cosine 0.99971 (W4 g32 on the UNet's and the CLIP encoder's linears).
    assert fid["psnr_db"] > 38 and fid["cosine"] > 0.98, fid
    save_pipeline(pipe, str(tmp_path / "ckpt"), components=("unet", "text_encoder"))
    fresh = tiny_sd_pipeline(str(tmp_path))
    _randomise(fresh.unet)
    _randomise(fresh.text_encoder)
    load_pipeline(fresh, str(tmp_path / "ckpt"), components=("unet", "text_encoder"))
    assert torch.equal(run(fresh), out)


def test_pixart_pipeline_quantized_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    emb = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 8)

    def run(p):
        out = p(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                negative_prompt_embeds=torch.zeros_like(emb), negative_prompt_attention_mask=mask,
                num_inference_steps=4, height=64, width=64, output_type="latent",
                use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images
        return torch.as_tensor(np.asarray(out))

    pipe = tiny_pixart_pipeline()
    ref = run(pipe)
    quantize_pipeline(pipe, QuantConfig(bits=4, group_size=32))
    assert any(isinstance(m, bitfuse.QuantLinear) for m in pipe.transformer.modules())
    out = run(pipe)
    fid = fidelity(ref, out)
    # Measured: 17.1 dB, cosine 0.983 (W4 g32 on the transformer's linears).
    assert fid["psnr_db"] > 14 and fid["cosine"] > 0.97, fid
    save_pipeline(pipe, str(tmp_path))
    fresh = tiny_pixart_pipeline()
    _randomise(fresh.transformer)
    load_pipeline(fresh, str(tmp_path))
    assert torch.equal(run(fresh), out)
