"""Output fidelity of the tiny diffusers pipelines, quantized whole (CPU, torch reference path).

    python benchmarks/quality/bench_pipelines.py [--out benchmarks/results/cpu]

Each tiny pipeline of bitfuse.integrations.pipelines (random weights, built from configs, its
own scheduler) runs 4 steps in float and after quantize_pipeline with each recipe, from the
same noise (run_tiny_pipeline, seeds 0-2); the table gives the mean PSNR and cosine of the final
latents. quantize_pipeline keeps the denoiser's input and output layers float by default
(DENOISER_KEEP_FLOAT); the last column quantizes them too (keep_float=()), at W4 g32. These are
the measurements tests/test_pipelines.py sets its fidelity floors from: a few dB under the
recipe it tests, and above what a deliberately worse recipe (all W2) reaches. Random-weight
models amplify weight error more than trained ones (nothing is smooth), so the absolute dB say
little about a real model; the table is for regressions and for choosing the floors.
Writes pipelines.json and pipelines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

# (name, builder(tmpdir), components quantized); the text encoders where the pipeline has them
PIPELINES = (
    ("sd (UNet + CLIP)", "tiny_sd_pipeline", ("unet", "text_encoder")),
    ("dit", "tiny_dit_pipeline", ("transformer",)),
    ("pixart-alpha", "tiny_pixart_pipeline", ("transformer",)),
    ("sd3 (+ both CLIP)", "tiny_sd3_pipeline", ("transformer", "text_encoder", "text_encoder_2")),
    ("flux", "tiny_flux_pipeline", ("transformer",)),
)
RECIPES = {  # name -> (QuantConfig kwargs, quantize_pipeline's keep_float; None: its default)
    "W4 g64": (dict(bits=4, group_size=64), None),
    "W4 g32": (dict(bits=4, group_size=32), None),
    "W3 g32 + residual": (dict(bits=3, group_size=32, residual=True), None),
    "W2 g32": (dict(bits=2, group_size=32), None),
    "W4 g32, in/out layers too": (dict(bits=4, group_size=32), ()),
}
SEEDS = (0, 1, 2)


def _build(builder: str, tmp: str):
    from bitfuse.integrations import pipelines

    fn = getattr(pipelines, builder)
    return fn(tmp) if builder in ("tiny_sd_pipeline", "tiny_sd3_pipeline") else fn()


def measure() -> list:
    from bitfuse import QuantConfig
    from bitfuse.cli import fidelity
    from bitfuse.integrations.pipelines import quantize_pipeline, run_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, builder, comps in PIPELINES:
            float_pipe = _build(builder, tmp)
            refs = [run_tiny_pipeline(float_pipe, seed=s) for s in SEEDS]
            for recipe, (kw, keep) in RECIPES.items():
                pipe = _build(builder, tmp)
                t0 = time.perf_counter()
                quantize_pipeline(pipe, QuantConfig(**kw), components=comps,
                                  **({} if keep is None else {"keep_float": keep}))
                quant_s = time.perf_counter() - t0
                fids = [fidelity(r, run_tiny_pipeline(pipe, seed=s)) for s, r in zip(SEEDS, refs)]
                psnr, cos = (sum(f[k] for f in fids) / len(fids) for k in ("psnr_db", "cosine"))
                rows.append({"pipeline": name, "components": list(comps), "recipe": recipe, "config": kw,
                             "keep_float": "default" if keep is None else list(keep),
                             "psnr_db": psnr, "cosine": cos, "psnr_db_per_seed": [f["psnr_db"] for f in fids],
                             "quantize_s": quant_s})
                print(f"{name:20s} {recipe:26s} {psnr:6.2f} dB  cos {cos:.5f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = ap.parse_args(argv)
    import diffusers
    import transformers

    import bitfuse

    rows = measure()
    meta = {"device": f"cpu ({platform.processor() or 'unknown'})", "threads": torch.get_num_threads(),
            "versions": {"bitfuse": bitfuse.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "steps": 4, "seeds": list(SEEDS), "backend": "torch reference (CPU)"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pipelines.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    recipes = list(RECIPES)
    lines = ["# Tiny diffusers pipelines, quantized whole: fidelity of the final latents", "",
             f"{meta['device']}, torch {meta['versions']['torch']}, diffusers {meta['versions']['diffusers']}, "
             f"bitfuse {meta['versions']['bitfuse']}; 4 steps of each pipeline's own scheduler, random weights "
             "built from configs (benchmarks/quality/bench_pipelines.py). Mean PSNR in dB (cosine) over seeds "
             f"{list(SEEDS)} of the quantized pipeline's final latents against the float pipeline's, same "
             "noise. The denoiser's input and output layers stay float (quantize_pipeline's default "
             "keep_float) except in the last column.", "",
             "| pipeline (components) | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for name, _, comps in PIPELINES:
        cells = {r["recipe"]: r for r in rows if r["pipeline"] == name}
        lines.append(f"| {name} ({', '.join(comps)}) | " + " | ".join(
            f"{cells[k]['psnr_db']:.1f} ({cells[k]['cosine']:.4f})" for k in recipes) + " |")
    lines += ["", "tests/test_pipelines.py asserts floors a few dB under these (for the recipe each test "
              "uses) and above the all-W2 column, so a broken layer fails them."]
    with open(os.path.join(args.out, "pipelines.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/pipelines.json and pipelines.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
