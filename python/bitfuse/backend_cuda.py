"""The `cuda` backend: bitfuse._C kernels called with raw pointers (no libtorch link).

Kernels: the dense dequantize (codes + residual, inverse permutation fused into the store), the
fused GEMV for M <= 8 (two of them: csrc/cuda/gemv_tc.cu on the tensor cores, the default, and the
SIMT csrc/cuda/gemv.cu; `BITFUSE_CUDA_GEMV=simt|tc` or gemv(..., kernel=) chooses) and the fused
tensor-core GEMM for larger M
(csrc/cuda/gemm.cu, mma.sync m16n8k16 with a cp.async pipeline; at M <= 16 its skinny tile,
`BITFUSE_CUDA_GEMM=skinny|small` or gemm(..., kernel=) chooses). Both fused kernels take the codes
of every bit class, the residual, the low-rank up-projection, the sparse product and the bias in
one launch and store through perm. `linear` runs the GEMV for M <= 8 and the GEMM otherwise
(fp16/bf16 x); fp32 x keeps CUDA dequantize + cuBLAS. The GEMM splits K across blocks when its
grid is smaller than the GPU (small M × small N): see gemm() for the workspace and counters it
needs. Unverified on a GPU: see docs/STATUS.md.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch

from . import reference
from .dispatch import extension
from .format import PackedWeight
from .sparse import outliers

_OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_MAX_M = 8       # gemv.h kMaxM
_GEMV_ROW_BLOCK = 16  # gemv.h / gemv_tc.h kRowsPerBlock: bit-class boundaries must be multiples of it
GEMV_KERNELS = ("tc", "simt")  # the first is the default


def gemv_kernel(kernel: str | None = None) -> str:
    """Which CUDA GEMV runs M <= 8: `kernel` if given, else $BITFUSE_CUDA_GEMV, else "tc".

    "tc" (csrc/cuda/gemv_tc.cu) multiplies on the tensor cores with the codes exact in the A
    operand and the scales applied per group; "simt" (csrc/cuda/gemv.cu) dequantizes every weight
    to fp32 and multiplies with fp32 fmas. The default is reasoned from their SASS (instructions
    a weight, docs/STATUS.md), not measured: the first GPU benchmark decides.
    """
    return _kernel_choice(kernel, "BITFUSE_CUDA_GEMV", GEMV_KERNELS, "GEMV kernel")


def _kernel_choice(kernel: str | None, env: str, choices: tuple, what: str) -> str:
    """`kernel` if given, else $env, else choices[0] (the default); a name not in choices is an
    error that names where it came from."""
    name = (kernel if kernel is not None else os.environ.get(env, "")).strip().lower()
    if not name:
        return choices[0]
    if name not in choices:
        raise ValueError(f"bitfuse cuda {what} must be one of {choices}, got {name!r} ({env} or kernel=)")
    return name


TC_GROUP_SIZES = (32, 64, 128)  # gemv_tc.cu: a group is 1, 2 or 4 runs of its unrolled 8-run block
GEMM_TILES = ("skinny", "small")  # what the GEMM runs M <= 16 on (gemm_kernel); the first: default
SKINNY_MAX_M = 16  # gemm.h kSkinnyMaxM


def gemm_kernel(kernel: str | None = None) -> str:
    """Which GEMM tile runs M <= 16 (groups of 32/64/128): `kernel` if given, else
    $BITFUSE_CUDA_GEMM, else "skinny".

    "skinny" (gemm.h "Skinny tile") multiplies the exact codes with x on the tensor cores and
    applies the scales per group, as the tensor-core GEMV does, in the GEMM's pipeline; "small"
    is the small-M tile, which dequantizes every weight and rounds it to x's dtype. The default
    is reasoned from their SASS (docs/STATUS.md), not measured: the first GPU benchmark decides.
    """
    return _kernel_choice(kernel, "BITFUSE_CUDA_GEMM", GEMM_TILES, "GEMM tile")


def _gemv_tensor_cores(pw: PackedWeight, kernel: str | None) -> bool:
    """Whether gemv() runs the tensor-core kernel: as gemv_kernel says, except that a layer whose
    group size it does not take runs on the SIMT one unless "tc" was asked for by name."""
    if gemv_kernel(kernel) != "tc":
        return False
    if pw.group_size in TC_GROUP_SIZES:
        return True
    if kernel is not None or os.environ.get("BITFUSE_CUDA_GEMV", "").strip():
        raise ValueError(f"bitfuse cuda gemv: the tensor-core GEMV takes group sizes {TC_GROUP_SIZES}, "
                         f"this layer has {pw.group_size} (use kernel='simt')")
    return False


def _check(pw: PackedWeight, device: torch.device) -> None:
    for name, t in pw.tensors.items():
        if t.device != device:
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' must be contiguous")
        if t.data_ptr() % 4:
            raise ValueError(f"bitfuse cuda backend: tensor '{name}' must be 4-byte aligned")


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _scale_ptrs(pw: PackedWeight):
    """(scales_ptr, zeros_ptr) for either scale form: the fp16 pairs, or the uint8 compact codes
    (FORMAT.md §5.1), which the kernels recognise by scale_rows_ptr != 0."""
    if pw.compact_scales:
        return _ptr(pw.scale_codes), _ptr(pw.zero_codes)
    return _ptr(pw.scales), _ptr(pw.zeros)


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Codes + residual as an (N, K) weight in original order, on the GPU."""
    q = pw.qweight
    if q.device.type != "cuda":
        raise ValueError(f"bitfuse cuda backend needs CUDA tensors, got {q.device}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"bitfuse cuda backend: output dtype must be fp32/fp16/bf16, got {dtype}")
    _check(pw, q.device)
    out = torch.empty(pw.out_features, pw.in_features, dtype=dtype, device=q.device)
    extension().dequantize_cuda(
        _ptr(q), *_scale_ptrs(pw), _ptr(pw.perm), _ptr(pw.res_index),
        _ptr(pw.res_plane), _ptr(pw.res_alpha), _ptr(out), list(pw.class_bits),
        list(pw.class_rows), pw.out_features, pw.in_features, pw.k_pad, pw.group_size,
        _OUT_DTYPES[dtype], torch.cuda.current_stream(q.device).cuda_stream,
        scale_rows_ptr=_ptr(pw.scale_rows),
    )
    return out


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = dequantize_dense(pw, torch.float32)
    if pw.lr_down is not None:
        w = w + reference.lowrank_weight(pw)
    if pw.sp_values is not None:
        w = w + reference.sparse_weight(pw)
    return w.to(dtype)


def gemv_unsupported(x: torch.Tensor, pw: PackedWeight):
    """None if the fused GEMV can run (x, pw) as they are, else the reason it cannot."""
    if x.dim() != 2:
        return f"x must be 2-D (M, K), got shape {tuple(x.shape)}"
    if not 1 <= x.shape[0] <= GEMV_MAX_M:
        return f"the GEMV takes 1..{GEMV_MAX_M} rows of x, got M={x.shape[0]}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the GEMV takes fp16 or bf16 activations, got {x.dtype}"
    first = 0
    for rows in list(pw.class_rows)[:-1]:
        first += rows
        if first % _GEMV_ROW_BLOCK:
            return (f"bit-class boundaries must be multiples of {_GEMV_ROW_BLOCK} rows "
                    f"(FORMAT.md §4), got class_rows {list(pw.class_rows)}")
    return None


def gemv(x: torch.Tensor, pw: PackedWeight, kernel: str | None = None) -> torch.Tensor:
    """The fused layer for M <= 8 rows of x (fp16/bf16) in one CUDA launch: the tensor-core GEMV
    (csrc/cuda/gemv_tc.cu) or the SIMT one (csrc/cuda/gemv.cu), as gemv_kernel(kernel) says.

    The low-rank down-projection t = x·L_downᵀ·diag(lr_scale) (M, r) and the sparse product
    (M, N) are computed here in fp32 with torch and handed to the kernel, which adds t·L_upᵀ,
    them and the bias in its epilogue and stores through the permutation. 128-bit loads are used
    where the data is 16-byte aligned; the kernel falls back to narrower loads elsewhere, so any
    contiguous input works.
    """
    tensor_cores = _gemv_tensor_cores(pw, kernel)
    _check_call("gemv", gemv_unsupported(x, pw), x, pw)
    x = x.contiguous()
    m, k = x.shape
    n = pw.out_features
    t, lr_up, extra, bias, r = _side_branches(x, pw)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    extension().gemv_cuda(
        _ptr(x), _ptr(out), _ptr(pw.qweight), *_scale_ptrs(pw), _ptr(pw.perm),
        _ptr(pw.res_index), _ptr(pw.res_plane), _ptr(pw.res_alpha), _ptr(t), _ptr(lr_up),
        _ptr(extra), _ptr(bias), list(pw.class_bits), list(pw.class_rows), m, n, k, pw.k_pad,
        pw.group_size, r, _OUT_DTYPES[x.dtype], torch.cuda.current_stream(x.device).cuda_stream,
        scale_rows_ptr=_ptr(pw.scale_rows), tensor_cores=tensor_cores,
    )
    return out


def _check_call(kernel: str, why, x: torch.Tensor, pw: PackedWeight) -> None:
    """The checks both fused kernels make before a launch, with errors naming the kernel."""
    if why:
        raise ValueError(f"bitfuse cuda {kernel}: {why}")
    if x.device.type != "cuda" or x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda {kernel}: x is on {x.device}, weights on {pw.qweight.device}; "
                         "both must be on the same CUDA device")
    _check(pw, x.device)
    if x.shape[1] != pw.in_features:
        raise ValueError(f"bitfuse cuda {kernel}: x has K={x.shape[1]}, the layer {pw.in_features}")


