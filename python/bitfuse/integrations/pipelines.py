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

# A denoiser's first and last layers stay float by default, as post-training quantization usually
# leaves a network's input and output layers: they hold a negligible share of its weights (SD3's
# proj_out is 0.005% of the model, DiT-XL's final layer 0.4%), and every other layer's error
# passes through the last one. benchmarks/results/cpu/pipelines.md measures what it buys on the
# tiny pipelines (its last column quantizes them too). Top-level names: UNet conv_in /
# conv_out, the transformers' proj_out, DiT's final layer (proj_out_1 is its adaLN modulation,
# proj_out_2 the projection). keep_float=() quantizes them too.
DENOISER_KEEP_FLOAT = ("conv_in", "conv_out", "proj_out", "proj_out_1", "proj_out_2")


def keep_float_filter(keep_float=DENOISER_KEEP_FLOAT, filter_fn=None, explicit=()):
    """A quantize_ filter_fn that leaves the layers named in keep_float (fully qualified names)
    float and asks filter_fn about the rest. Layers in `explicit` (given their own config, e.g.
    by layer_configs) are quantized even if keep_float names them: an explicit choice wins."""
    keep = frozenset(keep_float) - frozenset(explicit)
    if not keep:
        return filter_fn
    return lambda m, fqn: fqn not in keep and (filter_fn is None or filter_fn(m, fqn))


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
                      calib: Optional[Mapping[str, Mapping[str, object]]] = None, filter_fn=None, *,
                      calib_options: Optional[Mapping[str, object]] = None,
                      layer_configs: Optional[Mapping[str, Mapping[str, QuantConfig]]] = None,
                      keep_float: Sequence[str] = DENOISER_KEEP_FLOAT):
    """Quantize a diffusers pipeline's denoiser (and any other listed components) in place.

    calib, if given, maps a component name to its quantize_ calib_data (layer name -> activations
    or statistics). calib_options go to calibrate() (e.g. {"rounding": "gptq"}), as quantize_
    takes them. layer_configs maps a component name to a per-layer {fqn: QuantConfig} (what
    bitfuse.calibrate.allocate_bits returns); that component's other layers get `config`.
    keep_float: layers of the denoiser ("unet" / "transformer") left float, by default its
    input and output layers (DENOISER_KEEP_FLOAT); a layer layer_configs names is quantized
    anyway; () quantizes every layer. Returns the pipeline.
    """
    from ..calibrate import quantize_per_layer

    calib = dict(calib or {})
    layer_configs = dict(layer_configs or {})
    names = resolve_components(pipe, components)
    for what, given in (("calib", calib), ("layer_configs", layer_configs)):
        unknown = set(given) - set(names)
        if unknown:
            raise ValueError(f"{what} names components that are not being quantized: {sorted(unknown)}")
    for name in names:
        log.info("bitfuse: quantizing pipeline component %s", name)
        module = getattr(pipe, name)
        fn = keep_float_filter(keep_float, filter_fn, layer_configs.get(name, ())) if name in DENOISERS else filter_fn
        if name in layer_configs:
            quantize_per_layer(module, layer_configs[name], config, filter_fn=fn,
                               calib_data=calib.get(name), calib_options=calib_options)
        else:
            quantize_(module, config, filter_fn=fn, calib_data=calib.get(name), calib_options=calib_options)
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
    """A small AutoencoderKL (4 latent channels, 2 blocks) with random weights, from a config.
    (Its latents are 2x smaller than the image, not 8x: pass height/width accordingly.)"""
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


def _tiny_clip_tokenizer(directory: str):
    """A CLIP BPE tokenizer over a 5-token vocabulary written to `directory` (no downloads)."""
    import json
    import os

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "!": 4}
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                         model_max_length=77)


def tiny_sd_pipeline(directory: str, seed: int = 0):
    """A StableDiffusionPipeline from tiny components built from configs (a 2-layer CLIP text
    encoder, the tiny UNet and VAE, DDIM). Needs transformers; `directory` holds the tokenizer
    files it writes."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from .diffusers import tiny_unet

    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=5, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, projection_dim=128)).eval()
    return StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=text, tokenizer=_tiny_clip_tokenizer(directory),
                                   unet=tiny_unet(seed=seed), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_pixart_pipeline(seed: int = 0):
    """A PixArtAlphaPipeline from tiny components built from configs (a 1-layer T5 encoder, a
    2-layer PixArt transformer, the tiny VAE, DDIM). Call it with prompt_embeds (no tokenizer)."""
    import torch
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=64, caption_channels=32, sample_size=8, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False, norm_num_groups=32,
    ).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=t5, vae=tiny_vae(seed), transformer=transformer,
                               scheduler=DDIMScheduler())


def tiny_sd3_pipeline(directory: str, seed: int = 0):
    """A StableDiffusion3Pipeline from tiny components built from configs: a 2-block
    SD3Transformer2DModel (joint attention, the last block context-pre-only), two 2-layer CLIP
    text encoders with projections, no T5 (the pipeline then feeds zeros in its place), the tiny
    VAE and the flow-matching Euler scheduler (shift 3, as SD3's). Needs transformers;
    `directory` holds the tokenizer files it writes."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=64,
        pooled_projection_dim=64, pos_embed_max_size=16,
    ).eval()

    def clip():  # hidden 64: the two encoders' 128 wide context fits joint_attention_dim; pooled 2 x 32
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=5, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1)).eval()

    tokenizer = _tiny_clip_tokenizer(directory)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(seed),
        text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline from tiny components built from configs: a FluxTransformer2DModel with one
    double-stream and two single-stream blocks, the tiny VAE, flow-matching Euler, and no text
    encoders: call it with prompt_embeds (…, 32) and pooled_prompt_embeds (…, 32)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(seed), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def run_tiny_pipeline(pipe, seed: int = 0, steps: int = 4, **kwargs):
    """The final latents (a tensor) of one call of a tiny_*_pipeline, with the arguments each kind
    needs: a prompt where it has text encoders and tokenizers, fixed random embeddings where it
    has none (PixArt, Flux), a class label for DiT. `seed` seeds the initial noise; kwargs
    override the call's (e.g. generator, or a different prompt)."""
    import numpy as np
    import torch

    kind = type(pipe).__name__
    emb = torch.Generator().manual_seed(1)
    call = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed))
    if kind == "DiTPipeline":
        call.update(class_labels=[1])
    elif kind == "StableDiffusionPipeline":
        call.update(prompt="a cat")
    elif kind == "StableDiffusion3Pipeline":
        call.update(prompt="a cat", height=32, width=32, max_sequence_length=8)
    elif kind == "PixArtAlphaPipeline":
        e, mask = torch.randn(1, 8, 32, generator=emb), torch.ones(1, 8)
        call.update(prompt=None, negative_prompt=None, prompt_embeds=e, prompt_attention_mask=mask,
                    negative_prompt_embeds=torch.zeros_like(e), negative_prompt_attention_mask=mask,
                    height=64, width=64, use_resolution_binning=False)
    elif kind == "FluxPipeline":
        call.update(prompt_embeds=torch.randn(1, 8, 32, generator=emb),
                    pooled_prompt_embeds=torch.randn(1, 32, generator=emb), height=32, width=32)
    else:
        raise TypeError(f"run_tiny_pipeline runs the tiny_*_pipeline kinds, not a {kind}")
    call.update(kwargs)
    return torch.as_tensor(np.asarray(pipe(**call).images))
