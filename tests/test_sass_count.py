"""benchmarks/static/sass_count.py, the static SASS count of the CUDA GEMVs and of the GEMM at small
M, on one architecture:
the probes compile, the hot loops are found, and the counts say what docs/STATUS.md says of them
(a tool that only runs by hand would rot)."""

import importlib.util
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("sass_count", os.path.join(ROOT, "benchmarks", "static", "sass_count.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sass_count_sm90():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    mod = _module()
    with tempfile.TemporaryDirectory() as d:
        rows = mod.count(90, d)
    by = {(r["kernel"], r["bits"], r["group"], str(r["m"])): r for r in rows}
    simt1, simt8 = by[("simt", 4, 128, "1")], by[("simt", 4, 128, "8")]
    tc = by[("tc", 4, 128, "1-8")]
    # every loop found holds its product instructions
    product = {"tc": "HMMA", "skinny": "HMMA", "gemm": "HMMA", "skinnycopy": "LDGSTS"}
    assert all(r["ops"].get(product.get(r["kernel"], "FFMA"), 0) > 0 for r in rows)
    # the SIMT GEMV pays an FFMA a weight per row of x; the tensor-core one does not depend on M
    assert simt8["per_weight"] > simt1["per_weight"] + 7
    assert tc["per_weight"] < simt1["per_weight"] < simt8["per_weight"]
    assert tc["ops"]["HMMA"] == 2 * 16  # two k16 steps a run, 16 runs an iteration, no residual
    assert mod.budget("H100 SXM", 4) == pytest.approx(5.0, abs=0.05)
    # the GEMM's main loop at M <= 16 dequantizes each weight in fp32 before its mma: costlier
    # than the tensor-core GEMV's exact-code decode
    gemm = by[("gemm", 4, 128, "9-16")]
    assert gemm["ops"]["HMMA"] > 0 and gemm["per_weight"] > tc["per_weight"]
    # the skinny tile (exact codes, scales per group) at M <= 16: far under the small tile's
    # count and within the H100's 4-bit issue budget; a k tile of a warp is 2 runs × 2 k16 steps
    # × (2 m16 tiles + Σx) × 2 n8 tiles of mma, no residual
    for g in (32, 64, 128):
        skinny = by[("skinny", 4, g, "9-16")]
        assert skinny["ops"]["HMMA"] == 2 * 2 * 3 * 2
        assert skinny["per_weight"] < 0.75 * gemm["per_weight"]
    assert by[("skinny", 4, 128, "9-16")]["per_weight"] < mod.budget("H100 SXM", 4)
    # its hoisted cp.async issue of an interior k tile: 4 copies a thread at 4-bit (2 of x, 2 of
    # weights), about one instruction a weight or less, so compute + copies fit the H100's budget
    copy4 = by[("skinnycopy", 4, 128, "9-16")]
    assert copy4["ops"]["LDGSTS"] == 4 and copy4["per_weight"] < 1.0
    assert by[("skinny", 4, 128, "9-16")]["per_weight"] + copy4["per_weight"] < mod.budget("H100 SXM", 4)
    assert by[("skinny", 3, 128, "9-16")]["per_weight"] < by[("gemm", 3, 128, "9-16")]["per_weight"]