def _side_branches(x: torch.Tensor, pw: PackedWeight):
    """(t, lr_up, extra, bias, r) that the fused kernels add in their epilogue: t = x·L_downᵀ·
    diag(lr_scale) (M, r) fp32, lr_up fp16, the sparse product (M, N) fp32, bias fp32; None when
    the layer has no such branch."""
    t = lr_up = extra = None
    r = 0
    if pw.lr_down is not None:
        t = ((x.float() @ pw.lr_down.float().t()) * pw.lr_scale.float()).contiguous()
        lr_up = pw.lr_up.to(torch.float16).contiguous()
        r = t.shape[1]
    if pw.sp_values is not None:
        extra = outliers.apply(pw, x).contiguous()
    bias = None if pw.bias is None else pw.bias.float().contiguous()
    return t, lr_up, extra, bias, r


def gemm_unsupported(x: torch.Tensor, pw: PackedWeight):
    """None if the fused GEMM can run (x, pw) as they are, else the reason it cannot."""
    if x.dim() != 2:
        return f"x must be 2-D (M, K), got shape {tuple(x.shape)}"
    if x.shape[0] < 1:
        return "x has no rows"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the GEMM takes fp16 or bf16 activations, got {x.dtype}"
    return None


@functools.lru_cache(maxsize=4096)
def _gemm_plan(device_index: int, m: int, class_bits: tuple, class_rows: tuple, n: int, k: int,
               k_pad: int, group_size: int, split: int, skinny: bool = True) -> dict:
    """gemm_cuda_plan on a device (tile, S, workspace bytes, counters): shapes and device only,
    so it is cached, and computing it inside a CUDA-graph capture does no CUDA work."""
    with torch.cuda.device(device_index):
        return extension().gemm_cuda_plan(m, list(class_bits), list(class_rows), n, k, k_pad,
                                          group_size, split, skinny=skinny)


