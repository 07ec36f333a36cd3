"""The one definition of every bitfuse bit layout.

docs/FORMAT.md describes these layouts in prose; this module is the only code that implements
them. The torch reference, the Triton kernels and the CUDA kernels (through
csrc/include/bitfuse/format.h, which is tested against this module) all follow it.

Conventions (see docs/FORMAT.md for the why of each):
  * A row is one output channel; codes run along K (input columns), padded to k_pad, a multiple
    of the group size (and so of 32).
  * K is cut into runs of 32 columns. Inside a run, column c is stored at *slot* run_slot(c), the
    tensor-core fragment order of FORMAT.md §3.1 (format v2); everything below is in slot order.
  * Words are 32-bit, stored as torch.int32; bit 0 is the least significant bit.
  * 2- and 4-bit codes: the code in slot j of a word sits at bits [b*j, b*j + b) (16 or 8 a word).
  * 3-bit codes are split into bit planes. Each run of 32 codes takes 3 words:
      word 0: low 2 bits of slots 0..15 (2-bit layout), word 1: low 2 bits of slots 16..31,
      word 2: bit 2 of slots 0..31 (1-bit layout).
  * 1-bit planes (the binary residual): bit j of word i is slot j of run i, the same slot order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ALLOWED_GROUP_SIZES

WORD_BITS = 32
RUN = 32  # columns per run: the unit of the slot permutation (a multiple of every group size's divisor)
_MASK32 = 0xFFFFFFFF


def run_slot(c: int) -> int:
    """Slot (storage position) of column c (0..31) inside its 32-column run: FORMAT.md §3.1.

    Write c = 16·s + 8·h + 2·t + l (s, h, l in {0, 1}, t in 0..3). Then slot = 8·t + 4·l + 2·s + h:
    the 8 slots of "thread" t (a lane's position in an mma quad) hold exactly the columns that lane
    needs as the B operand of two m16n8k16 steps, and the fp16 magic-number unpack of slots (i, i+4)
    yields the register pairs {2t, 2t+1} and {2t+8, 2t+9} in order.
    """
    if not 0 <= c < RUN:
        raise PackError(f"run column must lie in [0, {RUN}), got {c}")
    s, h, t, l = (c >> 4) & 1, (c >> 3) & 1, (c >> 1) & 3, c & 1
    return 8 * t + 4 * l + 2 * s + h


def run_column(j: int) -> int:
    """Inverse of run_slot: the column (0..31) whose code sits in slot j of a run."""
    if not 0 <= j < RUN:
        raise PackError(f"run slot must lie in [0, {RUN}), got {j}")
    t, l, s, h = j >> 3, (j >> 2) & 1, (j >> 1) & 1, j & 1
    return 16 * s + 8 * h + 2 * t + l


# SLOT_OF_COLUMN[c] = run_slot(c); COLUMN_OF_SLOT[j] = run_column(j) (index tensors for gathers).
SLOT_OF_COLUMN = torch.tensor([run_slot(c) for c in range(RUN)], dtype=torch.int64)
COLUMN_OF_SLOT = torch.tensor([run_column(j) for j in range(RUN)], dtype=torch.int64)


def to_slot_order(q: torch.Tensor) -> torch.Tensor:
    """(rows, k_pad) in column order -> slot order: out[:, 32r + j] = q[:, 32r + run_column(j)]."""
    r, k = q.shape
    return q.reshape(r, k // RUN, RUN)[:, :, COLUMN_OF_SLOT.to(q.device)].reshape(r, k)


def to_column_order(q: torch.Tensor) -> torch.Tensor:
    """Inverse of to_slot_order."""
    r, k = q.shape
    return q.reshape(r, k // RUN, RUN)[:, :, SLOT_OF_COLUMN.to(q.device)].reshape(r, k)


class PackError(ValueError):
    """Codes or words that do not fit the layout they are packed into."""


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a whole number of groups (groups are multiples of 32, so of words)."""
    if k <= 0:
        raise PackError(f"K must be positive, got {k}")
    return -(-k // group_size) * group_size


SCALE_OFFSET_BITS = 32  # one fp16 scale + one fp16 offset per (row, group)
VECTOR_ROWS_MIN_SAVING = 0.25  # fitted_group_size: what losing 16-byte rows must save (unmeasured)

# ---- compact scales (FORMAT.md §5.1) -------------------------------------------------------------
# A row's G scales and G offsets as 8-bit codes on two per-row linear grids, 3 fp16 row factors:
#   scale  = scale_codes[i, j] · scale_rows[i, 0]
#   offset = scale_rows[i, 1] + zero_codes[i, j] · scale_rows[i, 2]
# 16 bits a group + 48 a row instead of 32 a group, so a layer takes it only with more than
# COMPACT_MIN_GROUPS - 1 groups a row (where it is smaller). Each product is exact in fp32 (8-bit
# code × 11-bit fp16 mantissa), so mul + add and fma give the same bits: the reference, the Triton
# and the CUDA dequant agree bit for bit, as with fp16 scales.
COMPACT_CODE_MAX = 255
COMPACT_ROW_FACTORS = 3
COMPACT_SCALE_BITS = 16  # 8-bit scale code + 8-bit offset code per (row, group)
COMPACT_MIN_GROUPS = 4


def uses_compact_scales(n_groups: int, compact: bool) -> bool:
    """Whether a layer with n_groups groups a row stores compact scales, when its config asks."""
    return bool(compact) and n_groups >= COMPACT_MIN_GROUPS


def scale_bits_per_row(n_groups: int, compact: bool = False) -> int:
    """Bits a row spends on its scales and offsets (fp16 pairs, or compact codes + row factors)."""
    if uses_compact_scales(n_groups, compact):
        return n_groups * COMPACT_SCALE_BITS + COMPACT_ROW_FACTORS * 16
    return n_groups * SCALE_OFFSET_BITS


def _fp16_up(t: torch.Tensor) -> torch.Tensor:
    """t (fp32, ≥ 0) rounded up to fp16: the smallest fp16 value ≥ t."""
    h = t.clamp_max(65504.0).to(torch.float16)
    low = h.float() < t
    return torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)


def _fp16_down(t: torch.Tensor) -> torch.Tensor:
    """t (fp32, finite, within ±65504) rounded down to fp16: the largest fp16 value ≤ t."""
    h = t.to(torch.float16)
    high = h.float() > t
    # One fp16 step towards -inf: the bit pattern moves away from zero for a negative value
    # and towards it for a positive one (-0.0 and +0.0 both step to the smallest negative).
    bits = h.view(torch.int16)
    step = torch.where(h > 0, bits - 1, torch.where(h < 0, bits + 1, torch.full_like(bits, -32767)))
    return torch.where(high, step.view(torch.float16), h)


def compact_scales(scales: torch.Tensor, zeros: torch.Tensor):
    """(N, G) scales (≥ 0) and offsets, any float dtype -> (scale_codes uint8 (N, G),
    zero_codes uint8 (N, G), scale_rows fp16 (N, 3)): the nearest point of each row's grids.

    The scale step is the row's largest scale / 255 rounded up to fp16, so every code fits; a
    scale > 0 keeps code ≥ 1 (a group never collapses to its offset). The offset grid runs from
    the row's smallest offset (rounded down to fp16) in 255 steps to its largest."""
    s, z = scales.float(), zeros.float()
    if s.dim() != 2 or s.shape != z.shape:
        raise PackError(f"scales and zeros must be (N, G) of one shape, got {tuple(s.shape)} and {tuple(z.shape)}")
    if s.numel() and (not bool(torch.isfinite(s).all() and torch.isfinite(z).all()) or bool((s < 0).any())):
        raise PackError("scales must be finite and >= 0 and zeros finite to be compacted")
    smax = s.amax(dim=1) if s.shape[1] else s.new_zeros(s.shape[0])
    step = _fp16_up(smax / COMPACT_CODE_MAX)
    step = torch.where((smax > 0) & (step == 0), torch.full_like(step, 2.0 ** -24), step)
    safe = torch.where(step > 0, step.float(), torch.ones_like(smax))[:, None]
    sc = torch.clamp(torch.round(s / safe), 1, COMPACT_CODE_MAX)
    sc = torch.where(s > 0, sc, torch.zeros_like(sc))
    zlo = _fp16_down(z.amin(dim=1) if z.shape[1] else z.new_zeros(z.shape[0]))
    zspan = (z.amax(dim=1) if z.shape[1] else z.new_zeros(z.shape[0])) - zlo.float()
    zstep = _fp16_up(zspan / COMPACT_CODE_MAX)
    zsafe = torch.where(zstep > 0, zstep.float(), torch.ones_like(zspan))[:, None]
    zc = torch.clamp(torch.round((z - zlo.float()[:, None]) / zsafe), 0, COMPACT_CODE_MAX)
    zc = torch.where(zstep[:, None] > 0, zc, torch.zeros_like(zc))
    rows = torch.stack([step, zlo, zstep], dim=1)
    if not bool(torch.isfinite(rows).all()):
        raise PackError("compact_scales: a row's scale step or offset base overflows fp16 (scales "
                        "must be at most 255·65504 and offsets within ±65504)")
    return sc.to(torch.uint8), zc.to(torch.uint8), rows.contiguous()


def expand_scales(scale_codes: torch.Tensor, zero_codes: torch.Tensor, scale_rows: torch.Tensor):
    """Compact scales -> (scales fp32 (N, G), zeros fp32 (N, G)), exactly as every kernel computes
    them: code · step, and base + code · step (both products exact in fp32)."""
    r = scale_rows.float()
    s = scale_codes.float() * r[:, 0:1]
    z = r[:, 1:2] + zero_codes.float() * r[:, 2:3]
    return s, z


def snap_scales(scales: torch.Tensor, zeros: torch.Tensor):
    """The compact grid's (scales, zeros) fp32 nearest to the given ones (calibration uses it to
    choose codes against the values the kernels will see)."""
    return expand_scales(*compact_scales(scales, zeros))


def fitted_group_size(k: int, group_size: int, bits: int, widths: Sequence[int] = (),
                      compact: bool = False) -> int:
    """The group size, at most `group_size`, that stores a K-wide row of `bits`-bit codes in the
    fewest bits: codes over k_pad plus its scales and offsets (fp16 pairs, or compact scales
    when `compact` and the layer qualifies: scale_bits_per_row). Ties go to the smaller group.

    Why: K is padded to whole groups (padded_k), and padding costs code bits and scale bits for
    columns that do not exist. At K = 320 with g128 a row stores 384 codes + 3 scale pairs
    (1632 bits at 4-bit); g64 stores 320 codes + 5 pairs (1440 bits) and has finer groups, so it is
    both smaller and at least as accurate. When K is a multiple of `group_size` the answer is always
    `group_size` (a smaller group only adds scale pairs).

    Rows of a multiple of 4 words (16 bytes) are read with 128-bit loads, others with 32-bit loads
    (csrc gemv.h class_vec_ok; the Triton kernels' 16-byte-aligned row stride). A smaller group
    that would lose those for some code width (`bits` or any of `widths`, e.g. mixed_bits) while
    `group_size` keeps them is taken only if it saves at least VECTOR_ROWS_MIN_SAVING of the bits:
    K = 320 at 3-bit stays at g128 (g64 saves 10% but has 30-word rows), K = 64 at 3-bit takes g64
    (46% fewer bits). The threshold is reasoned, not measured: a GPU run should set it.
    """
    if group_size not in ALLOWED_GROUP_SIZES:
        raise PackError(f"group size must be one of {ALLOWED_GROUP_SIZES}, got {group_size}")
    all_widths = {bits, *widths}

    def cost(g: int) -> int:
        kp = padded_k(k, g)
        return kp * bits + scale_bits_per_row(kp // g, compact)

    def vector_rows(g: int, b: int) -> bool:
        return words_per_row(b, padded_k(k, g)) % 4 == 0

    def keeps_vector_rows(g: int) -> bool:
        return all(vector_rows(g, b) or not vector_rows(group_size, b) for b in all_widths)

    def allowed(g: int) -> bool:
        return keeps_vector_rows(g) or cost(g) <= (1 - VECTOR_ROWS_MIN_SAVING) * cost(group_size)

    candidates = [g for g in ALLOWED_GROUP_SIZES if g <= group_size and allowed(g)]
    return min(candidates, key=lambda g: (cost(g), g))


def words_per_row(bits: int, k_pad: int) -> int:
    """32-bit words holding one row of k_pad codes of the given width (1, 2, 3 or 4)."""
    if bits not in (1, 2, 3, 4):
        raise PackError(f"bit width must be 1, 2, 3 or 4, got {bits}")
    if k_pad % WORD_BITS:
        raise PackError(f"k_pad must be a multiple of {WORD_BITS}, got {k_pad}")
    return k_pad * bits // WORD_BITS


def row_align_for(n: int) -> int:
    """Row alignment of bit-class boundaries for a layer with n output channels.

    Kernels tile N; a tile must never straddle two bit classes. 64 rows suits the GEMM tiles of
    large layers; small layers use 16 so that a 10% salient class is not rounded away.
    """
    return 64 if n >= 1024 else 16


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    # Values are in [0, 2^32); reinterpret the low 32 bits as a signed int32 (two's complement).
    return (words64 - ((words64 >> 31) & 1) * (1 << 32)).to(torch.int32)


def _from_int32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & _MASK32


def _pack_uniform(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = WORD_BITS // bits
    r, k = q.shape
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    w = (q.to(torch.int64).reshape(r, k // per, per) << shifts).sum(dim=-1)
    return _to_int32(w)


def _unpack_uniform(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = WORD_BITS // bits
    r, nw = words.shape
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    q = (_from_int32(words).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(r, nw * per).to(torch.uint8)


def _check_codes(q: torch.Tensor, bits: int) -> None:
    if q.dim() != 2:
        raise PackError(f"codes must be a 2-D (rows, k_pad) tensor, got shape {tuple(q.shape)}")
    if q.shape[1] % WORD_BITS:
        raise PackError(f"codes row length must be a multiple of {WORD_BITS}, got {q.shape[1]}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise PackError(f"codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise PackError(
            f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}], "
            f"got range [{int(q.min())}, {int(q.max())}]"
        )


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, k_pad) integer codes in [0, 2^bits), column order -> (rows, words_per_row) int32."""
    if bits not in (2, 3, 4):
        raise PackError(f"dense codes are 2, 3 or 4 bits, got {bits}")
    _check_codes(q, bits)
    q = to_slot_order(q)
    if bits != 3:
        return _pack_uniform(q, bits)
    r, k = q.shape
    q = q.to(torch.int64).reshape(r, k // 32, 32)
    lo, hi = q & 3, q >> 2
    w01 = _pack_uniform(lo.reshape(-1, 32), 2).reshape(r, k // 32, 2)
    w2 = _pack_uniform(hi.reshape(-1, 32), 1).reshape(r, k // 32, 1)
    return torch.cat([w01, w2], dim=-1).reshape(r, 3 * (k // 32))


def unpack_codes(words: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """Inverse of pack_codes: (rows, words_per_row) int32 -> (rows, k_pad) uint8, column order."""
    nw = words_per_row(bits, k_pad)
    if words.dim() != 2 or words.shape[1] != nw or words.dtype != torch.int32:
        raise PackError(
            f"{bits}-bit words for k_pad={k_pad} must be int32 of shape (rows, {nw}), "
            f"got {words.dtype} {tuple(words.shape)}"
        )
    if bits != 3:
        return to_column_order(_unpack_uniform(words, bits))
    r = words.shape[0]
    t = words.reshape(r, k_pad // 32, 3)
    lo = _unpack_uniform(t[..., :2].reshape(-1, 2), 2).reshape(r, k_pad // 32, 32)
    hi = _unpack_uniform(t[..., 2:].reshape(-1, 1), 1).reshape(r, k_pad // 32, 32)
    return to_column_order((lo | (hi << 2)).reshape(r, k_pad))


def pack_signs(bits: torch.Tensor) -> torch.Tensor:
    """(rows, k_pad) bool (True = +alpha) -> (rows, k_pad/32) int32 1-bit plane."""
    if bits.dim() != 2 or bits.shape[1] % WORD_BITS:
        raise PackError(f"sign plane must be (rows, multiple of 32), got {tuple(bits.shape)}")
    return _pack_uniform(to_slot_order(bits.to(torch.int64)), 1)


def unpack_signs(words: torch.Tensor, k_pad: int) -> torch.Tensor:
    """Inverse of pack_signs: -> (rows, k_pad) bool."""
    if words.dim() != 2 or words.shape[1] * WORD_BITS != k_pad or words.dtype != torch.int32:
        raise PackError(
            f"sign plane for k_pad={k_pad} must be int32 (rows, {k_pad // WORD_BITS}), "
            f"got {words.dtype} {tuple(words.shape)}"
        )
    return to_column_order(_unpack_uniform(words, 1)).bool()


def class_word_offsets(class_bits: Sequence[int], class_rows: Sequence[int], k_pad: int) -> list:
    """Start word of each bit class inside the flat qweight buffer, plus the total at the end."""
    offs = [0]
    for b, r in zip(class_bits, class_rows):
        offs.append(offs[-1] + r * words_per_row(b, k_pad))
    return offs


def pack_classes(codes: Sequence[torch.Tensor], class_bits: Sequence[int]) -> torch.Tensor:
    """Concatenate the packed rows of each bit class, in packed order, into one flat int32 buffer."""
    parts = [pack_codes(q, b).reshape(-1) for q, b in zip(codes, class_bits)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def unpack_classes(
    qweight: torch.Tensor, class_bits: Sequence[int], class_rows: Sequence[int], k_pad: int
) -> list:
    """Split the flat buffer back into per-class (rows, k_pad) uint8 code tensors."""
    offs = class_word_offsets(class_bits, class_rows, k_pad)
    if qweight.dim() != 1 or qweight.numel() != offs[-1]:
        raise PackError(
            f"qweight must be a flat int32 buffer of {offs[-1]} words for classes "
            f"bits={list(class_bits)} rows={list(class_rows)}, got shape {tuple(qweight.shape)}"
        )
    out = []
    for i, (b, r) in enumerate(zip(class_bits, class_rows)):
        w = qweight[offs[i] : offs[i + 1]].reshape(r, words_per_row(b, k_pad))
        out.append(unpack_codes(w, b, k_pad))
    return out
