"""Backend selection, the CLI, and the GPU-free guarantees."""

import os
import subprocess
import sys

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear
from bitfuse import dispatch
from bitfuse.dispatch import BackendUnavailableError, select_backend


def _layer():
    torch.manual_seed(0)
    return QuantLinear.from_linear(torch.nn.Linear(64, 32), QuantConfig(bits=4, group_size=32))


def test_backends_reports_every_backend_with_a_reason():
    b = bitfuse.backends()
    assert set(b) == {"cuda", "triton", "torch"}
    assert b["torch"]["available"] is True
    for s in b.values():
        assert isinstance(s["reason"], str) and s["reason"]
    if not torch.cuda.is_available():
        assert b["cuda"]["available"] is False


def test_cpu_tensors_run_on_the_torch_reference():
    assert select_backend(torch.device("cpu")) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_forcing_an_unavailable_backend_is_an_error(monkeypatch, name):
    monkeypatch.setenv("BITFUSE_BACKEND", name)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = _layer()
    with pytest.raises(BackendUnavailableError, match=f"BITFUSE_BACKEND={name} requested but unavailable"):
        q(torch.randn(2, 64))


def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("BITFUSE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu")) == "triton"
    assert select_backend(torch.device("cpu"), "dequantize") == "torch"


@pytest.mark.parametrize("up", [("cuda", "triton"), ("cuda",), ("triton",), ()])
def test_automatic_order_per_op_on_a_gpu(monkeypatch, up):
    """ARCHITECTURE §4 per op, with the backends that are up pretended: cuda > triton for the
    linear's gemv/gemm, Triton's implicit GEMM for k×k convs (else im2col + the linear: "torch"),
    CUDA dequantize; nothing up → torch ops."""
    monkeypatch.delenv("BITFUSE_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "backends_status", lambda name: (name in up or name == "torch", "pretend"))
    gpu = torch.device("cuda")
    first = up[0] if up else "torch"
    assert select_backend(gpu, "gemv") == first and select_backend(gpu, "gemm") == first
    assert select_backend(gpu, "conv") == ("triton" if "triton" in up else "torch")
    assert select_backend(gpu, "dequantize") == ("cuda" if "cuda" in up else "torch")
    assert select_backend(torch.device("cpu"), "conv") == "torch"


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("BITFUSE_BACKEND", "opencl")
    with pytest.raises(BackendUnavailableError, match="not one of"):
        _layer()(torch.randn(2, 64))


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv("BITFUSE_BACKEND", "torch")
    q = _layer()
    x = torch.randn(2, 64)
    assert torch.allclose(q(x), x @ q.dequantize().t() + q.bias, atol=1e-5)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bitfuse.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bitfuse {bitfuse.__version__}"


def test_cli_backends():
    r = _cli("backends")
    assert r.returncode == 0 and "torch" in r.stdout and "cuda" in r.stdout


def test_cli_demo_reports_table_fidelity_and_backend():
    pytest.importorskip("diffusers")
    r = _cli("demo", "--cpu")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "bpw" in out and "total (" in out and "smaller" in out
    assert "PSNR" in out and "cosine" in out and "backend: torch on cpu" in out
    psnr = float(out.split("PSNR ")[1].split(" dB")[0])
    assert psnr > 30, psnr  # W4 g64 on the tiny UNet measures about 40 dB


def test_cli_bad_arguments_give_a_clear_error():
    r = _cli("demo", "--bits", "5")
    assert r.returncode == 2 and "QuantConfig.bits must be one of (2, 3, 4)" in r.stderr


class _NoCudaExt:
    """Stands in for a bitfuse._C built on a machine without nvcc (BITFUSE_CUDA=0)."""

    @staticmethod
    def cuda_built():
        return False

    @staticmethod
    def cuda_archs():
        return ""


@pytest.mark.parametrize("ext", [(_NoCudaExt, ""), (None, "bitfuse._C failed to import (test)")])
def test_package_works_without_cuda_in_the_extension(monkeypatch, ext):
    import bitfuse.dispatch as be

    monkeypatch.setattr(be, "_ext", lambda: ext)
    status = be.backends()["cuda"]
    assert status["available"] is False
    assert ("built without CUDA" in status["reason"]) if ext[0] else ("failed to import" in status["reason"])
    q = _layer()
    x = torch.randn(2, 64)
    assert torch.allclose(q(x), x @ q.dequantize().t() + q.bias, atol=1e-5)