# id(qweight) -> (weak ref to that tensor, int32 split-K counters on its device). Keyed by id,
# not by the tensor (a tensor's == is elementwise), and dropped when the tensor dies.
_COUNTERS: dict = {}


def _split_counters(pw: PackedWeight, slots: int) -> torch.Tensor:
    """The layer's split-K counters: zeroed once here, at the layer's first GEMM call (whatever
    its M, so that a graph captured after any eager call finds them); the kernel leaves every
    counter at 0 after each launch (its last block per tile resets its own), so later calls and
    CUDA graphs need no memset. One layer running on two streams at the same time would share
    them: unsupported (as HBP's counter)."""
    q = pw.qweight
    hit = _COUNTERS.get(id(q))
    if hit is not None and hit[0]() is q and hit[1].numel() >= slots:
        return hit[1]
    with torch.cuda.device(q.device):
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        raise RuntimeError(
            "bitfuse cuda gemm: this layer's split-K counters are allocated and zeroed at its first "
            "GEMM call (M > 8); run the layer once eagerly before capturing a CUDA graph")
    c = torch.zeros(slots, dtype=torch.int32, device=q.device)
    if hit is None or hit[0]() is not q:
        weakref.finalize(q, _COUNTERS.pop, id(q), None)
    _COUNTERS[id(q)] = (weakref.ref(q), c)
    return c


