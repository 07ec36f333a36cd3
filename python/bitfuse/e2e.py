"""End-to-end denoiser benchmark (`bitfuse bench e2e`): fp16 vs bitfuse over a real sampling loop.

Builds a denoiser from its published config (random weights; nothing is downloaded) or loads a
local diffusers folder, quantizes a copy with a named recipe, runs both through the same sampler
steps from the same noise (DDIM; flow-matching Euler for SD3), and reports per-step latency, peak
memory, weight bytes, and the fidelity of the final latents. Every result records the device,
versions, backend and recipe.
On a CPU the timings are CPU timings of the torch reference path, and say so. One extra
profiled step per model splits the time by layer type (LayerTimer); --cuda-graphs also times the
loop as CUDA-graph replays (graph_denoise, GPU only). The record is written as JSON and markdown.

The Orin projection counts, per quantized layer, the bytes its kernel must move (packed weight +
activations in and out) and its tensor-core work (2·M·N·K flops), and bounds the layer's time
below by bytes / DRAM bandwidth (memory bound), flops / fp16 tensor peak (compute bound), and the
larger of the two (roofline). Summed over one step's layers, these are LOWER BOUNDS on the time of
those layers on a Jetson, always labelled a projection, never a measurement.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from typing import Callable, Dict, List, Optional

import torch

from . import QuantConfig, quantize_
from .dispatch import select_backend
from .version import __version__

# Named recipes; convs too, since a UNet's resnet convs hold most of its weights.
RECIPES: Dict[str, dict] = {
    "w4": dict(bits=4, group_size=64, convs=True),
    # The group a recipe names is the one asked for: QuantConfig.fit_group may give a layer whose
    # K pads badly a smaller one (its PackedWeight.group_size, the quantize report's group_size).
    "w4g128": dict(bits=4, group_size=128, convs=True),
    "w3res": dict(bits=3, group_size=64, residual=True, convs=True),
    # W3 + residual in fewer bytes: g128 and compact scales. SD1.5 UNet 3.73x smaller than fp16
    # against w3res's 3.36x (benchmarks/results/cpu/weight_bytes.md); within 0.1-0.3 dB of w3res
    # on the tiny pipelines (whose narrow layers keep fp16 scales)
    "w3resc": dict(bits=3, group_size=128, residual=True, convs=True, compact_scales=True),
    "w3mix": dict(bits=3, group_size=64, mixed_bits=(2, 3, 4), residual=0.5, convs=True),
    "w4-linear": dict(bits=4, group_size=64),
    # w4 with compact scales (FORMAT.md §5.1): 8-bit scale/offset codes, fewer bits at about the same error
    "w4c": dict(bits=4, group_size=64, convs=True, compact_scales=True),
}
ORIN = {"AGX Orin 64GB": 204.8, "Orin Nano": 68.0}  # GB/s, vendor figures (shared/hardware.md)
# Dense fp16 tensor-core peak, TFLOP/s. shared/hardware.md gives none, so it is DERIVED here from
# the Ampere GA10B configuration: tensor cores × 256 fp16 FMA/clock × 2 flops × max GPU clock.
#   AGX Orin 64GB: 64 TCs (16 SMs) at 1.3 GHz   -> 42.6 (= NVIDIA's 170 sparse-INT8 GPU TOPS / 4)
#   Orin Nano 8GB: 32 TCs (8 SMs)  at 0.625 GHz -> 10.2 (= its 40 sparse-INT8 TOPS / 4)
# GA10x may run fp16 with fp32 accumulation at half this rate; the full rate is used on purpose,
# so that flops / peak stays a lower bound on time.
ORIN_FP16_TFLOPS = {"AGX Orin 64GB": 42.6, "Orin Nano": 10.2}
ORIN_PEAK_SOURCE = ("derived, not a vendor table: tensor cores x 256 fp16 FMA/clk x 2 x max GPU clock "
                    "(AGX Orin 64 TCs @ 1.3 GHz, Orin Nano 32 TCs @ 0.625 GHz); full fp16 rate, so a "
                    "lower bound on time")

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
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2.0B parameters).
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# model name -> (diffusers class, published config; None: bitfuse's tiny UNet)
MODEL_SPECS = {
    "tiny": ("UNet2DConditionModel", None),
    "sd15-unet": ("UNet2DConditionModel", SD15_UNET),
    "dit-xl-2": ("DiTTransformer2DModel", DIT_XL_2),
    "pixart-alpha": ("PixArtTransformer2DModel", PIXART_ALPHA),
    "sd3-medium": ("SD3Transformer2DModel", SD3_MEDIUM),
}
MODELS = tuple(MODEL_SPECS)
# Denoisers trained with rectified flow (flow matching) are sampled by Euler steps over sigmas, with
# float timesteps sigma·1000 (their pipelines' FlowMatchEulerDiscreteScheduler, SD3's shift 3.0);
# the others by DDIM on their eps prediction with integer timesteps.
FLOW_MATCHING = {"SD3Transformer2DModel": dict(shift=3.0)}
# Conditioning lengths of the real pipelines: CLIP's 77 tokens (SD1.5), PixArt-α's 120 T5 tokens,
# SD3's 77 CLIP + 256 T5 tokens.
TEXT_TOKENS = {"UNet2DConditionModel": 77, "PixArtTransformer2DModel": 120, "SD3Transformer2DModel": 333}


class E2EError(ValueError):
    """A model name, folder or recipe that the e2e benchmark cannot use."""


def _cuda_gemv_kernel() -> str:
    """The CUDA GEMV the cuda backend runs for M <= 8 (BITFUSE_CUDA_GEMV, default "tc")."""
    from .backend_cuda import gemv_kernel

    return gemv_kernel()


def _cuda_gemm_kernel() -> str:
    """The CUDA GEMM tile the cuda backend runs M <= 16 on (BITFUSE_CUDA_GEMM, default "skinny")."""
    from .backend_cuda import gemm_kernel

    return gemm_kernel()


def build_denoiser(model: str, path: Optional[str] = None):
    import diffusers

    from .integrations.diffusers import tiny_unet

    if model not in MODEL_SPECS:
        raise E2EError(f"unknown model {model!r}; choose one of {MODELS}")
    cls_name, cfg = MODEL_SPECS[model]
    cls = getattr(diffusers, cls_name)
    if path is not None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise E2EError(f"{path!r} is not a diffusers model folder (no config.json); give the "
                           "denoiser's folder, e.g. <pipeline>/unet")
        try:
            return cls.from_pretrained(path, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001 - diffusers raises many types here
            raise E2EError(f"could not load {cls.__name__} from {path!r}: {e}") from e
    if cfg is None:
        return tiny_unet()
    torch.manual_seed(0)
    return cls(**cfg).eval()


def sample_key(den) -> str:
    """The forward argument that takes the latents."""
    return "sample" if type(den).__name__ == "UNet2DConditionModel" else "hidden_states"


def make_inputs(den, batch: int, device, dtype, resolution: Optional[int], seed: int = 0):
    """(latents, conditioning kwargs) for one denoiser call (random, from `seed`)."""
    c = den.config
    g = torch.Generator().manual_seed(seed)
    size = (resolution // 8) if resolution else c.sample_size
    lat = torch.randn(batch, c.in_channels, size, size, generator=g).to(device, dtype)
    name = type(den).__name__
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    if name == "DiTTransformer2DModel":
        return lat, dict(class_labels=torch.zeros(batch, dtype=torch.long, device=device))
    if name not in TEXT_TOKENS:
        raise E2EError(f"the e2e benchmark does not know how to condition a {name}")
    seq = TEXT_TOKENS[name]
    if name == "UNet2DConditionModel":
        return lat, dict(encoder_hidden_states=rand(batch, seq, c.cross_attention_dim))
    if name == "SD3Transformer2DModel":
        return lat, dict(encoder_hidden_states=rand(batch, seq, c.joint_attention_dim),
                         pooled_projections=rand(batch, c.pooled_projection_dim))
    return lat, dict(encoder_hidden_states=rand(batch, seq, c.caption_channels),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def make_scheduler(den):
    """The sampler the denoiser's own pipelines use: flow-matching Euler or DDIM (see FLOW_MATCHING)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    flow = FLOW_MATCHING.get(type(den).__name__)
    return DDIMScheduler() if flow is None else FlowMatchEulerDiscreteScheduler(**flow)


