"""Dry-run plugin: run the `gpu` tests on the CPU with correct-by-construction stand-ins.

What it answers: would a GPU test pass if the kernel under test were exactly right? It catches
test-side defects (test data that does not build what the test's name says, assertions that
cannot hold, bounds that miss a rounding) before the one GPU run a session may get. It cannot
check the kernels themselves, CUDA-graph capture and replay, device counters returning to 0, or
real tensor-core accumulation order. Not part of CI (about 6 minutes for tests/test_gpu.py,
the GPU part of tests/test_lora.py and tests/test_hbp_cuda.py on 2 cores).
Stand-ins: torch.cuda reports an H200 (sm_90, 132 SMs); "cuda" tensors live on the CPU; the
CUDA GEMV/GEMM/dequantize/HBP/CSR kernels are their CPU twins in bitfuse._C (the same header
code); the Triton kernels run in the interpreter with the h100 table configs.

Load with (from the repository root):
  OMP_NUM_THREADS=1 PYTHONPATH=scripts/gpu_dryrun .venv/bin/pytest -p fakegpu -m gpu -p no:cacheprovider \
      tests/test_gpu.py tests/test_lora.py tests/test_hbp_cuda.py
Environment knobs:
  DRY_GEMM=twin|torch   backend_cuda.gemm via _C.gemm_host (default) or a torch emulation
  DRY_MAXM=<int>        cap on M for interpreter-heavy tests (not used by default)
"""
import contextlib
import os
import types

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

NOTES = []  # things the dry run could not check


def note(msg):
    NOTES.append(msg)


# ---- torch.cuda stubs (an H200: sm_90, 132 SMs) ---------------------------------------------------
_props = types.SimpleNamespace(multi_processor_count=132, shared_memory_per_multiprocessor=233472,
                               name="NVIDIA H200", total_memory=141 * 2**30, major=9, minor=0)


class _Stream:
    cuda_stream = 0

    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass


class _GraphSkip(Exception):
    pass


class _FakeGraph:
    def __init__(self, *a, **k):
        pass

    def replay(self):
        pytest.skip("dryrun: CUDA graph replay not emulated")


@contextlib.contextmanager
def _graph(*a, **k):
    pytest.skip("dryrun: CUDA graph capture not emulated (eager part before it passed)")
    yield


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H200"
torch.cuda.get_device_properties = lambda *a, **k: _props
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.current_stream = lambda *a, **k: _Stream()
torch.cuda.Stream = _Stream
torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
torch.cuda.is_current_stream_capturing = lambda: False
torch.cuda.CUDAGraph = _FakeGraph
torch.cuda.graph = _graph
torch.cuda.empty_cache = lambda: None


# ---- "cuda" devices -> cpu ------------------------------------------------------------------------
def _is_cuda(d):
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class _CpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


_CUDA0 = torch.device("cuda", 0)  # made before the mode, which maps torch.device("cuda") to cpu
_mode = _CpuMode()
_mode.__enter__()

torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self


# ---- bitfuse stand-ins ------------------------------------------------------------------------------
import bitfuse  # noqa: E402
from bitfuse import _C, dispatch  # noqa: E402
import bitfuse.backend_cuda as bc  # noqa: E402
import bitfuse.ops as ops_mod  # noqa: E402
import bitfuse.nn.linear as nnlin  # noqa: E402
import bitfuse.nn.conv as nnconv  # noqa: E402
from bitfuse.sparse import outliers, hbp as sphbp  # noqa: E402

_real_select = dispatch.select_backend


def _select(device, op="gemv"):
    if device.type == "cpu":
        device = _CUDA0
    return _real_select(device, op)


for _m in (dispatch, ops_mod, nnlin, nnconv):
    _m.select_backend = _select

_orig_cuda_status = dispatch._cuda_status
dispatch._cuda_status = lambda: (True, "dryrun: CPU twins stand in for the CUDA kernels")

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _np(t):
    return None if t is None else t.detach().contiguous().numpy()


def _scale_arrays(pw):
    if pw.compact_scales:
        return _np(pw.scale_codes), _np(pw.zero_codes), {"scale_rows": _np(pw.scale_rows)}
    return _np(pw.scales), _np(pw.zeros), {}


def _check_call(kernel, why, x, pw):
    if why:
        raise ValueError(f"bitfuse cuda {kernel}: {why}")
    if x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda {kernel}: device mismatch")
    bc._check(pw, x.device)
    if x.shape[1] != pw.in_features:
        raise ValueError(f"bitfuse cuda {kernel}: x has K={x.shape[1]}, the layer {pw.in_features}")


