"""The Triton kernel behind `engine.models.lora_merge.fp8_merge_rows_` (see there for why):
fp8 weight rows := quantize_rowwise(src · row scale + (B · diag(c)) @ A), in place allowed.
A module of its own so that importing the merge code needs no Triton, and the kernel is a
module-level function (Triton resolves `_to_fp8` from this module's globals)."""

import triton
import triton.language as tl

from engine.models.triton_attention import _to_fp8


@triton.jit
def _scaled_b(b_ptr, cs_ptr, rows, rok, rr, R, s_b0, s_b1):
    """These rows of B · diag(c) (the rank columns scaled by strength × alpha/rank), float32."""
    b = tl.load(
        b_ptr + rows[:, None] * s_b0 + rr[None, :] * s_b1,
        mask=rok[:, None] & (rr[None, :] < R),
        other=0.0,
    ).to(tl.float32)
    return b * tl.load(cs_ptr + rr, mask=rr < R, other=0.0)[None, :]


@triton.jit
def _row_block_tile(src, ps, a_ptr, b, rows, rok, rr, k0, K, R, s_src, s_a0, s_a1,
                    BK: tl.constexpr, DOT_BF16: tl.constexpr):  # fmt: skip
    """Columns k0..k0+BK of this program's rows of src · row scale + b @ A (b: the scaled
    B rows, already in the dot's dtype), in float32, with the columns and the mask."""
    cols = k0 + tl.arange(0, BK)
    cok = cols < K
    a = tl.load(
        a_ptr + rr[:, None] * s_a0 + cols[None, :] * s_a1,
        mask=(rr[:, None] < R) & cok[None, :],
        other=0.0,
    ).to(tl.bfloat16 if DOT_BF16 else tl.float32)
    m = rok[:, None] & cok[None, :]
    p = tl.load(src + rows[:, None] * s_src + cols[None, :], mask=m, other=0.0)
    return p.to(tl.float32) * ps[:, None] + tl.dot(b, a), cols, m


@triton.jit
def fp8_merge_kernel(
    src, src_s, dst, dst_s, b_ptr, a_ptr, cs_ptr, N, K, R,
    s_src, s_dst, s_b0, s_b1, s_a0, s_a1,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EXACT: tl.constexpr,
    DOT_BF16: tl.constexpr,
):  # fmt: skip
    # DOT_BF16: the low-rank product on bf16 tensor cores (the scaled B rounded to bf16,
    # float32 accumulation) instead of tf32: half the MMA work of the two passes. GPU
    # only: the interpreter's bf16 dot is unreliable (tests/test_triton_attention.py).
    # Two passes over the row block: the row maxima, then the quantised writes (the tile
    # is recomputed rather than kept: a whole row block would not fit in registers).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rok = rows < N
    rr = tl.arange(0, BR)
    b = _scaled_b(b_ptr, cs_ptr, rows, rok, rr, R, s_b0, s_b1)
    if DOT_BF16:
        b = b.to(tl.bfloat16)
    ps = tl.load(src_s + rows, mask=rok, other=0.0)
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        w, cols, m = _row_block_tile(
            src, ps, a_ptr, b, rows, rok, rr, k0, K, R, s_src, s_a0, s_a1, BK, DOT_BF16
        )
        amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(w), 0.0), axis=1))
    scale = tl.maximum(amax, 1e-12) / 448.0
    for k0 in range(0, K, BK):
        w, cols, m = _row_block_tile(
            src, ps, a_ptr, b, rows, rok, rr, k0, K, R, s_src, s_a0, s_a1, BK, DOT_BF16
        )
        y = tl.minimum(tl.maximum(w / scale[:, None], -448.0), 448.0)
        tl.store(dst + rows[:, None] * s_dst + cols[None, :], _to_fp8(y, EXACT), mask=m)
    tl.store(dst_s + rows, scale, mask=rok)


# The split variants: the same arithmetic on a 2-D grid of (row block, column block)
# tiles, in two launches. The one-program-per-row-block kernel above walks a whole row
# (5120-13824 columns) in one program: 160-432 programs for a 14B linear, about one wave
# on 132 SMs, each waiting on its own loads in turn (82 ms for a 14B re-merge on an H100,
# against a byte floor of ~13 ms). Here every tile is a program: pass 1 folds each tile's
# row maxima into `amax` with an atomic max (order-free, so deterministic), pass 2
# re-computes the tile and writes it quantised. Pass 2 never writes a row scale (another
# program of the same rows may still read the old one when merging in place): programs
# of column block 0 write the new scales to `out_s`, which the caller copies afterwards.


@triton.jit
def _merged_tile(src, src_s, b_ptr, a_ptr, cs_ptr, N, K, R, s_src, s_b0, s_b1, s_a0, s_a1,
                 BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                 DOT_BF16: tl.constexpr):  # fmt: skip
    """This program's tile of src · row scale + (B · diag(c)) @ A, in float32, with its
    rows, columns and mask."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rok, cok = rows < N, cols < K
    rr = tl.arange(0, BR)
    b = _scaled_b(b_ptr, cs_ptr, rows, rok, rr, R, s_b0, s_b1)
    a = tl.load(
        a_ptr + rr[:, None] * s_a0 + cols[None, :] * s_a1,
        mask=(rr[:, None] < R) & cok[None, :],
        other=0.0,
    )
    if DOT_BF16:
        d = tl.dot(b.to(tl.bfloat16), a.to(tl.bfloat16))
    else:
        d = tl.dot(b, a.to(tl.float32))
    m = rok[:, None] & cok[None, :]
    ps = tl.load(src_s + rows, mask=rok, other=0.0)
    p = tl.load(src + rows[:, None] * s_src + cols[None, :], mask=m, other=0.0)
    return p.to(tl.float32) * ps[:, None] + d, rows, cols, m


@triton.jit
def fp8_merge_amax_kernel(
    src, src_s, amax_ptr, b_ptr, a_ptr, cs_ptr, N, K, R,
    s_src, s_b0, s_b1, s_a0, s_a1,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, DOT_BF16: tl.constexpr,
):  # fmt: skip
    w, rows, cols, m = _merged_tile(
        src, src_s, b_ptr, a_ptr, cs_ptr, N, K, R, s_src, s_b0, s_b1, s_a0, s_a1,
        BM, BK, BR, DOT_BF16,
    )  # fmt: skip
    tmax = tl.max(tl.where(m, tl.abs(w), 0.0), axis=1)
    tl.atomic_max(amax_ptr + rows, tmax, mask=rows < N)


@triton.jit
def fp8_merge_write_kernel(
    src, src_s, dst, amax_ptr, out_s, b_ptr, a_ptr, cs_ptr, N, K, R,
    s_src, s_dst, s_b0, s_b1, s_a0, s_a1,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EXACT: tl.constexpr,
    DOT_BF16: tl.constexpr,
):  # fmt: skip
    w, rows, cols, m = _merged_tile(
        src, src_s, b_ptr, a_ptr, cs_ptr, N, K, R, s_src, s_b0, s_b1, s_a0, s_a1,
        BM, BK, BR, DOT_BF16,
    )  # fmt: skip
    rok = rows < N
    amax = tl.load(amax_ptr + rows, mask=rok, other=0.0)
    scale = tl.maximum(amax, 1e-12) / 448.0
    y = tl.minimum(tl.maximum(w / scale[:, None], -448.0), 448.0)
    tl.store(dst + rows[:, None] * s_dst + cols[None, :], _to_fp8(y, EXACT), mask=m)
    if tl.program_id(1) == 0:
        tl.store(out_s + rows, scale, mask=rok)
