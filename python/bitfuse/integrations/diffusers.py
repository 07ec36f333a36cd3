"""diffusers integration: tiny denoisers built from configs (no downloads) for demos and tests.

The full pipeline integration (quantize_pipeline, activation capture) comes with issues #5/#7.
"""

from __future__ import annotations

import torch


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "this needs diffusers, which is not installed: pip install 'bitfuse[diffusers]'"
        ) from e
    return diffusers


def tiny_unet(width: int = 64, cross_dim: int = 128, seed: int = 0):
    """A small UNet2DConditionModel (SD-style blocks) with random weights, built from a config."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def tiny_dit(width_heads: int = 4, head_dim: int = 16, seed: int = 0):
    """A small DiTTransformer2DModel with random weights, built from a config.

    1000 class embeddings (+1 for "no class") because DiTPipeline uses id 1000 as the null class
    for classifier-free guidance."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=width_heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32,
    ).eval()


def unet_inputs(unet, batch: int = 1, seq: int = 8, seed: int = 1):
    """Random (sample, timestep, encoder_hidden_states) matching a UNet's config."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    sample = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(batch, seq, c.cross_attention_dim, generator=g)
    return sample, torch.tensor([10] * batch), ctx


def dit_inputs(dit, batch: int = 1, seed: int = 1):
    """Random (hidden_states, timestep, class_labels) matching a DiT's config."""
    g = torch.Generator().manual_seed(seed)
    c = dit.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return x, torch.tensor([10] * batch), torch.zeros(batch, dtype=torch.long)


# Pipeline-level API (quantize_pipeline, save/load per component, tiny pipelines).
from .pipelines import (  # noqa: E402,F401
    load_pipeline, quantize_pipeline, save_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline,
    tiny_sd_pipeline, tiny_vae,
)
