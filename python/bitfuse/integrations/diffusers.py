"""diffusers integration: quantize_pipeline / save_pipeline / load_pipeline (from .pipelines),
LoRA on a quantized pipeline (load_lora, set_lora_scale, remove_lora, list_loras), activation
capture across timesteps (collect), and tiny denoisers built from configs (no downloads) for
demos and tests.

Why there is no `DiffusersQuantizer` backend (`from_pretrained(..., quantization_config=...)`):
diffusers 0.42 resolves `quantization_config.quant_method` through two module-level dicts in
diffusers/quantizers/auto.py (AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING) and offers
no registration API. Adding "bitfuse" to them at import time is monkeypatching diffusers' private
state, and it breaks: a saved folder with quant_method "bitfuse" loads only where bitfuse was
imported first; QuantizationMethod is a closed enum whose `.value` from_pretrained reads; the
quantizer path builds the model on the meta device and feeds weights one tensor at a time, with
no way to pass the calibration statistics bitfuse's recipes use or the per-layer packed geometry a
checkpoint needs; and the DiffusersQuantizer hooks are internal, with no stability promise. So bitfuse quantizes
after loading, in place, and the pipeline keeps its own classes and API. README.md, "How this
relates to diffusers' quantization_config backends", says more.
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


def tiny_unet(width: int = 64, cross_dim: int = 128, seed: int = 0, sample_size: int = 16):
    """A small UNet2DConditionModel (SD-style blocks) with random weights, built from a config.
    width=320, cross_dim=768 gives SD1.5's first two levels (about 80M parameters)."""
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
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
    DENOISER_KEEP_FLOAT, keep_float_filter, load_pipeline, quantize_pipeline, run_tiny_pipeline,
    save_pipeline, tiny_dit_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline,
    tiny_sd_pipeline, tiny_vae,
)


# ---- LoRA on a quantized pipeline ----------------------------------------------------------------
# pipe.load_lora_weights goes through PEFT, which injects its own wrappers around nn.Linear /
# nn.Conv2d and does not know QuantLinear: its dispatch raises "Target module … is not
# supported" on a quantized layer. load_lora below routes the keys to the components and applies them as
# bitfuse adapters (bitfuse.lora), which never repack the codes.

# (key prefix, component, strip the prefix). Dotted prefixes are diffusers' own; lora_* are
# kohya's, which bitfuse.lora resolves itself (so they are kept).
_LORA_ROUTES = (
    ("unet.", "unet", True), ("transformer.", "transformer", True),
    ("text_encoder_2.", "text_encoder_2", True), ("text_encoder.", "text_encoder", True),
    ("lora_unet_", "unet", False), ("lora_transformer_", "transformer", False),
    ("lora_te2_", "text_encoder_2", False), ("lora_te1_", "text_encoder", False),
    ("lora_te_", "text_encoder", False),
)


def _route_lora_key(key: str, denoiser):
    """(component, key as that component sees it). Unprefixed keys go to the denoiser, as in
    diffusers (older LoRA files name the UNet's modules without a prefix)."""
    for prefix, comp, strip in _LORA_ROUTES:
        if key.startswith(prefix):
            return comp, key[len(prefix):] if strip else key
    return denoiser, key


def load_lora(pipe, source, adapter_name: str = "default", scale: float = 1.0, components=None, **kw):
    """Apply a LoRA file (or dict) to a pipeline's quantized components as adapter `adapter_name`.

    Keys prefixed `unet.` / `transformer.` / `text_encoder.` / `text_encoder_2.` (diffusers) or
    `lora_unet_` / `lora_transformer_` / `lora_te_` / `lora_te1_` / `lora_te2_` (kohya) go to that
    component; unprefixed keys to the denoiser. `components`, if given, limits which components
    receive keys (the others' keys are reported as skipped, not as errors). **kw: `alpha`,
    `strict` as for bitfuse.load_lora; with strict=True a problem in any component means nothing
    is applied to any. Returns one LoraLoadReport whose module names are "<component>.<module>".
    Use this rather than pipe.load_lora_weights, which goes through PEFT and does not know
    QuantLinear. set_lora_scale / remove_lora / list_loras from bitfuse take a component
    (pipe.unet) or use bitfuse.integrations.diffusers.set_lora_scale(pipe, ...)."""
    from .. import lora as _lora
    from ..nn import QuantLinear
    from .pipelines import _component_names

    alpha, strict = kw.pop("alpha", None), kw.pop("strict", True)
    if kw:
        raise TypeError(f"load_lora got unexpected keyword arguments {sorted(kw)}")
    state = _lora._load_source(source)
    have = _component_names(pipe)
    denoiser = next((c for c in ("unet", "transformer") if c in have), None)
    wanted = None if components is None else ([components] if isinstance(components, str) else list(components))
    if wanted is not None:
        missing = [c for c in wanted if c not in have]
        if missing:
            raise ValueError(f"pipeline has no component(s) {missing}; its nn.Module components are {have}")
    routed, original, problems, notes = {}, {}, [], []
    for key, t in state.items():
        comp, sub = _route_lora_key(key, denoiser)
        if comp is None:
            problems.append((key, f"unprefixed key, and the pipeline has no 'unet' or 'transformer' (it has {have})"))
        elif wanted is not None and comp not in wanted:
            notes.append((key, f"for component '{comp}', not among components={wanted}"))
        elif comp not in have:
            problems.append((key, f"for component '{comp}', which this pipeline does not have (it has {have})"))
        elif (comp, sub) in original:  # "unet.x" and an unprefixed "x" name the same module
            problems.append((key, f"names the same '{comp}' key '{sub}' as {original[(comp, sub)]}"))
        else:
            routed.setdefault(comp, {})[sub] = t
            original[(comp, sub)] = key
    plans = []
    for comp, sub_state in list(routed.items()):
        if not any(isinstance(m, QuantLinear) for m in getattr(pipe, comp).modules()):
            # The common case (a UNet quantized, its text encoder not) gets one clear reason per
            # key instead of "is a Linear, not a QuantLinear" module by module.
            others = [c for c in routed if c != comp]
            problems += [(original[(comp, k)],
                          f"component '{comp}' is not quantized (LoRA applies to quantized layers "
                          f"only): pass components={others} to leave its keys out, or quantize it "
                          f"too") for k in sub_state]
            continue
        plan = _lora.plan_lora(getattr(pipe, comp), sub_state, adapter_name, scale, alpha, where=f"{comp}.")
        problems += [(original.get((comp, k), k), why) for k, why in plan.problems]
        plans.append(plan)
    _lora._raise_or_skip(problems, strict, adapter_name)
    report = _lora.LoraLoadReport(adapter_name, skipped=problems + notes)
    return _lora.apply_plans(plans, report)


