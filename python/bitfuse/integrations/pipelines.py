"""Quantizing diffusers pipelines in place (re-exported by bitfuse.integrations.diffusers).

The pipeline object, its scheduler and its __call__ stay exactly as they were: only the chosen
components' nn.Linear (and, with QuantConfig(convs=True), nn.Conv2d) layers are swapped for
bitfuse modules, so `pipe(...)` runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch.nn as nn

from ..api import quantize_
from ..config import QuantConfig
from ..io import load_quantized, save_quantized

log = logging.getLogger("bitfuse")

DENOISERS = ("unet", "transformer")


def _component_names(pipe) -> list:
    comps = getattr(pipe, "components", None)
    if isinstance(comps, Mapping):
        return [k for k, v in comps.items() if isinstance(v, nn.Module)]
    return [k for k, v in vars(pipe).items() if isinstance(v, nn.Module)]


def resolve_components(pipe, components: Optional[Sequence[str]]) -> list:
    """The component names to quantize: the given ones (all must exist and be modules), or the
    pipeline's denoiser ("unet" or "transformer")."""
    have = _component_names(pipe)
    if components is None:
        found = [c for c in DENOISERS if c in have]
        if not found:
            raise ValueError(f"pipeline has no denoiser component ('unet' or 'transformer'); it has {have}")
        return found
    if isinstance(components, str):
        components = [components]
    missing = [c for c in components if c not in have]
    if missing:
        raise ValueError(f"pipeline has no component(s) {missing}; its nn.Module components are {have}")
    return list(components)


def quantize_pipeline(pipe, config: QuantConfig, components: Optional[Sequence[str]] = None,
                      calib: Optional[Mapping[str, Mapping[str, object]]] = None, filter_fn=None):
    """Quantize a diffusers pipeline's denoiser (and any other listed components) in place.

    calib, if given, maps a component name to its quantize_ calib_data (layer name -> activations
    or statistics). Returns the pipeline.
    """
    calib = dict(calib or {})
    names = resolve_components(pipe, components)
    unknown = set(calib) - set(names)
    if unknown:
        raise ValueError(f"calib names components that are not being quantized: {sorted(unknown)}")
    for name in names:
        log.info("bitfuse: quantizing pipeline component %s", name)
        quantize_(getattr(pipe, name), config, filter_fn=filter_fn, calib_data=calib.get(name))
    return pipe


def save_pipeline(pipe, directory: str, components: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """One bitfuse checkpoint per quantized component: <directory>/<name>.bitfuse.safetensors."""
    import os

    os.makedirs(directory, exist_ok=True)
    written = {}
    for name in resolve_components(pipe, components):
        path = os.path.join(directory, f"{name}.bitfuse.safetensors")
        save_quantized(getattr(pipe, name), path)
        written[name] = path
    return written


def load_pipeline(pipe, directory: str, components: Optional[Iterable[str]] = None, device=None):
    """Load bitfuse checkpoints written by save_pipeline into a float pipeline (built from a local
    folder or from configs), in place: one call. Returns the pipeline."""
    import os

    for name in resolve_components(pipe, components):
        path = os.path.join(directory, f"{name}.bitfuse.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no bitfuse checkpoint for component '{name}' at {path}")
        load_quantized(getattr(pipe, name), path, device=device)
    return pipe


def tiny_vae(seed: int = 0):
    """A small AutoencoderKL (4 latent channels, 2 blocks) with random weights, from a config."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
        layers_per_block=1, norm_num_groups=32, sample_size=16,
    ).eval()


def tiny_dit_pipeline(seed: int = 0):
    """A DiTPipeline assembled from tiny components built from configs, with a real DDIM
    scheduler: runs end to end on a CPU in seconds."""
    from diffusers import DDIMScheduler, DiTPipeline

    from .diffusers import tiny_dit

    return DiTPipeline(transformer=tiny_dit(seed=seed), vae=tiny_vae(seed), scheduler=DDIMScheduler(),
                       id2label={0: "zero", 1: "one"})
