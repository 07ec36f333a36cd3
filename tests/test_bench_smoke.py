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
    assert data["results"][0]["m"] == 2
    md = (tmp_path / "kernels.md").read_text()
    assert "| square-smoke | 64 | 128 | 2 |" in md
    # the conv case goes through its own table (implicit GEMM vs im2col + the fused linear)
    assert [row["case"] for row in data["results"]] == ["square-smoke", "conv-smoke"]
    conv = data["results"][1]
    assert conv["kind"] == "conv2d" and conv["w4g128_us"] > 0 and conv["w4g128_im2col_us"] > 0
    assert "conv-smoke" in md