STATS = {"gemv": 0, "gemm": 0, "deq": 0}


def fake_dequantize_dense(pw, dtype):
    if dtype not in CODES:
        raise TypeError(dtype)
    bc._check(pw, pw.qweight.device)
    s, z, rows = _scale_arrays(pw)
    w = _C.dequantize_host(_np(pw.qweight), s, z, _np(pw.perm), _np(pw.res_index), _np(pw.res_plane),
                           _np(pw.res_alpha), list(pw.class_bits), list(pw.class_rows),
                           pw.out_features, pw.in_features, pw.k_pad, pw.group_size, **rows)
    STATS["deq"] += 1
    return torch.from_numpy(w).to(dtype)


def fake_gemv(x, pw, kernel=None):
    tensor_cores = bc._gemv_tensor_cores(pw, kernel)
    _check_call("gemv", bc.gemv_unsupported(x, pw), x, pw)
    x = x.contiguous()
    t, lr_up, extra, bias, r = bc._side_branches(x, pw)
    s, z, rows = _scale_arrays(pw)
    y = _C.gemv_host(x.float().numpy(), _np(pw.qweight), s, z, _np(pw.perm), _np(pw.res_index),
                     _np(pw.res_plane), _np(pw.res_alpha), _np(t), _np(lr_up), _np(extra), _np(bias),
                     list(pw.class_bits), list(pw.class_rows), pw.out_features, pw.in_features,
                     pw.k_pad, pw.group_size, **rows, tensor_cores=tensor_cores,
                     dtype=2 if x.dtype == torch.bfloat16 else 1)
    STATS["gemv"] += 1
    return torch.from_numpy(y).to(x.dtype)


def fake_gemm_plan(device_index, m, class_bits, class_rows, n, k, k_pad, group_size, split,
                   skinny=True):
    p = _C.gemm_plan_host(90, m, list(class_bits), list(class_rows), n, k, k_pad, group_size,
                          sms=132, split=split, skinny=skinny)
    p = dict(p)
    p["counter_slots"] = 1024
    p["counters"] = p["tiles"] if p["split"] > 1 else 0
    return p


def fake_gemm(x, pw, *, split=0, kernel=None):
    _check_call("gemm", bc.gemm_unsupported(x, pw), x, pw)
    if split < 0:
        raise ValueError("split")
    m, k = x.shape
    x = x.contiguous()
    t, lr_up, extra, bias, r = bc._side_branches(x, pw)
    plan = bc._gemm_plan(None, m, tuple(pw.class_bits), tuple(pw.class_rows), pw.out_features, k,
                         pw.k_pad, pw.group_size, split, bc.gemm_kernel(kernel) == "skinny")
    bc._split_counters(pw, plan["counter_slots"])
    STATS["gemm"] += 1
    if os.environ.get("DRY_GEMM", "twin") == "torch":
        # Ŵ (codes+residual) rounded to x's dtype, fp32 accumulation, fp32 epilogue, one cast.
        w = fake_dequantize_dense(pw, x.dtype).float()
        y = x.float() @ w.t()
        if t is not None:
            from bitfuse import reference
            y = y + t @ reference.to_output_order(lr_up.float(), pw).t()
        if extra is not None:
            y = y + extra
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)
    s, z, rows = _scale_arrays(pw)
    y, info = _C.gemm_host(x.float().numpy(), CODES[x.dtype], 90, _np(pw.qweight), s, z, _np(pw.perm),
                           _np(pw.res_index), _np(pw.res_plane), _np(pw.res_alpha), _np(t), _np(lr_up),
                           _np(extra), _np(bias), list(pw.class_bits), list(pw.class_rows),
                           pw.out_features, pw.in_features, pw.k_pad, pw.group_size, sms=132,
                           split=split, tile=plan["tile"], **rows)
    assert info["split"] == plan["split"], (info["split"], plan)
    return torch.from_numpy(y).to(x.dtype)


bc._check_call = _check_call
bc.dequantize_dense = fake_dequantize_dense
bc.gemv = fake_gemv
bc.gemm = fake_gemm
bc._gemm_plan = fake_gemm_plan

# ---- sparse: HBP (CUDA -> its CPU twin; Triton -> the interpreter), CSR baselines ----------------
_real_uses = outliers.uses_hbp


def fake_uses_hbp(pw, x):
    return (pw.sp_values is not None and x.dtype in outliers._X_DTYPES and x.dim() == 2
            and _C.cuda_built() and pw.sp_values.device == x.device)


outliers.uses_hbp = fake_uses_hbp
HBP_STATS = {"twin": 0, "triton": 0, "csr": 0}


