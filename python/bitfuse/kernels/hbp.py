"""Triton HBP SpMV/SpMM (docs/HBP.md §3): a persistent grid walks tiles, the first tiles of each
program statically (round robin over tile_order, heaviest first), the rest from an atomic
counter that is zeroed on the stream before every launch. One program holds a 32-lane group at a
time; lane l reads slot off + 32·j + l, so every step is one coalesced 32-wide load.
Triton has no explicit shared memory: the tile's x slice is left to L1/L2, which the tiling
keeps small (tile_cols from the shared-memory budget).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_ACC = {torch.float16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}
FIXED_FRACTION = 0.5  # keep equal to bitfuse.sparse.hbp.FIXED_FRACTION


@triton.jit
def hbp_tiles_kernel(tile_order, tile_coords, tile_group_ptr, group_offset, group_rows,
                     group_slot, cols, values, x, y, partial, counter, n_tiles, tile_cols, m,
                     per_program, first_dynamic, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, 32)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < m
    k = 0
    if per_program > 0:
        idx = pid
    else:
        idx = first_dynamic + tl.atomic_add(counter, 1)
    while idx < n_tiles:
        t = tl.load(tile_order + idx)
        c0 = tl.load(tile_coords + 2 * t + 1).to(tl.int64) * tile_cols
        g0 = tl.load(tile_group_ptr + t)
        g1 = tl.load(tile_group_ptr + t + 1)
        for g in range(g0, g1):
            o0 = tl.load(group_offset + g)
            o1 = tl.load(group_offset + g + 1)
            acc = tl.zeros([32, BLOCK_M], dtype=y.dtype.element_ty)
            for e in range(o0, o1, 32):
                c = tl.load(cols + e + lanes).to(tl.int32) & 0xFFFF  # uint16 stored as int16
                real = c != 0xFFFF  # padding: never load x (no 0·inf, no read past x's end)
                v = tl.load(values + e + lanes).to(y.dtype.element_ty)
                xv = tl.load(x + (c0 + c)[:, None] * m + ms[None, :],
                             mask=real[:, None] & m_ok[None, :], other=0.0)
                acc += v[:, None] * xv.to(y.dtype.element_ty)
            row = tl.load(group_rows + g * 32 + lanes)
            slot = tl.load(group_slot + g * 32 + lanes)
            tl.store(y + row.to(tl.int64)[:, None] * m + ms[None, :], acc,
                     mask=((row >= 0) & (slot < 0))[:, None] & m_ok[None, :])
            tl.store(partial + slot.to(tl.int64)[:, None] * m + ms[None, :], acc,
                     mask=(slot >= 0)[:, None] & m_ok[None, :])
        k += 1
        if k < per_program:
            idx = pid + k * nprog
        else:
            idx = first_dynamic + tl.atomic_add(counter, 1)


@triton.jit
def hbp_reduce_kernel(multi_rows, multi_ptr, partial, y, m, BLOCK_M: tl.constexpr):
    # Rows split into pieces: sum their partial slots in column order (deterministic).
    i = tl.program_id(0)
    ms = tl.arange(0, BLOCK_M)
    row = tl.load(multi_rows + i).to(tl.int64)
    s0 = tl.load(multi_ptr + i)
    s1 = tl.load(multi_ptr + i + 1)
    acc = tl.zeros([BLOCK_M], dtype=y.dtype.element_ty)
    for s in range(s0, s1):
        acc += tl.load(partial + s * m + ms, mask=ms < m, other=0.0)
    tl.store(y + row * m + ms, acc, mask=ms < m)


def _programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, 8 * sms))  # persistent grid sized from the device
    return max(1, min(n_tiles, int(os.environ.get("BITFUSE_HBP_PROGRAMS", "4"))))


def hbp_spmm(arrays: dict, x: torch.Tensor, shape, tile_cols: int) -> torch.Tensor:
    """y = A @ x for x (n_cols, m) with A's dtype; arrays are HBPMatrix.device_arrays()."""
    n_rows, _ = shape
    m = x.shape[1]
    acc_dtype = _ACC[x.dtype]
    y = torch.zeros(n_rows, m, dtype=acc_dtype, device=x.device)
    n_tiles = arrays["tile_order"].numel()
    if n_tiles == 0 or m == 0:
        return y.to(x.dtype)
    x = x.contiguous()
    n_slots = arrays.get("_n_slots")
    if n_slots is None:
        # Read once (a device->host copy on GPU) and cached, so later calls never sync and can
        # be captured in a CUDA graph.
        n_slots = arrays["_n_slots"] = int(arrays["multi_ptr"][-1])
    # Its own counter: the CUDA kernel's (arrays["_counter"]) must stay zero between its launches.
    counter = arrays.get("_triton_counter")
    if counter is None:  # made once (not setdefault: its argument would allocate on every call)
        counter = arrays["_triton_counter"] = torch.zeros(1, dtype=torch.int32, device=x.device)
    counter.zero_()  # reset on device, in stream order, every call: no host sync
    programs = _programs(x.device, n_tiles)
    per = int(FIXED_FRACTION * n_tiles) // programs
    for j in range(0, m, 32):  # right-hand sides in blocks of up to 32 columns
        xs = x[:, j:j + 32].contiguous()
        mj = xs.shape[1]
        block_m = triton.next_power_of_2(mj)
        yj = torch.zeros(n_rows, mj, dtype=acc_dtype, device=x.device)
        partial = torch.empty(max(n_slots, 1), mj, dtype=acc_dtype, device=x.device)
        if j:
            counter.zero_()
        hbp_tiles_kernel[(programs,)](
            arrays["tile_order"], arrays["tile_coords"], arrays["tile_group_ptr"],
            arrays["group_offset"], arrays["group_rows"], arrays["group_slot"], arrays["cols"],
            arrays["values"], xs, yj, partial, counter, n_tiles, tile_cols, mj, per,
            per * programs, BLOCK_M=block_m)
        n_multi = arrays["multi_rows"].numel()
        if n_multi:
            hbp_reduce_kernel[(n_multi,)](arrays["multi_rows"], arrays["multi_ptr"], partial, yj,
                                          mj, BLOCK_M=block_m)
        y[:, j:j + mj] = yj
    return y.to(x.dtype)
