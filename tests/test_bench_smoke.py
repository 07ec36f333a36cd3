"""The benchmark script's reporting path, on CPU through the interpreter (it must not rot)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_bench_kernels_cpu_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "kernels", "--cpu-smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"]
    assert data["environment"]["cuda_gemv_default"] in ("tc", "simt")
    assert data["environment"]["cuda_gemm_m16_default"] in ("skinny", "small")
    assert data["results"][0]["m"] == 2
    md = (tmp_path / "kernels.md").read_text()
    assert "| square-smoke | 64 | 128 | 2 |" in md
    # the conv case goes through its own table (implicit GEMM vs im2col + the fused linear)
    assert [row["case"] for row in data["results"]] == ["square-smoke", "conv-smoke"]
    conv = data["results"][1]
    assert conv["kind"] == "conv2d" and conv["w4g128_us"] > 0 and conv["w4g128_im2col_us"] > 0
    assert "conv-smoke" in md


def test_bench_kernels_tables_render_every_gpu_column(tmp_path):
    """write_outputs with a row holding every column a GPU run records (the cuda backend, both
    CUDA GEMVs, the Triton crossover, tinygemm, gemlite): the tables a GPU run writes must not
    fail on its first try, where a crash costs device time."""
    from bitfuse.bench_kernels import RECIPES, write_outputs

    row = {"case": "square-4096", "n": 4096, "k": 4096, "m": 1, "dtype": "float16", "fp16_us": 20.0,
           "timing": "graph", "fp16_bw_frac": 0.9, "dequant_matmul_us": 40.0, "tinygemm_us": 9.0,
           "gemlite_us": 8.0, "gemv_path_us": 7.0, "gemm_path_us": 9.5}
    for r in RECIPES:
        row.update({f"{r}_us": 7.0, f"{r}_speedup": 2.9, f"{r}_bw_frac": 0.7, f"{r}_cuda_us": 6.0,
                    f"{r}_cuda_speedup": 3.3, f"{r}_cuda_bw_frac": 0.8, f"{r}_gemv_tc_us": 6.0,
                    f"{r}_gemv_tc_bw_frac": 0.8, f"{r}_gemv_simt_us": 8.0, f"{r}_gemv_simt_bw_frac": 0.6})
    env = {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "bitfuse": "0",
           "time": "2026-11-30T00:00:00Z"}
    write_outputs([row], env, str(tmp_path), 4000.0)
    md = (tmp_path / "kernels.md").read_text()
    assert "tensor cores (gemv_tc.cu) vs SIMT" in md
    assert "| square-4096 | 4096 | 4096 | 1 | w4g128 | 20.0 | 6.0 (0.80) | 8.0 (0.60) | tc |" in md
    assert json.loads((tmp_path / "kernels.json").read_text())["results"][0]["w4g128_gemv_tc_us"] == 6.0