def _bits(t):
    t = t.reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.element_size() == 2 else t.numpy()


HCODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def fake_cuda_product(self, x, x_stride_c, x_stride_j, y, y_stride_r, y_stride_j, m=None):
    m = x.shape[1] if m is None else int(m)
    if self.n_tiles == 0 or m == 0:
        y.zero_()
        return
    self.device_arrays()
    stage, warps = self.launch_params()
    # x's whole storage from its offset (strided reads), y written in place through its storage
    base = x.as_strided((x.untyped_storage().nbytes() // x.element_size() - x.storage_offset(),), (1,),
                        x.storage_offset())
    assert y.is_contiguous()
    ybuf = _bits(y).copy()
    _C.hbp_spmm_twin(self.layout, _bits(base.contiguous()), HCODES[x.dtype], x_stride_c, x_stride_j,
                     ybuf, HCODES[y.dtype], y_stride_r, y_stride_j, m, 8 * 132, warps, stage, 8)
    out = torch.from_numpy(ybuf.view(np.int16)).view(y.dtype) if ybuf.dtype == np.uint16 \
        else torch.from_numpy(ybuf)
    y.copy_(out.reshape(y.shape))
    HBP_STATS["twin"] += 1


sphbp.HBPMatrix.cuda_product = fake_cuda_product
_real_matmul = sphbp.HBPMatrix.matmul


def fake_matmul(self, x, kernel="auto"):
    n_rows, n_cols = self.shape
    if kernel not in sphbp.KERNELS:
        raise ValueError(kernel)
    if x.dim() not in (1, 2) or x.shape[0] != n_cols or x.dtype != self.dtype or x.device != self.device:
        return _real_matmul(self, x, kernel)  # its own errors
    x2 = x.detach().reshape(n_cols, 1) if x.dim() == 1 else x.detach()
    if kernel in ("cuda", "auto"):
        y = torch.empty(n_rows, x2.shape[1], dtype=self.dtype)
        self.cuda_product(x2, x2.stride(0), x2.stride(1), y, y.stride(0), y.stride(1))
    else:
        from bitfuse.kernels.hbp import hbp_spmm
        y = hbp_spmm(self.device_arrays(), x2, self.shape, self.tile_shape[1])
        HBP_STATS["triton"] += 1
    return y.reshape(n_rows) if x.dim() == 1 else y


sphbp.HBPMatrix.matmul = fake_matmul

import bitfuse.sparse.csr as spcsr  # noqa: E402
import bitfuse.sparse as sparse_pkg  # noqa: E402
_real_csr = spcsr.csr_spmv


def fake_csr(indptr, indices, values, x, kernel="vector", check=True, out=None):
    n_rows, n_cols = indptr.numel() - 1, x.shape[0]
    x2 = x.reshape(n_cols, 1) if x.dim() == 1 else x
    acc = np.float64 if x.dtype == torch.float64 else np.float32
    y = _C.csr_spmm_host(indptr.numpy(), indices.numpy(), values.numpy(), x2.numpy().astype(acc), kernel)
    y = torch.from_numpy(y).to(x.dtype)
    HBP_STATS["csr"] += 1
    return y.reshape(n_rows) if x.dim() == 1 else y


spcsr.csr_spmv = fake_csr
sparse_pkg.csr_spmv = fake_csr

# ---- Triton: compiled-GPU configs (h100 tables, 132 SMs) run in the interpreter --------------------
try:
    import bitfuse.kernels.launch as kl
    import bitfuse.kernels.conv_launch as kc
    import bitfuse.kernels.hbp as kh

    for _mod in (kl, kc):
        _mod.target_for = lambda device: "h100"
        _mod.interpreting = lambda: False
    _real_l_launch, _real_c_launch = kl._launch, kc._launch
    kl._launch = lambda *a: _real_l_launch(*a[:-1], True)  # interp=True: the bf16 tl.dot workaround
    kc._launch = lambda *a: _real_c_launch(*a[:-1], True)
    _real_fit = kc._fit
    kc._fit = lambda cfg, pw, m, row1, row2, sms: _real_fit(cfg, pw, m, row1, row2, 132)
    kh._programs = lambda device, n_tiles: max(1, min(n_tiles, 8 * 132))
except ImportError:
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: dryrun")


def pytest_collection_modifyitems(config, items):
    # the repo conftest skips gpu tests when torch.cuda.is_available() is False: it is True here
    for item in items:
        mod = item.module
        if mod.__name__ == "test_hbp_cuda":
            mod._cuda = lambda: torch.device("cpu")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"dryrun stats: {STATS} {HBP_STATS}")
