"""Host side of the implicit-GEMM conv (conv2d.py): checks, config choice, the sparse branch, launches.

Configs, class geometry and the split-K fit are the linear launcher's (launch.py): the conv is the
same GEMM with M = B·Ho·Wo output pixels and K = Cin·kh·kw, so the same tables apply to it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from ..format import PackedWeight
from ..reference import sparse_coo
from . import tuning
from .conv2d import conv2d_kernel, conv_lowrank_down_kernel
from .fused_linear import splitk_epilogue_kernel
from .launch import (_DOT_DTYPES, _fit, _next_pow2, _or, _scale_args, class_geometry, interpreting,
                     layer_signature, target_for)
from .tuning import KernelConfig

_INT32_MAX = 2**31 - 1
# Under the interpreter every program is numpy calls with a fixed cost each, so few large tiles
# are what keep the CPU tests fast (a 2x9x10 image: 2.4 s at 16x16 tiles, 0.2 s at 128x32); the
# index logic under test is the same. M <= 8 keeps the linear GEMV config.
INTERPRETER_GEMM = KernelConfig("gemm", 128, 32, 32, split_k=1)
# Elements of the sparse branch's gathered (pixels × outliers) block per chunk: bounds its memory
# (64 MB of fp32) whatever the layer's outlier count.
_SPARSE_CHUNK_ELEMS = 1 << 24


def _pair(v, what: str):
    t = (v, v) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"triton conv2d: {what} must be an int or a pair, got {v!r}")
    return t


def output_hw(h: int, w: int, kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _check(x: torch.Tensor, pw: PackedWeight, ks, st, pd, dl) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"triton conv2d: x must be a 4-D (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _DOT_DTYPES:
        raise TypeError(f"triton conv2d: x must be fp16, bf16 or fp32, got {x.dtype}")
    kh, kw = ks
    if x.shape[1] * kh * kw != pw.in_features:
        raise ValueError(f"triton conv2d: x has {x.shape[1]} channels, but the packed weight's "
                         f"in_features {pw.in_features} = C·{kh}·{kw} needs C = {pw.in_features / (kh * kw):g}")
    if min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise ValueError(f"triton conv2d: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={st}, padding={pd}, dilation={dl}")
    for name, t in pw.tensors.items():
        if t.device != x.device:
            raise ValueError(f"triton conv2d: '{name}' is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"triton conv2d: '{name}' must be contiguous")
    # In-kernel offsets are int32 except the per-image one (int64): one image, and the (M, N)
    # output and split-K partials, must index within int32.
    span = sum((s - 1) * abs(st_) for s, st_ in zip(x.shape[1:], x.stride()[1:])) + 1
    if span > _INT32_MAX:
        raise ValueError(f"triton conv2d: one image of x spans {span} elements; at most 2^31 - 1")


def sparse_extra(x: torch.Tensor, pw: PackedWeight, ks, st, pd, dl, ho: int, wo: int) -> torch.Tensor:
    """S · patch for every output pixel, (B·Ho·Wo, N) fp32 in output-channel order.

    Gathers only the patch elements the outliers use, straight from the (padded) input, in chunks
    of outliers; the outlier count is known on the host, so there is no device->host sync."""
    (kh, kw), (sh, sw), (ph, pw_), (dh, dw) = ks, st, pd, dl
    b = x.shape[0]
    m = b * ho * wo
    rows, cols, vals = sparse_coo(pw)
    xp = F.pad(x.float(), (pw_, pw_, ph, ph))
    hs = torch.arange(ho, device=x.device) * sh
    ws = torch.arange(wo, device=x.device) * sw
    y = torch.zeros(m, pw.out_features, dtype=torch.float32, device=x.device)
    chunk = max(1, _SPARSE_CHUNK_ELEMS // max(m, 1))
    for j0 in range(0, pw.nnz, chunk):
        c = cols[j0:j0 + chunk]
        cin, rs = c // (kh * kw), c % (kh * kw)
        ih = (rs // kw * dh)[:, None] + hs[None, :]          # (nnz, Ho)
        iw = (rs % kw * dw)[:, None] + ws[None, :]           # (nnz, Wo)
        patch = xp[:, cin[:, None, None], ih[:, :, None], iw[:, None, :]]   # (B, nnz, Ho, Wo)
        patch = patch.permute(0, 2, 3, 1).reshape(m, -1)
        y.index_add_(1, rows[j0:j0 + chunk], patch * vals[j0:j0 + chunk])
    return y


def conv2d_implicit(x: torch.Tensor, pw: PackedWeight, kernel_size, stride=1, padding=0, dilation=1,
                    config: Optional[KernelConfig] = None) -> torch.Tensor:
    """conv2d(x, Ŵ) + bias as a channels-last (B, Ho, Wo, N) tensor (x: (B, C, H, W), NCHW or
    channels-last memory, fp16/bf16/fp32), every branch of `pw` fused (conv2d.py module doc).
    `config` overrides the table/autotuned choice (benchmarks, tests)."""
    ks, st = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pd, dl = _pair(padding, "padding"), _pair(dilation, "dilation")
    _check(x, pw, ks, st, pd, dl)
    b, _, h, w = x.shape
    ho, wo = output_hw(h, w, ks, st, pd, dl)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"triton conv2d: input {h}x{w} is smaller than the {ks[0]}x{ks[1]} kernel "
                         f"(dilation {dl}, padding {pd}) allows")
    m, n = b * ho * wo, pw.out_features
    if m * n > _INT32_MAX:
        raise ValueError(f"triton conv2d: output of {m}x{n} elements exceeds int32 indexing; split the batch")
    out = torch.empty(b, ho, wo, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    target = target_for(x.device)
    bits, row1, row2, word1, word2 = class_geometry(pw)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 1
    interp = interpreting()
    geom = (ks, st, pd, dl, ho, wo)

    def run(fitted: KernelConfig) -> None:
        _launch(x, pw, out, fitted, bits, row1, row2, word1, word2, geom, interp)

    def launch(cfg: KernelConfig) -> None:
        run(_fit(cfg, pw, m, row1, row2, sms))

    if config is not None:  # as given (benchmarks and tests time or check exactly this config)
        launch(config)
        return out
    path = tuning.choose_path(m, target)
    if interp:
        config = INTERPRETER_GEMM if path == "gemm" else tuning.INTERPRETER[path]
    elif os.environ.get("BITFUSE_AUTOTUNE", "0") == "1" and x.device.type == "cuda":
        key = "|".join(map(str, ("conv2d", torch.cuda.get_device_name(x.device), triton.__version__,
                                 path, tuning.m_bucket(m), n, pw.in_features, geom[:4],
                                 x.is_contiguous(), pw.group_size, bits, x.dtype, pw.rank > 0,
                                 pw.res_plane is not None)))
        from triton.testing import do_bench
        config = tuning.autotune(key, tuning.candidates(path, m), launch,
                                 lambda fn: do_bench(fn, warmup=5, rep=20))
    else:
        config = tuning.table_config(path, m, target)
    tuning.launch_fitting(("conv2d", x.device, x.dtype, geom, x.stride(3) == 1) + layer_signature(pw),
                          _fit(config, pw, m, row1, row2, sms), run)
    return out


def _launch(x, pw, out, cfg: KernelConfig, bits, row1, row2, word1, word2, geom, interp) -> None:
    (kh, kw), (sh, sw), (ph, pw_), (dh, dw), ho, wo = geom
    b, _, h, w = x.shape
    m, n, k = b * ho * wo, pw.out_features, pw.in_features
    use_dot = cfg.path == "gemm"
    # tl.dot on bf16 is wrong under the interpreter (triton 3.9): run that product in fp32 there.
    dot_fp32 = x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16)
    # Pixels on the fast axis when neighbouring pixels are neighbours in memory (NCHW); see the
    # conv2d.py module doc.
    a_m_major = x.stride(3) == 1 and x.shape[3] > 1
    geo = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw_, DH=dh, DW=dw, A_M_MAJOR=a_m_major)
    xs = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
    dummy = pw.qweight
    r = pw.rank
    r_pad = max(16, _next_pow2(r)) if r else 16
    t = None
    if r:
        t = torch.empty(m, r, dtype=torch.float32, device=x.device)
        bm_down = 16 if use_dot else min(8, _next_pow2(m))
        conv_lowrank_down_kernel[(triton.cdiv(m, bm_down),)](
            x, pw.lr_down, pw.lr_scale, t, m, k, r, h, w, ho, wo, *xs, t.stride(0), **geo,
            BLOCK_M=bm_down, BLOCK_K=64 if use_dot else 32, R_PAD=r_pad, USE_DOT=use_dot,
        )
    extra = (sparse_extra(x, pw, (kh, kw), (sh, sw), (ph, pw_), (dh, dw), ho, wo)
             if pw.sp_values is not None else None)
    part = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if cfg.split_k > 1 else None
    flags = dict(HAS_PERM=pw.perm is not None, HAS_LR=bool(r), R_PAD=r_pad,
                 HAS_EXTRA=extra is not None, HAS_BIAS=pw.bias is not None)
    stride_om = out.stride(2)  # out is (B, Ho, Wo, N) contiguous: row m = (b, ho, wo) at m·N
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    conv2d_kernel[grid](
        x, out, part if part is not None else dummy,
        pw.qweight, *_scale_args(pw), _or(pw.perm, dummy), _or(pw.res_index, dummy),
        _or(pw.res_plane, dummy), _or(pw.res_alpha, dummy),
        _or(t, dummy), _or(pw.lr_up, dummy), _or(extra, dummy), _or(pw.bias, dummy),
        m, n, k, pw.k_pad, r, h, w, ho, wo, *xs, stride_om, t.stride(0) if t is not None else 0,
        row1, row2, word1, word2, **geo,
        GROUP=pw.group_size, N_CLASSES=len(pw.class_bits), BITS0=bits[0], BITS1=bits[1], BITS2=bits[2],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=use_dot, DOT_DTYPE=_DOT_DTYPES[x.dtype], DOT_FP32=dot_fp32,
        HAS_RES=pw.res_plane is not None, COMPACT=pw.compact_scales, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if part is not None:
        splitk_epilogue_kernel[(grid[0], grid[1])](
            part, out, _or(pw.perm, dummy), _or(t, dummy), _or(pw.lr_up, dummy), _or(extra, dummy),
            _or(pw.bias, dummy), m, n, r, stride_om, t.stride(0) if t is not None else 0,
            SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_DOT=use_dot,
            **flags, num_warps=cfg.num_warps,
        )

