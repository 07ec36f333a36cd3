"""Weight bytes of the e2e models under the e2e recipes (issue 7's "weight memory >= 3.5x
smaller" target), computed on the CPU: bytes depend on the packed layout, not on the device.

    python benchmarks/quality/bench_weight_bytes.py [--models sd15-unet,dit-xl-2] [--recipes w4,w3res]
                                                    [--append] [--out benchmarks/results/cpu]

Each model is built from its published config (random weights, bitfuse.e2e.build_denoiser) and
quantized as `bitfuse bench e2e` does (its recipes, the input/output layers kept float), with
round-to-nearest instead of the range search: the search changes values, not sizes. Recipes with
mixed precision are left out (their class split depends on the weights). Bytes are
bitfuse.e2e.weight_bytes (packed layers at their bpw, every other parameter in fp16), split
into what stays float by module type. Writes weight_bytes.json and weight_bytes.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import torch

RECIPES = ("w4", "w4g128", "w4c", "w3res", "w3resc")
EXTRA = {"+ embeddings": dict(embeddings=True)}  # DiT's label tables (QuantConfig.embeddings)


def measure(model: str, recipe: str, extra: dict) -> dict:
    from bitfuse import QuantConfig, quantize_
    from bitfuse.e2e import RECIPES as E2E, build_denoiser, weight_bytes
    from bitfuse.integrations.pipelines import keep_float_filter
    from bitfuse.nn import QuantLinear

    den = build_denoiser(model)
    fp16 = sum(2 * p.numel() for p in den.parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        quantize_(den, QuantConfig(target="auto", **E2E[recipe], **extra), filter_fn=keep_float_filter(),
                  calib_options={"method": "rtn"})
    left = collections.Counter()
    for m in den.modules():
        if not isinstance(m, QuantLinear):
            left[type(m).__name__] += sum(2 * p.numel() for p in m.parameters(recurse=False))
    total = weight_bytes(den)
    return {"model": model, "recipe": recipe + "".join(f" {k}" for k in extra), "fp16_bytes": fp16,
            "bitfuse_bytes": total, "reduction": fp16 / total,
            "float_bytes_by_type": {k: v for k, v in left.most_common() if v},
            "quantize_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd15-unet,dit-xl-2")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--append", action="store_true", help="keep the rows of weight_bytes.json this run does not redo")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = ap.parse_args(argv)
    import bitfuse

    rows = []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            for extra in ([{}] + ([v for v in EXTRA.values()] if model == "dit-xl-2" else [])):
                name = {json.dumps(v): k for k, v in EXTRA.items()}.get(json.dumps(extra))
                r = measure(model, recipe, extra)
                if name:
                    r["recipe"] = f"{recipe} {name}"
                rows.append(r)
                print(f"{model:12s} {r['recipe']:22s} {r['fp16_bytes'] / 2**20:8.1f} MiB -> "
                      f"{r['bitfuse_bytes'] / 2**20:7.1f} MiB = {r['reduction']:.2f}x", flush=True)
    path = os.path.join(args.out, "weight_bytes.json")
    if args.append and os.path.exists(path):
        with open(path) as f:
            done = {(r["model"], r["recipe"]) for r in rows}
            rows = [r for r in json.load(f)["rows"] if (r["model"], r["recipe"]) not in done] + rows
        order = {m: i for i, m in enumerate(dict.fromkeys(r["model"] for r in rows))}
        rows.sort(key=lambda r: (order[r["model"]], RECIPES.index(r["recipe"].split(" ")[0]), r["recipe"]))
    meta = {"device": "cpu (bytes do not depend on it)", "versions": {"bitfuse": bitfuse.__version__,
            "torch": torch.__version__, "python": platform.python_version()}}
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Weight bytes of the e2e models (fp16 deployment vs bitfuse)", "",
             "Built from the published configs, quantized as `bitfuse bench e2e` does (input/output layers "
             "float; benchmarks/quality/bench_weight_bytes.py). Issue 7's target: >= 3.5x smaller.", "",
             "| model | recipe | fp16 MiB | bitfuse MiB | smaller by | largest float parts (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in list(r["float_bytes_by_type"].items())[:3])
        lines.append(f"| {r['model']} | {r['recipe']} | {r['fp16_bytes'] / 2**20:.1f} | "
                     f"{r['bitfuse_bytes'] / 2**20:.1f} | {r['reduction']:.2f}x | {parts} |")
    with open(os.path.join(args.out, "weight_bytes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/weight_bytes.json and weight_bytes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
