"""Host side of the Triton backend: checks, config choice, and the launches of fused_linear.py."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import pack
from ..format import PackedWeight
from ..sparse import outliers
from ..targets import PROFILES
from . import tuning
from .fused_linear import fused_linear_kernel, lowrank_down_kernel, splitk_epilogue_kernel
from .tuning import KernelConfig

MAX_CLASSES = 3
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_TARGET_BY_CAPABILITY = {(8, 7): "orin", (8, 6): "rtx30", (8, 9): "rtx40", (9, 0): "h100"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def target_for(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    cap = torch.cuda.get_device_capability(device)
    return _TARGET_BY_CAPABILITY.get(cap, "h100" if cap >= (9, 0) else "rtx40")


def _pow2_divisor(n: int) -> int:
    """Largest power of two dividing n (n > 0)."""
    return n & -n


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def class_geometry(pw: PackedWeight):
    """(bits of classes 0..2, first row of classes 1 and 2, first word of classes 1 and 2).

    Padded to three classes: a missing class starts at row N, so no tile ever selects it."""
    bits, rows = list(pw.class_bits), list(pw.class_rows)
    if len(bits) > MAX_CLASSES:
        raise ValueError(f"the Triton kernel handles up to {MAX_CLASSES} bit classes per layer, "
                         f"this layer has {len(bits)} ({bits})")
    n = pw.out_features
    row_starts = [sum(rows[:c]) for c in range(len(rows))] + [n] * (MAX_CLASSES - len(rows))
    word_starts = pack.class_word_offsets(bits, rows, pw.k_pad)[:-1] + [0] * (MAX_CLASSES - len(rows))
    bits += [bits[-1]] * (MAX_CLASSES - len(bits))
    return bits, row_starts[1], row_starts[2], word_starts[1], word_starts[2]


def layer_signature(pw: PackedWeight) -> tuple:
    """What makes two layers compile to the same kernels and tiles (the fitted-config cache key)."""
    return (pw.out_features, pw.in_features, tuple(pw.class_bits), tuple(pw.class_rows), pw.group_size,
            pw.perm is not None, pw.res_plane is not None, pw.rank, pw.sp_values is not None,
            pw.bias is not None, pw.compact_scales)


def _fit(cfg: KernelConfig, pw: PackedWeight, m: int, row1: int, row2: int, sms: int) -> KernelConfig:
    """Adapt a table config to this layer: tiles that respect groups and class boundaries."""
    if cfg.block_k < 32 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"triton fused_linear: block_k must be a power of two >= 32 (whole 32-column "
                         f"runs, FORMAT.md §3.1), got {cfg.block_k}")
    bk = min(cfg.block_k, pw.group_size)  # one scale per row per K tile
    bn = cfg.block_n
    n = pw.out_features
    for boundary in (row1, row2):
        if 0 < boundary < n:
            bn = min(bn, _pow2_divisor(boundary))  # tiles never straddle a class boundary
    bm = cfg.block_m
    split = cfg.split_k
    k_tiles = pw.k_pad // bk
    if split == 0:
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        want = max(1, (4 * max(sms, 1)) // max(programs, 1))
        split = 1 << int(math.log2(want))
    split = max(1, min(split, k_tiles, 32))
    return KernelConfig(cfg.path, bm, bn, bk, split, cfg.num_warps, cfg.num_stages)


def _check(x: torch.Tensor, pw: PackedWeight) -> None:
    if x.dim() != 2 or x.shape[1] != pw.in_features:
        raise ValueError(f"triton fused_linear: x must be (M, {pw.in_features}), got {tuple(x.shape)}")
    if x.dtype not in _DOT_DTYPES:
        raise TypeError(f"triton fused_linear: x must be fp16, bf16 or fp32, got {x.dtype}")
    for name, t in pw.tensors.items():
        if t.device != x.device:
            raise ValueError(f"triton fused_linear: '{name}' is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"triton fused_linear: '{name}' must be contiguous")


def fused_linear(x: torch.Tensor, pw: PackedWeight, config: Optional[KernelConfig] = None) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for a 2-D x (M, K), every branch of `pw` fused (module doc of
    fused_linear.py). `config` overrides the table/autotuned choice (benchmarks, tests)."""
    _check(x, pw)
    x = x.contiguous()
    m, k = x.shape
    n = pw.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    target = target_for(x.device)
    bits, row1, row2, word1, word2 = class_geometry(pw)
    sms = PROFILES[target].sms if target != "cpu" else 1
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    interp = interpreting()

    def run(fitted: KernelConfig) -> None:
        _launch(x, pw, out, fitted, bits, row1, row2, word1, word2, interp)

    def launch(cfg: KernelConfig) -> None:
        run(_fit(cfg, pw, m, row1, row2, sms))

    if config is not None:  # as given (benchmarks and tests time or check exactly this config)
        launch(config)
        return out
    path = tuning.choose_path(m, target)
    if interp:
        config = tuning.INTERPRETER[path]
    elif os.environ.get("BITFUSE_AUTOTUNE", "0") == "1" and x.device.type == "cuda":
        which, cands = tuning.tuning_candidates(m, target)  # both paths near the crossover
        key = "|".join(map(str, (torch.cuda.get_device_name(x.device), triton.__version__, which,
                                 tuning.m_bucket(m), n, k, pw.group_size, bits, x.dtype,
                                 pw.rank > 0, pw.res_plane is not None)))
        from triton.testing import do_bench
        config = tuning.autotune(key, cands, launch, lambda fn: do_bench(fn, warmup=5, rep=20))
    else:
        config = tuning.table_config(path, m, target)
    # Shrinking a fitted config keeps it fitted (powers of two, never larger), so no refit.
    tuning.launch_fitting(("linear", x.device, x.dtype) + layer_signature(pw),
                          _fit(config, pw, m, row1, row2, sms), run)
    return out


