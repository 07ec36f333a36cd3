"""benchmarks/bench_spmv.py (bitfuse.sparse.bench) reporting path on CPU in seconds, through
`bitfuse bench kernels --suite sparse --cpu-smoke`; and its geomean summary."""

import importlib.util
import json
import math
import subprocess
import sys

from bitfuse.sparse import bench


def test_bench_spmv_cpu_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "kernels", "--suite", "sparse",
                        "--cpu-smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "spmv.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"]
    assert [row["matrix"] for row in data["results"]] == ["rmat", "poisson2d", "dense_row"]
    # checked, not just timed: within the fp32 accumulation bound (seeded x)
    assert all(0 < row["hbp_cuda_err_bound"] and row["hbp_cuda_max_rel_err"] <= row["hbp_cuda_err_bound"]
               for row in data["results"])
    assert "power-law" in (tmp_path / "spmv.md").read_text()
    # The plot is optional (matplotlib is the `bench` extra): made exactly when it can be.
    assert (tmp_path / "spmv.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_summary_geomeans():
    rows = [{"matrix": "rmat_s18", "hbp_cuda_speedup": 2.0}, {"matrix": "rmat_s20", "hbp_cuda_speedup": 8.0},
            {"matrix": "poisson", "hbp_cuda_speedup": 0.5}, {"matrix": "banded"}]
    s = bench.summarize(rows)["hbp_cuda"]
    assert s["cases"] == 3
    assert math.isclose(s["geomean_power_law"], 4.0) and math.isclose(s["geomean_all"], 2.0)


def test_preprocess_bench_small_suite(tmp_path):
    """benchmarks/bench_sparse_preprocess.py: whole-build and ordering-step times per method, both
    tables written; the ordering step is part of the build, so never longer than it."""
    script = __import__("pathlib").Path(__file__).parents[1] / "benchmarks" / "bench_sparse_preprocess.py"
    r = subprocess.run([sys.executable, str(script), "--size", "small", "--repeats", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "sparse_preprocess.json").read_text())
    for row in data["rows"]:
        for m in ("hash", "sort", "dp"):
            assert 0 <= row[f"{m}_order_s"] <= row[f"{m}_s"] + 1e-5, (row["matrix"], m)  # (s rounded to 5 digits)
    assert set(data["meta"]["geomean"]) == {"sort_over_hash", "dp_over_hash", "order_sort_over_hash",
                                            "order_dp_over_hash"}
    assert "## The ordering step alone" in (tmp_path / "sparse_preprocess.md").read_text()
