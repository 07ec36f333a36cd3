"""End-to-end denoiser benchmark (`bitfuse bench e2e`): fp16 vs bitfuse over a real DDIM loop.

Builds a denoiser from its published config (random weights; nothing is downloaded) or loads a
local diffusers folder, quantizes a copy with a named recipe, runs both through the same DDIM
steps from the same noise, and reports per-step latency, peak memory, weight bytes, and the
fidelity of the final latents. Every result records the device, versions, backend and recipe.
On a CPU the timings are CPU timings of the torch reference path, and say so.

The Orin projection counts the bytes each quantized layer's kernel must move (packed weight +
activations in and out) and divides by the Jetson's DRAM bandwidth: a memory-bound LOWER BOUND
on the time of those layers, always labelled a projection, never a measurement.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from typing import Dict, Optional

import torch

from . import QuantConfig, quantize_
from .dispatch import select_backend
from .version import __version__

# Named recipes; convs too, since a UNet's resnet convs hold most of its weights.
RECIPES: Dict[str, dict] = {
    "w4": dict(bits=4, group_size=64, convs=True),
    "w4g128": dict(bits=4, group_size=128, convs=True),
    "w3res": dict(bits=3, group_size=64, residual=True, convs=True),
    "w3mix": dict(bits=3, group_size=64, mixed_bits=(2, 3, 4), residual=0.5, convs=True),
    "w4-linear": dict(bits=4, group_size=64),
}
ORIN = {"AGX Orin 64GB": 204.8, "Orin Nano": 68.0}  # GB/s, vendor figures (shared/hardware.md)

# Published configs (diffusers' config.json of each model), trimmed to the fields that differ
# from the class defaults. Random weights: only shapes matter for speed and bytes.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                num_layers=28, sample_size=64, patch_size=2, num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero")
PIXART_ALPHA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                    num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=64,
                    patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False)
MODELS = ("tiny", "sd15-unet", "dit-xl-2", "pixart-alpha")


class E2EError(ValueError):
    """A model name, folder or recipe that the e2e benchmark cannot use."""


def build_denoiser(model: str, path: Optional[str] = None):
    import diffusers

    from .integrations.diffusers import tiny_unet

    if model not in MODELS:
        raise E2EError(f"unknown model {model!r}; choose one of {MODELS}")
    cls = {"tiny": diffusers.UNet2DConditionModel, "sd15-unet": diffusers.UNet2DConditionModel,
           "dit-xl-2": diffusers.DiTTransformer2DModel,
           "pixart-alpha": diffusers.PixArtTransformer2DModel}[model]
    if path is not None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise E2EError(f"{path!r} is not a diffusers model folder (no config.json); give the "
                           "denoiser's folder, e.g. <pipeline>/unet")
        try:
            return cls.from_pretrained(path, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001 - diffusers raises many types here
            raise E2EError(f"could not load {cls.__name__} from {path!r}: {e}") from e
    if model == "tiny":
        return tiny_unet()
    torch.manual_seed(0)
    cfg = {"sd15-unet": SD15_UNET, "dit-xl-2": DIT_XL_2, "pixart-alpha": PIXART_ALPHA}[model]
    return cls(**cfg).eval()


def make_inputs(den, batch: int, device, dtype, resolution: Optional[int]):
    """(latents, conditioning kwargs) for one denoiser call."""
    c = den.config
    g = torch.Generator().manual_seed(0)
    size = (resolution // 8) if resolution else c.sample_size
    lat = torch.randn(batch, c.in_channels, size, size, generator=g).to(device, dtype)
    name = type(den).__name__
    if name == "UNet2DConditionModel":
        ctx = torch.randn(batch, 77, c.cross_attention_dim, generator=g).to(device, dtype)
        return lat, dict(encoder_hidden_states=ctx)
    if name == "DiTTransformer2DModel":
        return lat, dict(class_labels=torch.zeros(batch, dtype=torch.long, device=device))
    ctx = torch.randn(batch, 120, c.caption_channels, generator=g).to(device, dtype)
    return lat, dict(encoder_hidden_states=ctx, added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def denoise(den, latents, cond, steps: int, device) -> Dict[str, object]:
    """A DDIM loop; returns the final latents and the per-step times (seconds)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler()
    sched.set_timesteps(steps)
    x = latents.clone()
    times = []
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            out = call(den, x, tt, cond)
            eps = out[:, : x.shape[1]]  # DiT/PixArt predict (eps, variance): keep eps
            if device.type == "cuda":
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                times.append(time.perf_counter() - t0)
            x = sched.step(eps, t, x).prev_sample
    return {"latents": x, "step_s": times}


def weight_bytes(model) -> int:
    """Bytes of a model's weights at inference: packed layers at their bpw, every other parameter
    in fp16 (the deployment dtype)."""
    from .nn import QuantLinear

    packed = sum(int(m.bpw * m.out_features * m.in_features / 8)
                 for m in model.modules() if isinstance(m, QuantLinear))
    return packed + sum(2 * p.numel() for p in model.parameters())