def _launch(x, pw, out, cfg: KernelConfig, bits, row1, row2, word1, word2, interp) -> None:
    m, k = x.shape
    n = pw.out_features
    use_dot = cfg.path == "gemm"
    # tl.dot on bf16 is wrong under the interpreter (triton 3.9): run that product in fp32 there.
    dot_fp32 = x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16)
    dummy = pw.qweight
    r = pw.rank
    r_pad = max(16, _next_pow2(r)) if r else 16
    t = None
    if r:
        t = torch.empty(m, r, dtype=torch.float32, device=x.device)
        bm_down = 16 if use_dot else min(8, _next_pow2(m))
        lowrank_down_kernel[(triton.cdiv(m, bm_down),)](
            x, pw.lr_down, pw.lr_scale, t, m, k, r, x.stride(0), t.stride(0),
            BLOCK_M=bm_down, BLOCK_K=64 if use_dot else 32, R_PAD=r_pad, USE_DOT=use_dot,
        )
    extra = outliers.apply(pw, x) if pw.sp_values is not None else None
    part = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if cfg.split_k > 1 else None
    flags = dict(HAS_PERM=pw.perm is not None, HAS_LR=bool(r), R_PAD=r_pad,
                 HAS_EXTRA=extra is not None, HAS_BIAS=pw.bias is not None)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    fused_linear_kernel[grid](
        x, out, part if part is not None else dummy,
        pw.qweight, *_scale_args(pw), _or(pw.perm, dummy), _or(pw.res_index, dummy),
        _or(pw.res_plane, dummy), _or(pw.res_alpha, dummy),
        _or(t, dummy), _or(pw.lr_up, dummy), _or(extra, dummy), _or(pw.bias, dummy),
        m, n, k, pw.k_pad, r, x.stride(0), out.stride(0), t.stride(0) if t is not None else 0,
        row1, row2, word1, word2,
        GROUP=pw.group_size, N_CLASSES=len(pw.class_bits), BITS0=bits[0], BITS1=bits[1], BITS2=bits[2],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=use_dot, DOT_DTYPE=_DOT_DTYPES[x.dtype], DOT_FP32=dot_fp32,
        HAS_RES=pw.res_plane is not None, COMPACT=pw.compact_scales, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if part is not None:
        splitk_epilogue_kernel[(grid[0], grid[1])](
            part, out, _or(pw.perm, dummy), _or(t, dummy), _or(pw.lr_up, dummy), _or(extra, dummy),
            _or(pw.bias, dummy), m, n, r, out.stride(0), t.stride(0) if t is not None else 0,
            SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_DOT=use_dot,
            **flags, num_warps=cfg.num_warps,
        )


def _or(t, dummy):
    return dummy if t is None else t


def _scale_args(pw: PackedWeight) -> tuple:
    """The kernels' (scales_ptr, zeros_ptr, rows_ptr) for either scale form (FORMAT.md §5):
    fp16 pairs (rows_ptr unused), or compact codes and their row factors (COMPACT=True)."""
    if pw.compact_scales:
        return pw.scale_codes, pw.zero_codes, pw.scale_rows
    return pw.scales, pw.zeros, pw.scales
