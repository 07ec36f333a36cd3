"""The Triton kernels compile for every target arch (sm_86/87/89/90) without a GPU, and fit.

The interpreter tests check what the kernels compute; these check what only the real compiler
knows: that every launch the config tables can produce lowers through ptxas for each arch, and
that its shared memory fits the arch's per-block limit (a launch over it fails on the GPU with
OutOfResources). They run `python -m bitfuse.kernels.aot` in a child process, because kernels
defined under TRITON_INTERPRET=1 (as in this test process) cannot be compiled.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ARCHS = (86, 87, 89, 90)
# Every kernel the Triton backend launches; the AOT cases must reach each of them on every arch.
KERNELS = {"fused_linear_kernel", "lowrank_down_kernel", "splitk_epilogue_kernel", "conv2d_kernel",
           "conv_lowrank_down_kernel", "hbp_tiles_kernel", "hbp_reduce_kernel"}


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    return env


def _run(args, tmp_path, timeout=1500):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=timeout)


def test_every_table_config_compiles_and_fits_on_every_arch(tmp_path):
    out = tmp_path / "aot.json"
    r = _run(["-m", "bitfuse.kernels.aot", "--arch", ",".join(map(str, ARCHS)), "--quiet", "--jobs",
              str(min(4, os.cpu_count() or 1)), "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["smem_over"] == []
    for arch in ARCHS:
        got = {k["kernel"] for k in report["kernels"] if k["arch"] == arch}
        assert got == KERNELS, f"sm_{arch}: compiled {sorted(got)}, expected {sorted(KERNELS)}"
    for arch in ARCHS:
        # Every code width's K loop was compiled, for the linear and the conv kernel, and 3 classes
        for name in ("fused_linear_kernel", "conv2d_kernel"):
            ks = [k for k in report["kernels"] if k["arch"] == arch and k["kernel"] == name]
            widths = {int(b) for k in ks for b in re.findall(r"BITS\d=(\d)", k["constexprs"])}
            assert widths >= ({2, 3, 4} if name == "fused_linear_kernel" else {3, 4}), (arch, name, widths)
        assert any("N_CLASSES=3" in k["constexprs"] for k in report["kernels"] if k["arch"] == arch)
    for k in report["kernels"]:
        if "w4g128" in k["case"] and k["kernel"] == "fused_linear_kernel":  # labels match what compiled
            assert "BITS0=4" in k["constexprs"] and "N_CLASSES=1" in k["constexprs"], k
        assert 0 < k["regs"] <= 255, k
        # Table configs should not live in local memory; a few stack bytes are tolerated (triton
        # keeps small index arrays there on some archs), real spills are not.
        assert k["stack_bytes"] <= 16 and k["local_bytes"] == 0, k


BAD = textwrap.dedent("""
    import json, sys
    import torch, triton, triton.language as tl
    from bitfuse.kernels import aot

    @triton.jit
    def tiny_dot(a, b, c, BLOCK: tl.constexpr):
        # tl.dot needs tiles of at least 16: the interpreter runs this, the compiler refuses it.
        r = tl.arange(0, BLOCK)
        x = tl.load(a + r[:, None] * BLOCK + r[None, :])
        y = tl.load(b + r[:, None] * BLOCK + r[None, :])
        tl.store(c + r[:, None] * BLOCK + r[None, :], tl.dot(x, y))

    @triton.jit
    def big_dot(a, b, c, K, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            x = tl.load(a + r[:, None] * K + k + r[None, :])
            y = tl.load(b + (k + r[:, None]) * BLOCK + r[None, :])
            acc += tl.dot(x, y)
        tl.store(c + r[:, None] * BLOCK + r[None, :], acc)

    rec, case, out = [], ["tiny"], {}
    with aot.compile_only(90, rec, case):
        t = torch.zeros(8, 8, dtype=torch.float16)
        try:
            tiny_dot[(1,)](t, t, t, BLOCK=8)
            out["tiny"] = "compiled"
        except Exception as e:
            out["tiny"] = type(e).__name__ + ": " + str(e)[-300:]
        case[0] = "big"
        a = torch.zeros(256, 1024, dtype=torch.float16)
        big_dot[(1,)](a, a, a, 1024, BLOCK=256, num_stages=4)
    out["big"] = [(r.kernel, r.shared, r.smem_ok) for r in rec if r.case == "big"]
    print(json.dumps(out))
""")


def test_the_check_catches_a_compile_error_and_a_shared_memory_overflow(tmp_path):
    """A check that cannot fail would prove nothing: two kernels the interpreter runs happily, one
    that ptxas/triton refuse to compile and one that needs more than sm_90's 227 KB a block."""
    script = tmp_path / "bad.py"
    script.write_text(BAD)
    r = _run([str(script)], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tiny"].startswith("CompilationError") and "16" in out["tiny"], out["tiny"]
    (name, shared, ok), = out["big"]
    assert name == "big_dot" and shared > 227 * 1024 and not ok


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="this process compiles kernels")
def test_compile_only_refuses_interpreted_kernels():
    from bitfuse.kernels import aot

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.compile_only(90, [], [""]):
            pass


@pytest.mark.parametrize("args,message", [
    (["--arch", "80"], "--arch must name some of"), (["--arch", "sm90"], "comma-separated numbers"),
    (["--families", "linear,gemv"], "--families must name some of")])
def test_bad_arguments_are_refused_with_the_choices(tmp_path, args, message):
    r = _run(["-m", "bitfuse.kernels.aot", *args], tmp_path, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