def gemm(x: torch.Tensor, pw: PackedWeight, *, split: int = 0, kernel: str | None = None) -> torch.Tensor:
    """The fused layer for any M (meant for M > 8) of fp16/bf16 x in one CUDA launch
    (csrc/cuda/gemm.cu): tensor cores (mma.sync m16n8k16, fp32 accumulation), every bit class,
    residual, low-rank up, sparse and bias in the epilogue, stored through perm. For M <= 16 with
    groups of 32/64/128 the skinny tile multiplies the exact codes and applies the scales per
    group in fp32; otherwise (or with kernel="small", see gemm_kernel) the product is x times Ŵ
    rounded to x's dtype. The kernel streams x in 16-byte rows: x is copied into a zero-padded
    buffer whose rows are a multiple of 8 elements when K is not, or when x is not 16-byte aligned.

    Small grids (small M × small N against the GPU's SMs) are split along K across blocks
    (gemm_config.h plan_split; `split` >= 1 forces S, for tests and benchmarks; 0 lets the plan
    choose): the fp32 partials go to a torch.empty workspace whose size depends only on the
    shapes and the device, and the per-tile counters are the layer's (_split_counters), so a
    call is CUDA-graph safe once the layer has run eagerly.
    """
    _check_call("gemm", gemm_unsupported(x, pw), x, pw)
    if split < 0:
        raise ValueError(f"bitfuse cuda gemm: split must be >= 0 (0: chosen by the plan), got {split}")
    m, k = x.shape
    n = pw.out_features
    x = x.contiguous()
    lda = -(-k // 8) * 8
    if lda != k:
        x = torch.nn.functional.pad(x, (0, lda - k))  # a fresh (hence aligned) (m, lda) copy
    elif x.data_ptr() % 16:
        x = x.clone()
    t, lr_up, extra, bias, r = _side_branches(x[:, :k], pw)
    nr = 0 if pw.res_plane is None else pw.res_plane.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    skinny = gemm_kernel(kernel) == "skinny"
    plan = _gemm_plan(x.device.index, m, tuple(pw.class_bits), tuple(pw.class_rows), n, k,
                      pw.k_pad, pw.group_size, split, skinny)
    counters = _split_counters(pw, plan["counter_slots"])
    ws = None
    if plan["split"] > 1:
        ws = torch.empty(plan["workspace_bytes"] // 4, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):  # the launch goes to the current device: make it x's
        extension().gemm_cuda(
            _ptr(x), lda, _ptr(out), _ptr(pw.qweight), *_scale_ptrs(pw),
            _ptr(pw.perm), _ptr(pw.res_index), _ptr(pw.res_plane), _ptr(pw.res_alpha), nr, _ptr(t),
            _ptr(lr_up), _ptr(extra), _ptr(bias), list(pw.class_bits), list(pw.class_rows), m, n,
            k, pw.k_pad, pw.group_size, r, _OUT_DTYPES[x.dtype],
            torch.cuda.current_stream(x.device).cuda_stream,
            workspace_ptr=_ptr(ws), workspace_bytes=plan["workspace_bytes"] if ws is not None else 0,
            counters_ptr=_ptr(counters), counters_len=counters.numel(),
            split=plan["split"], scale_rows_ptr=_ptr(pw.scale_rows), skinny=skinny,
        )
    return out


def linear(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """fp16/bf16 x: the fused GEMV for M <= 8 (when its 16-row class alignment holds), else the
    fused tensor-core GEMM (which masks M, so 9..15 and unaligned classes run there too).
    fp32 x: CUDA dequantize + cuBLAS with the branches in torch."""
    if x.device != pw.qweight.device:
        raise ValueError(f"bitfuse cuda backend: x is on {x.device}, weights on {pw.qweight.device}")
    if gemv_unsupported(x, pw) is None:
        return gemv(x, pw)
    if gemm_unsupported(x, pw) is None:
        return gemm(x, pw)
    w = dequantize_dense(pw, x.dtype)
    y = (x @ w.t()).float()
    x32 = x.float()
    if pw.lr_down is not None:
        y = y + reference.lowrank_apply(x32, pw)
    if pw.sp_values is not None:
        y = y + outliers.apply(pw, x)
    if pw.bias is not None:
        y = y + pw.bias
    return y.to(x.dtype)
