"""Calling a CUDA entry point on a machine without a usable GPU must raise, never crash."""

import subprocess
import sys
import textwrap

import pytest


def assert_fails_cleanly_without_gpu(call: str, covered_by: str) -> None:
    """Run `call` (Python source using `_C`) in a fresh interpreter, so a crash is a test failure
    and not a dead pytest; it must raise RuntimeError (saying 'built without CUDA' when so)."""
    code = textwrap.dedent("""
        from bitfuse import _C
        n = _C.cuda_device_count()
        print("devices", n, "|", _C.cuda_status())
        if n > 0:
            print("HAS_GPU")
            raise SystemExit(0)
        try:
            # Aligned, non-null fake pointers: they must never be dereferenced on the host.
            {call}
        except RuntimeError as e:
            print("RuntimeError:", e)
        else:
            print("NO ERROR")
    """).replace("{call}", call)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    if "HAS_GPU" in r.stdout:
        pytest.skip(f"a CUDA device is usable here; {covered_by}")
    assert "RuntimeError:" in r.stdout, r.stdout
    from bitfuse import _C

    if not _C.cuda_built():
        assert "built without CUDA" in r.stdout