def _lora_components(pipe):
    from .pipelines import _component_names

    return [(c, getattr(pipe, c)) for c in _component_names(pipe)]


def set_lora_scale(pipe, adapter_name: str, scale: float) -> list:
    """bitfuse.set_lora_scale over every component of the pipeline that has the adapter (in place,
    graph-safe). Returns "<component>.<module>" names."""
    from .. import lora as _lora

    hits = [(c, m) for c, m in _lora_components(pipe) if adapter_name in _lora.list_loras(m)]
    if not hits:
        raise KeyError(f"no component of the pipeline has a LoRA adapter '{adapter_name}'")
    for _, m in hits:  # check all before changing any
        for _, layer in _lora._with_adapter(m, adapter_name):
            layer._rescaled(adapter_name, scale)
    return [f"{c}.{n}" for c, m in hits for n in _lora.set_lora_scale(m, adapter_name, scale)]


def remove_lora(pipe, adapter_name: str) -> list:
    """bitfuse.remove_lora over every component of the pipeline that has the adapter."""
    from .. import lora as _lora

    hits = [(c, m) for c, m in _lora_components(pipe) if adapter_name in _lora.list_loras(m)]
    if not hits:
        raise KeyError(f"no component of the pipeline has a LoRA adapter '{adapter_name}'")
    return [f"{c}.{n}" for c, m in hits for n in _lora.remove_lora(m, adapter_name)]


def list_loras(pipe) -> dict:
    """component -> bitfuse.list_loras(component), for components that hold adapters."""
    from .. import lora as _lora

    return {c: found for c, m in _lora_components(pipe) if (found := _lora.list_loras(m))}


# ---- activation capture across timesteps (issue #5) -------------------------------------------

DEFAULT_TRAIN_TIMESTEPS = 1000


def _denoiser_name(obj):
    """The denoiser component's name when `obj` is a pipeline, else None (a bare module)."""
    if isinstance(obj, torch.nn.Module):
        return None
    for name in ("unet", "transformer"):
        if isinstance(getattr(obj, name, None), torch.nn.Module):
            return name
    raise TypeError(f"expected a denoiser nn.Module or a diffusers pipeline with a 'unet' or "
                    f"'transformer', got {type(obj).__name__}")


def sample_timesteps(steps, num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS) -> list:
    """`steps` timesteps spread evenly over [0, T) (from the noisiest), or the list given."""
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return [int(round(t)) for t in torch.linspace(num_train_timesteps - 1, 0, steps).tolist()]
    return [int(t) for t in steps]