def timestep_tensor(den, t, batch: int, device) -> torch.Tensor:
    """Timestep t for a batch, in the dtype the denoiser's pipeline passes: float for flow
    matching (t = sigma·1000 is not an integer), int64 for DDIM."""
    flow = type(den).__name__ in FLOW_MATCHING
    return torch.full((batch,), float(t) if flow else int(t), device=device,
                      dtype=torch.float32 if flow else torch.long)


def denoise(den, latents, cond, steps: int, device, step_fn: Optional[Callable] = None) -> Dict[str, object]:
    """The denoiser's sampling loop (make_scheduler: DDIM, or flow-matching Euler); returns the
    final latents and the per-step times (seconds). `step_fn(x, t)` replaces the eager denoiser
    call (the CUDA-graph replay uses it)."""
    step_fn = step_fn or (lambda x, tt: call(den, x, tt, cond))
    sched = make_scheduler(den)
    sched.set_timesteps(steps)
    x = latents.clone()
    times = []
    with torch.no_grad():
        for t in sched.timesteps:
            tt = timestep_tensor(den, t, x.shape[0], device)
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            out = step_fn(x, tt)
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
    """Lower bounds on one step's quantized layers, per Orin variant (see the module doc).

    Per layer: bytes = packed weight + fp16 input and output activations; flops = 2·M·N·K with
    M = output elements / N (tokens for a linear, output pixels for a conv); an embedding lookup
    moves its packed table and the fp16 rows it returns, with no flops. Memory bound = Σ
    bytes / bandwidth, compute bound = Σ flops / peak, roofline = Σ max(per-layer bounds)."""
    from .nn import QuantEmbedding, QuantLinear

    layers: Dict[str, tuple] = {}

    def hook(name):
        def record(mod, inp, out):
            packed = int(mod.bpw * mod.out_features * mod.in_features / 8)
            if isinstance(mod, QuantEmbedding):  # a lookup: the table read, the rows written, no flops
                layers[name] = (packed + 2 * out.numel(), 0)
                return
            nbytes = packed + 2 * (inp[0].numel() + out.numel())
            flops = 2 * (out.numel() // mod.out_features) * mod.out_features * mod.in_features
            layers[name] = (nbytes, flops)
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    try:
        call(model, latents, timestep_tensor(model, 500, latents.shape[0], latents.device), cond)
    finally:
        for h in hooks:
            h.remove()
    nbytes = sum(b for b, _ in layers.values())
    flops = sum(f for _, f in layers.values())
    mem, comp, roof = {}, {}, {}
    for name, bw in ORIN.items():
        peak = ORIN_FP16_TFLOPS[name] * 1e12
        mem[name] = nbytes / (bw * 1e9) * 1e3
        comp[name] = flops / peak * 1e3
        roof[name] = sum(max(b / (bw * 1e9), f / peak) for b, f in layers.values()) * 1e3
    return {"label": "PROJECTION: lower bounds on the time of the quantized layers, not a measurement",
            "bytes_per_step": nbytes, "flops_per_step": flops,
            "per_step_ms": mem,  # memory-bound lower bound (kept under this key for older readers)
            "memory_bound_ms": mem, "compute_bound_ms": comp, "roofline_ms": roof,
            "bandwidth_gbs": dict(ORIN), "fp16_tflops": dict(ORIN_FP16_TFLOPS),
            "fp16_tflops_source": ORIN_PEAK_SOURCE}


# ---- where the time goes, per layer type ------------------------------------------------------

LAYER_TYPES = ("QuantLinear", "QuantConv2d", "float Linear", "float Conv2d", "attention", "norm", "other")
BREAKDOWN_METHOD = (
    "one separate profiled step (t=500) after the timed loop, with forward hooks around every "
    "QuantLinear, QuantConv2d, float nn.Linear / nn.Conv2d, attention module and norm; each call's "
    "SELF time (its time minus that of hooked modules nested in it), summed per type. 'attention' "
    "is the attention core (scores, softmax, reshapes) without its projections, which count as "
    "linears; 'other' is the rest of the step (activations, residual adds, resampling, "
    "embeddings). GPU: CUDA events, one sync at the end; CPU: perf_counter, no sync. The hooks "
    "add overhead, so the profiled step is slower than the timed ones: read the fractions.")


def layer_type(mod) -> Optional[str]:
    """The breakdown category of a module, or None for a container that is not timed itself."""
    import torch.nn as nn

    from .nn import QuantConv2d, QuantLinear

    if isinstance(mod, QuantConv2d):  # before QuantLinear: QuantConv2d subclasses it
        return "QuantConv2d"
    if isinstance(mod, QuantLinear):
        return "QuantLinear"
    if isinstance(mod, nn.Linear):
        return "float Linear"
    if isinstance(mod, nn.Conv2d):
        return "float Conv2d"
    name = type(mod).__name__
    if name == "Attention" or name.endswith("Attention"):
        return "attention"
    if "Norm" in name:  # GroupNorm, LayerNorm, RMSNorm, AdaLayerNorm{,Zero,Single}, ...
        return "norm"
    return None


class LayerTimer:
    """Forward hooks that time every categorised module's calls (self time, nesting-aware).

    On CUDA each hook records an event (no sync until `result()`); on CPU a perf_counter stamp.
    Use as a context manager around the forward passes to profile."""

    def __init__(self, model, device):
        self.model, self.cuda = model, torch.device(device).type == "cuda"
        self.records: List[list] = []  # [type, start, end, children indices]
        self.stack: List[int] = []
        self.handles: list = []

    def _stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def __enter__(self):
        for mod in self.model.modules():
            kind = layer_type(mod)
            if kind is None:
                continue

            def pre(_m, _inp, kind=kind):
                idx = len(self.records)
                if self.stack:
                    self.records[self.stack[-1]][3].append(idx)
                self.stack.append(idx)
                self.records.append([kind, self._stamp(), None, []])

            def post(_m, _inp, _out):
                self.records[self.stack.pop()][2] = self._stamp()

            self.handles.append(mod.register_forward_pre_hook(pre))
            self.handles.append(mod.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stack.clear()

    def result(self, total_s: float) -> Dict[str, object]:
        """{type: seconds} of self time, call counts, and 'other' = total - everything hooked."""
        if self.cuda:
            torch.cuda.synchronize()
        dur = [self._elapsed(r[1], r[2]) if r[2] is not None else 0.0 for r in self.records]
        per = {k: 0.0 for k in LAYER_TYPES}
        calls = {k: 0 for k in LAYER_TYPES}
        for i, r in enumerate(self.records):
            per[r[0]] += max(dur[i] - sum(dur[c] for c in r[3]), 0.0)
            calls[r[0]] += 1
        per["other"] = max(total_s - sum(per.values()), 0.0)
        return {"step_ms": 1e3 * total_s,
                "per_type_ms": {k: 1e3 * v for k, v in per.items()},
                "fraction": {k: (v / total_s if total_s > 0 else 0.0) for k, v in per.items()},
                "calls": {k: v for k, v in calls.items() if k != "other"}}


def layer_breakdown(den, latents, cond, device) -> Dict[str, object]:
    """Time one denoiser call (t=500) split by layer type; see BREAKDOWN_METHOD."""
    dev = torch.device(device)
    tt = timestep_tensor(den, 500, latents.shape[0], dev)
    with LayerTimer(den, dev) as timer:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call(den, latents, tt, cond)
            b.record()
            b.synchronize()
            total = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            call(den, latents, tt, cond)
            total = time.perf_counter() - t0
    return timer.result(total)


# ---- CUDA graphs ------------------------------------------------------------------------------

def graph_denoise(den, latents, cond, steps: int, device) -> Dict[str, object]:
    """The sampling loop with each denoiser call replayed from one CUDA graph.

    One call is captured with static input buffers (latents, timestep; the conditioning tensors
    are already fixed); each step copies its x and t into them and replays. Graph-safe: the
    Triton kernels and the CUDA extension launch on the current stream, allocate only through
    torch's caching allocator (the capture's private pool) and never sync with the host; the
    warm-up calls before capture fill the Triton JIT and, with BITFUSE_AUTOTUNE=1, the autotune
    cache. A capture that fails (a layer that syncs, for instance) is reported, not raised. Known
    exception: the sparse-outlier (HBP) wrapper calls .item() per CUDA call, so `outliers` > 0 is
    not expected to capture yet. Not yet run on a GPU (none lent so far)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"status": "ignored: not on CPU (CUDA graphs need a GPU)"}
    static_x = latents.clone()
    static_t = timestep_tensor(den, 999, latents.shape[0], dev)
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the default stream, as torch.cuda.graph asks
                call(den, static_x, static_t, cond)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = call(den, static_x, static_t, cond)
    except Exception as e:  # noqa: BLE001 - capture errors come from many layers
        return {"status": f"capture failed: {type(e).__name__}: {e}"}

    def replay(x, tt):
        static_x.copy_(x)
        static_t.copy_(tt)
        graph.replay()
        return static_out.clone()

    denoise(den, latents, cond, 1, dev, step_fn=replay)  # warm replay
    res = denoise(den, latents, cond, steps, dev, step_fn=replay)
    res["status"] = "ok"
    return res


def call(den, x, t, cond):
    with torch.no_grad():
        return den(**{sample_key(den): x}, timestep=t, **cond).sample


def run(model: str = "tiny", recipe: str = "w4", steps: int = 4, batch: int = 1,
        resolution: Optional[int] = None, path: Optional[str] = None, device: Optional[str] = None,
        out_dir: Optional[str] = None, cuda_graphs: bool = False, breakdown: bool = True) -> dict:
    """Float vs bitfuse over the same sampling loop (make_scheduler); returns (and with out_dir writes, as JSON and a
    markdown table) the record. breakdown: profile one extra step per model by layer type (off
    the timed loop). cuda_graphs: also time the loop with each call replayed from a CUDA graph
    (GPU only; on a CPU the record says it was ignored)."""
    from .integrations.pipelines import DENOISER_KEEP_FLOAT, keep_float_filter

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
        bd_fp = layer_breakdown(den, latents, cond, dev) if breakdown else None
        gr_fp = graph_denoise(den, latents, cond, steps, dev) if cuda_graphs else None
        t0 = time.perf_counter()
        # in place (frees the fp weights); the input and output layers stay float (DENOISER_KEEP_FLOAT)
        qden = quantize_(den, QuantConfig(target="auto", **RECIPES[recipe]), filter_fn=keep_float_filter())
        quant_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        denoise(qden, latents, cond, 1, dev)
        got = denoise(qden, latents, cond, steps, dev)
        peak_q = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        bd_q = layer_breakdown(qden, latents, cond, dev) if breakdown else None
        gr_q = graph_denoise(qden, latents, cond, steps, dev) if cuda_graphs else None
    except torch.cuda.OutOfMemoryError as e:
        free, total = torch.cuda.mem_get_info(dev)
        raise E2EError(f"out of GPU memory running {model} at batch {batch}: {free / 2**30:.1f} GiB free of "
                       f"{total / 2**30:.1f} GiB; try a smaller --batch or --resolution ({e})") from None
    from .cli import fidelity

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {
        "model": model, "recipe": recipe, "config": RECIPES[recipe], "steps": steps, "batch": batch,
        "sampler": type(make_scheduler(qden)).__name__.replace("Scheduler", ""),
        "kept_float": [n for n in DENOISER_KEEP_FLOAT if _has_layer(qden, n)],
        "latent_shape": list(latents.shape),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "timing": "GPU time, CUDA events" if dev.type == "cuda" else "CPU timings of the torch reference path",
        "backend": {op: select_backend(dev, op) for op in ("gemv", "gemm")},
        "cuda_gemv": _cuda_gemv_kernel(),  # which CUDA GEMV (tc / simt) M <= 8 ran on
        "cuda_gemm_m16": _cuda_gemm_kernel(),  # which GEMM tile (skinny / small) M 9..16 ran on
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
    if breakdown:
        result["breakdown"] = {"method": BREAKDOWN_METHOD, "float": bd_fp, "bitfuse": bd_q}
    if cuda_graphs:
        result["cuda_graphs"] = _graph_record(gr_fp, gr_q, ref, got, med)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"e2e_{model}_{recipe}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(format_markdown(result))
    return result


def _has_layer(model, fqn: str) -> bool:
    try:
        return isinstance(model.get_submodule(fqn), (torch.nn.Linear, torch.nn.Conv2d))
    except AttributeError:
        return False


def _graph_record(gr_fp, gr_q, ref, got, med) -> Dict[str, object]:
    """The --cuda-graphs part of the record: replay step times, and how far the replayed loop's
    final latents are from the eager loop's (they should match to rounding)."""
    if gr_fp.get("status") != "ok" or gr_q.get("status") != "ok":
        return {"status": gr_fp["status"] if gr_fp.get("status") != "ok" else gr_q["status"],
                "float": gr_fp.get("status"), "bitfuse": gr_q.get("status")}
    diff = lambda a, b: float((a["latents"].float() - b["latents"].float()).abs().max())  # noqa: E731
    return {"status": "ok",
            "float_step_ms": 1e3 * med(gr_fp["step_s"]), "bitfuse_step_ms": 1e3 * med(gr_q["step_s"]),
            "speedup": med(gr_fp["step_s"]) / med(gr_q["step_s"]),
            "max_abs_diff_vs_eager": {"float": diff(gr_fp, ref), "bitfuse": diff(gr_q, got)}}


def format_report(r: dict) -> str:
    o = r["orin"]
    lines = [
        f"bitfuse e2e: {r['model']} ({r['recipe']}: {r['config']}), {r['steps']} {r.get('sampler', 'DDIM')} steps, latents {r['latent_shape']}",
        f"device: {r['device']}, backend: gemv (M<=8) {r['backend']['gemv']}, gemm {r['backend']['gemm']}, "
        f"timing: {r['timing']}",
        f"per step: float ({r['float_dtype']}) {r['float_step_ms']:.2f} ms, bitfuse {r['bitfuse_step_ms']:.2f} ms "
        f"({r['speedup']:.2f}x)",
        f"weights: fp16 {r['weight_bytes_fp16'] / 2**20:.2f} MiB -> bitfuse {r['weight_bytes_bitfuse'] / 2**20:.2f} MiB "
        f"({r['weight_reduction']:.2f}x smaller; kept float: {', '.join(r.get('kept_float', [])) or 'none'})",
        f"final latents vs float: PSNR {r['fidelity']['psnr_db']:.2f} dB, cosine {r['fidelity']['cosine']:.5f}",
    ]
    if r["peak_mem_float"] is not None:
        lines.append(f"peak memory: float {r['peak_mem_float'] / 2**20:.1f} MiB, bitfuse {r['peak_mem_bitfuse'] / 2**20:.1f} MiB")
    g = r.get("cuda_graphs")
    if g is not None:
        if g["status"] == "ok":
            lines.append(f"CUDA graphs (replay per step): float {g['float_step_ms']:.2f} ms, bitfuse "
                         f"{g['bitfuse_step_ms']:.2f} ms ({g['speedup']:.2f}x); max |graph - eager| of the "
                         f"final latents: float {g['max_abs_diff_vs_eager']['float']:.2e}, "
                         f"bitfuse {g['max_abs_diff_vs_eager']['bitfuse']:.2e}")
        else:
            lines.append(f"--cuda-graphs {g['status']}")
    bd = r.get("breakdown")
    if bd is not None:
        lines.append("where the time goes (one profiled step with hooks; self time per layer type):")
        for side in ("float", "bitfuse"):
            b = bd[side]
            parts = ", ".join(f"{k} {b['per_type_ms'][k]:.2f} ms ({100 * b['fraction'][k]:.0f}%)"
                              for k in LAYER_TYPES if b["per_type_ms"][k] > 0 or k in ("QuantLinear", "QuantConv2d"))
            lines.append(f"  {side:7s} {b['step_ms']:.2f} ms: {parts}")
    lines.append(o["label"] + ": " + ", ".join(
        f"{k} ({o['bandwidth_gbs'][k]} GB/s, {o['fp16_tflops'][k]} fp16 TFLOP/s) >= "
        f"{o['roofline_ms'][k]:.3f} ms/step (memory {o['memory_bound_ms'][k]:.3f}, compute "
        f"{o['compute_bound_ms'][k]:.3f})" for k in o["memory_bound_ms"]))
    return "\n".join(lines)


def format_markdown(r: dict) -> str:
    """The record as markdown tables (written next to the JSON)."""
    mib = lambda n: "n/a" if n is None else f"{n / 2**20:.2f} MiB"  # noqa: E731
    lines = [
        f"# bitfuse e2e: {r['model']}, recipe {r['recipe']}", "",
        f"{r['steps']} {r.get('sampler', 'DDIM')} steps, latents {r['latent_shape']}, device **{r['device']}** "
        f"({r['timing']}), backend gemv {r['backend']['gemv']} / gemm {r['backend']['gemm']}, "
        f"bitfuse {r['versions']['bitfuse']}, torch {r['versions']['torch']}. Recipe: `{r['config']}`; "
        f"kept float: {', '.join(r.get('kept_float', [])) or 'none'}.", "",
        f"| | float ({r['float_dtype']}) | bitfuse | ratio |", "|---|---|---|---|",
        f"| per-step latency | {r['float_step_ms']:.2f} ms | {r['bitfuse_step_ms']:.2f} ms | {r['speedup']:.2f}x |",
        f"| weight bytes (fp16 deployment) | {mib(r['weight_bytes_fp16'])} | {mib(r['weight_bytes_bitfuse'])} "
        f"| {r['weight_reduction']:.2f}x smaller |",
        f"| peak memory | {mib(r['peak_mem_float'])} | {mib(r['peak_mem_bitfuse'])} | |",
    ]
    g = r.get("cuda_graphs")
    if g is not None and g["status"] == "ok":
        lines.append(f"| per-step latency, CUDA graph replay | {g['float_step_ms']:.2f} ms | "
                     f"{g['bitfuse_step_ms']:.2f} ms | {g['speedup']:.2f}x |")
    elif g is not None:
        lines.append(f"| CUDA graphs | {g['status']} | | |")
    f = r["fidelity"]
    lines += ["", f"Final latents vs float: PSNR {f['psnr_db']:.2f} dB, cosine {f['cosine']:.5f}.", ""]
    bd = r.get("breakdown")
    if bd is not None:
        lines += ["## Where the time goes (one profiled step, self time per layer type)", "",
                  "| layer type | float ms | float % | bitfuse ms | bitfuse % |", "|---|---|---|---|---|"]
        for k in LAYER_TYPES:
            a, b = bd["float"], bd["bitfuse"]
            lines.append(f"| {k} | {a['per_type_ms'][k]:.2f} | {100 * a['fraction'][k]:.0f} | "
                         f"{b['per_type_ms'][k]:.2f} | {100 * b['fraction'][k]:.0f} |")
        lines.append(f"| **profiled step** | {bd['float']['step_ms']:.2f} | 100 | {bd['bitfuse']['step_ms']:.2f} | 100 |")
        lines += ["", bd["method"], ""]
    o = r["orin"]
    lines += ["## Orin projection (not a measurement)", "", o["label"] + ".", "",
              "| device | DRAM GB/s | fp16 TFLOP/s | memory bound ms/step | compute bound ms/step | "
              "roofline ms/step |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {o['bandwidth_gbs'][k]} | {o['fp16_tflops'][k]} | {o['memory_bound_ms'][k]:.3f} | "
              f"{o['compute_bound_ms'][k]:.3f} | {o['roofline_ms'][k]:.3f} |" for k in o["memory_bound_ms"]]
    lines += ["", f"Bytes per step {o['bytes_per_step'] / 2**20:.2f} MiB, {o['flops_per_step'] / 1e9:.2f} "
              f"GFLOP; fp16 peak: {o['fp16_tflops_source']}."]
    return "\n".join(lines) + "\n"
