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


def fitted_group_size(k: int, group_size: int, bits: int, widths: Sequence[int] = ()) -> int:
    """The group size, at most `group_size`, that stores a K-wide row of `bits`-bit codes in the
    fewest bits: codes over k_pad plus a scale/offset pair per group. Ties go to the smaller group.

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
        return kp * bits + (kp // g) * SCALE_OFFSET_BITS

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