def holdout_timesteps(steps: int, num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS) -> list:
    """The steps − 1 timesteps halfway between sample_timesteps(steps)' (the middle one for
    steps = 1): held-out statistics for allocate_bits(holdout=…) should come from timesteps the
    fitted ones did not see, or layers that see only the timestep (time embeddings) look perfect."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if steps == 1:
        return [(num_train_timesteps - 1) // 2]
    return sample_timesteps(2 * steps - 1, num_train_timesteps)[1::2]


def _at_timestep(batch, t: int, scheduler, generator):
    """A copy of a denoiser batch with its timestep set to t (and, given a scheduler, the sample
    noised to t). Batches are dicts (`timestep` key, sample under `sample` or `hidden_states`)
    or tuples (sample, timestep, *rest)."""
    if isinstance(batch, dict):
        b = dict(batch)
        key = "sample" if "sample" in b else "hidden_states"
        sample = b[key]
    else:
        b = list(batch)
        key, sample = 0, b[0]
    if scheduler is not None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)
        sample = scheduler.add_noise(sample, noise, torch.tensor([t]))
        b[key] = sample
    ts = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
    if isinstance(b, dict):
        b["timestep"] = ts
        return b
    b[1] = ts
    return tuple(b)


@torch.no_grad()
def collect(pipe_or_denoiser, inputs, steps=4, *, scheduler=None, full: bool = True,
            filter_fn=None, seed: int = 0, convs: bool = False, max_full_bytes=None):
    """Calibration statistics for a diffusion model, sampled across timesteps (activations shift
    with the noise level, so one timestep is not enough).

    * A bare denoiser (UNet2DConditionModel, DiTTransformer2DModel, …): `inputs` is a list of
      batches, each a dict of forward kwargs or a tuple (sample, timestep, *rest). Every batch runs
      once per timestep of `steps` (an int: that many spread over [0, 1000); or a list). Given a
      `scheduler`, samples are treated as clean latents and noised to each timestep. Returns
      {linear fqn: ActivationStats}, quantize_'s calib_data.
    * A pipeline: `inputs` is a list of call kwargs (a str is taken as a prompt); each call runs
      `steps` inference steps with hooks on the denoiser. Returns {denoiser name: {fqn: stats}},
      quantize_pipeline's calib.
    Only XᵀX and channel sums of squares are kept (full=False: sums of squares only).
    convs=True records the convs too (over their patches, C·kh·kw wide), for recipes with
    QuantConfig.convs; max_full_bytes bounds the XᵀX kept (bitfuse.calibrate.collect says how).
    """
    from ..calibrate.collect import StatsRecorder, run_batch

    name = _denoiser_name(pipe_or_denoiser)
    denoiser = pipe_or_denoiser if name is None else getattr(pipe_or_denoiser, name)
    with StatsRecorder(denoiser, full=full, filter_fn=filter_fn, convs=convs,
                       max_full_bytes=max_full_bytes) as rec:
        if name is None:
            for batch in _timestep_batches(inputs, steps, scheduler, seed):
                run_batch(denoiser, batch)
        else:
            _run_pipeline(pipe_or_denoiser, inputs, steps)
    return rec.stats if name is None else {name: rec.stats}


def _timestep_batches(inputs, steps, scheduler, seed: int):
    """Every denoiser batch of `inputs` at every timestep of `steps` (collect's sampling)."""
    total = getattr(getattr(scheduler, "config", None), "num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS)
    gen = torch.Generator().manual_seed(seed)
    for t in sample_timesteps(steps, total):
        for batch in inputs:
            yield _at_timestep(batch, t, scheduler, gen)


def _run_pipeline(pipe, inputs, steps) -> None:
    """Call the pipeline once per entry of `inputs` (a str is a prompt), `steps` inference steps."""
    if not isinstance(steps, int):
        raise ValueError("with a pipeline, steps is the number of inference steps (an int)")
    for call in inputs:
        kwargs = {"prompt": call} if isinstance(call, str) else dict(call)
        kwargs.setdefault("num_inference_steps", steps)
        pipe(**kwargs)


def sensitivity(pipe_or_denoiser, inputs, steps=4, *, scheduler=None, probes: int = 4,
                filter_fn=None, seed: int = 0):
    """Output sensitivity (bitfuse.calibrate.output_sensitivity) of a diffusion model's layers,
    sampled across timesteps like collect(), with the same `inputs` and `steps`.

    * A bare denoiser: every batch runs at every timestep of `steps`. Returns {fqn: S}.
    * A pipeline: each call of `inputs` runs `steps` inference steps; the denoiser's calls are
      recorded (their inputs only) and replayed with gradients, since pipelines run without.
      Returns {denoiser name: {fqn: S}}, the shape collect() returns.
    Feed it with the statistics from collect() to allocate_bits (docs/CALIBRATION.md).
    """
    from ..calibrate.collect import ModelCall, detached_copy
    from ..calibrate.sensitivity import output_sensitivity

    name = _denoiser_name(pipe_or_denoiser)
    denoiser = pipe_or_denoiser if name is None else getattr(pipe_or_denoiser, name)
    if name is None:
        batches = _timestep_batches(inputs, steps, scheduler, seed)
        return output_sensitivity(denoiser, batches, probes=probes, seed=seed, filter_fn=filter_fn)
    calls = []
    handle = denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(ModelCall(detached_copy(args), detached_copy(kwargs))), with_kwargs=True)
    try:
        with torch.no_grad():
            _run_pipeline(pipe_or_denoiser, inputs, steps)
    finally:
        handle.remove()
    return {name: output_sensitivity(denoiser, calls, probes=probes, seed=seed, filter_fn=filter_fn)}