def orin_projection(model, latents, cond) -> Dict[str, object]:
    """Memory-bound lower bound on one step's quantized layers, per Orin variant: each layer's
    packed bytes + its input and output activations in fp16, over the DRAM bandwidth."""
    from .nn import QuantLinear

    layer_bytes: Dict[str, int] = {}

    def hook(name):
        def record(mod, inp, out):
            layer_bytes[name] = int(mod.bpw * mod.out_features * mod.in_features / 8) \
                + 2 * (inp[0].numel() + out.numel())
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    try:
        call(model, latents, torch.full((latents.shape[0],), 500, dtype=torch.long, device=latents.device), cond)
    finally:
        for h in hooks:
            h.remove()
    nbytes = sum(layer_bytes.values())
    return {"label": "PROJECTION: memory-bound lower bound of the quantized layers, not a measurement",
            "bytes_per_step": nbytes,
            "per_step_ms": {name: nbytes / (bw * 1e9) * 1e3 for name, bw in ORIN.items()},
            "bandwidth_gbs": dict(ORIN)}


def call(den, x, t, cond):
    with torch.no_grad():
        if type(den).__name__ == "UNet2DConditionModel":
            return den(x, t, **cond).sample
        return den(x, timestep=t, **cond).sample


def run(model: str = "tiny", recipe: str = "w4", steps: int = 4, batch: int = 1,
        resolution: Optional[int] = None, path: Optional[str] = None, device: Optional[str] = None,
        out_dir: Optional[str] = None) -> dict:
    """Float vs bitfuse over the same DDIM loop; returns (and with out_dir writes) the record."""
    if recipe not in RECIPES:
        raise E2EError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32  # CPU matmuls want fp32
    den = build_denoiser(model, path).to(dev, dtype)
    latents, cond = make_inputs(den, batch, dev, dtype, resolution)
    fp_bytes = sum(2 * p.numel() for p in den.parameters())
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        denoise(den, latents, cond, 1, dev)  # warm-up
        ref = denoise(den, latents, cond, steps, dev)
        peak_fp = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        t0 = time.perf_counter()
        qden = quantize_(den, QuantConfig(target="auto", **RECIPES[recipe]))  # in place: frees fp weights
        quant_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        denoise(qden, latents, cond, 1, dev)
        got = denoise(qden, latents, cond, steps, dev)
        peak_q = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        free, total = torch.cuda.mem_get_info(dev)
        raise E2EError(f"out of GPU memory running {model} at batch {batch}: {free / 2**30:.1f} GiB free of "
                       f"{total / 2**30:.1f} GiB; try a smaller --batch or --resolution ({e})") from None
    from .cli import fidelity

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {
        "model": model, "recipe": recipe, "config": RECIPES[recipe], "steps": steps, "batch": batch,
        "latent_shape": list(latents.shape),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "timing": "GPU time, CUDA events" if dev.type == "cuda" else "CPU timings of the torch reference path",
        "backend": {op: select_backend(dev, op) for op in ("gemv", "gemm")},
        "versions": {"bitfuse": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "float_dtype": str(dtype).replace("torch.", ""),
        "float_step_ms": 1e3 * med(ref["step_s"]), "bitfuse_step_ms": 1e3 * med(got["step_s"]),
        "speedup": med(ref["step_s"]) / med(got["step_s"]),
        "weight_bytes_fp16": fp_bytes, "weight_bytes_bitfuse": weight_bytes(qden),
        "peak_mem_float": peak_fp, "peak_mem_bitfuse": peak_q, "quantize_s": quant_s,
        "fidelity": fidelity(ref["latents"].float(), got["latents"].float()),
        "orin": orin_projection(qden, latents, cond),
    }
    result["weight_reduction"] = result["weight_bytes_fp16"] / result["weight_bytes_bitfuse"]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"e2e_{model}_{recipe}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_report(r: dict) -> str:
    o = r["orin"]
    lines = [
        f"bitfuse e2e: {r['model']} ({r['recipe']}: {r['config']}), {r['steps']} DDIM steps, latents {r['latent_shape']}",
        f"device: {r['device']}, backend: gemv (M<=8) {r['backend']['gemv']}, gemm {r['backend']['gemm']}, "
        f"timing: {r['timing']}",
        f"per step: float ({r['float_dtype']}) {r['float_step_ms']:.2f} ms, bitfuse {r['bitfuse_step_ms']:.2f} ms "
        f"({r['speedup']:.2f}x)",
        f"weights: fp16 {r['weight_bytes_fp16'] / 2**20:.2f} MiB -> bitfuse {r['weight_bytes_bitfuse'] / 2**20:.2f} MiB "
        f"({r['weight_reduction']:.2f}x smaller)",
        f"final latents vs float: PSNR {r['fidelity']['psnr_db']:.2f} dB, cosine {r['fidelity']['cosine']:.5f}",
    ]
    if r["peak_mem_float"] is not None:
        lines.append(f"peak memory: float {r['peak_mem_float'] / 2**20:.1f} MiB, bitfuse {r['peak_mem_bitfuse'] / 2**20:.1f} MiB")
    lines.append(o["label"] + ": " + ", ".join(f"{k} ({o['bandwidth_gbs'][k]} GB/s) >= {v:.3f} ms/step"
                                               for k, v in o["per_step_ms"].items()))
    return "\n".join(lines)
