"""The Triton kernel behind `engine.models.lora_merge.fp8_merge_rows_` (see there for why):
fp8 weight rows := quantize_rowwise(src · row scale + (B · diag(c)) @ A), in place allowed.
A module of its own so that importing the merge code needs no Triton, and the kernel is a
module-level function (Triton resolves `_to_fp8` from this module's globals)."""

import triton
import triton.language as tl

from engine.models.triton_attention import _to_fp8


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
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rok = rows < N
    rr = tl.arange(0, BR)
    b = tl.load(
        b_ptr + rows[:, None] * s_b0 + rr[None, :] * s_b1,
        mask=rok[:, None] & (rr[None, :] < R),
        other=0.0,
    ).to(tl.float32)
    b = b * tl.load(cs_ptr + rr, mask=rr < R, other=0.0)[None, :]
    if DOT_BF16:
        b = b.to(tl.bfloat16)
    ps = tl.load(src_s + rows, mask=rok, other=0.0)
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cok = cols < K
        a = tl.load(
            a_ptr + rr[:, None] * s_a0 + cols[None, :] * s_a1,
            mask=(rr[:, None] < R) & cok[None, :],
            other=0.0,
        ).to(tl.bfloat16 if DOT_BF16 else tl.float32)
        m = rok[:, None] & cok[None, :]
        p = tl.load(src + rows[:, None] * s_src + cols[None, :], mask=m, other=0.0)
        w = p.to(tl.float32) * ps[:, None] + tl.dot(b, a)
        amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(w), 0.0), axis=1))
    scale = tl.maximum(amax, 1e-12) / 448.0
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cok = cols < K
        a = tl.load(
            a_ptr + rr[:, None] * s_a0 + cols[None, :] * s_a1,
            mask=(rr[:, None] < R) & cok[None, :],
            other=0.0,
        ).to(tl.bfloat16 if DOT_BF16 else tl.float32)
        m = rok[:, None] & cok[None, :]
        p = tl.load(src + rows[:, None] * s_src + cols[None, :], mask=m, other=0.0)
        w = p.to(tl.float32) * ps[:, None] + tl.dot(b, a)
        y = tl.minimum(tl.maximum(w / scale[:, None], -448.0), 448.0)
        tl.store(dst + rows[:, None] * s_dst + cols[None, :], _to_fp8(y, EXACT), mask=m)
    tl.store(dst_s + rows, scale, mask=rok)
