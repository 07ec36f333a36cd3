"""`bitfuse bench e2e` on the tiny model (CPU): it runs, reports honestly, and checks its input."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
from bitfuse.e2e import E2EError, run  # noqa: E402


def test_e2e_tiny_cli_writes_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "e2e", "--model", "tiny", "--steps", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CPU timings" in r.stdout and "PROJECTION" in r.stdout
    res = json.loads((tmp_path / "e2e_tiny_w4.json").read_text())
    for key in ("device", "versions", "backend", "recipe", "float_step_ms", "bitfuse_step_ms",
                "weight_bytes_fp16", "weight_bytes_bitfuse", "fidelity", "orin"):
        assert key in res, key
    assert res["weight_reduction"] > 2.5  # W4 g64 on linears and convs (small layers stay fp16)
    assert res["fidelity"]["cosine"] > 0.9
    assert res["orin"]["per_step_ms"]["Orin Nano"] > res["orin"]["per_step_ms"]["AGX Orin 64GB"] > 0


def test_e2e_bad_input(tmp_path):
    with pytest.raises(E2EError, match="unknown model 'sd99'"):
        run(model="sd99")
    with pytest.raises(E2EError, match="unknown recipe"):
        run(recipe="w9")
    with pytest.raises(E2EError, match="not a diffusers model folder"):
        run(model="tiny", path=str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(E2EError, match="could not load"):
        run(model="tiny", path=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "bitfuse.cli", "bench", "e2e", "--model", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
