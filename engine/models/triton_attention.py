"""Attention over two key sets with the Krea KV bias added inside the loop, as one Triton
kernel, in bf16/fp16 or on fp8 tensor cores.

Why: on an H100 at 832×480 the biased self-attention (4680 queries, 3120 biased + 6240 other
keys, 40 heads, head_dim 128) costs two cuDNN calls plus a log-sum-exp merge (2.2 ms); one
online softmax that walks set 1's tiles (logits + log b) and then set 2's needs no merge
and no second pass over the queries. fp8 halves the bytes and doubles the tensor-core rate.

`biased_attention(q, k1, v1, k2, v2, log_bias, *, fp8=False, qk_int8=False)`: q [B, Nq, H, D],
k1/v1 [B, N1, H, D] (the biased set, N1 may be 0), k2/v2 [B, N2, H, D], any strides along
B, N, H (views of a larger cache are read in place; D must be contiguous). `log_bias` is a
0-d float32 device tensor (read by the kernel from its pointer: no host sync) or None.
Returns a contiguous [B, Nq, H, D] in q's dtype. Registered as
an opaque `torch.library.custom_op` by default, so `torch.compile(fullgraph=True)` traces
it without a graph break and Inductor launches it as one unit. The `triton_op`
registration (Inductor sees the kernels; `DREAMDECK_TRITON_OPAQUE=0`) compiled the fp8
variant on an H100 but Inductor rejected the bf16 one inside the model's compiled blocks
(CompilationError in `_key_tiles`, docs/PERFORMANCE.md run 10), hence the default.

fp8 scaling (float8_e4m3fn, max 448), chosen so every scale is one pass, no global
reduction before quantising:
- q and k: one scale per (token, head) = amax over D / 448, written by the quantisation
  kernel next to the fp8 values; the softmax scale and log2(e) are folded into q's scale,
  so a logit is dot(q8, k8) · sq_i · sk_j. Per-token scales follow the spread of token
  norms that a per-head scale would flush.
- `qk_int8=True`: q and k in int8 instead (scale amax / 127, same per-token layout), QK^T
  on int8 tensor cores (same rate as fp8 on Hopper), as SageAttention 2 does: 7 bits of
  mantissa instead of 3 in the logits. The `triton-fp8` attention backend uses this.
- v: also one scale per (token, head). The scale multiplies a row of V, i.e. a column of
  P, so it is folded into P before P is quantised: P8 = p · (sv_j / max_tile sv) · 448 lies
  in [0, 448], and the tile's PV product is rescaled by max_tile sv / 448 in float32. The
  row sums (softmax denominator) use the unquantised float32 p.
- q, k and v are quantised by two small kernels (q; k and v of one set together), each
  reading its input once and writing fp8/int8 plus float32 scales. v is written transposed
  ([B, H, D, Npad], N contiguous) because Hopper's fp8 wgmma wants both operands K-major.
Measured relative L2 error against a float64 reference (random normal q·1.5, k, v, head_dim
32 and 64, bias 0.3; CPU interpreter, tests/test_triton_attention.py): fp32 inputs ≈ 2e-7;
fp8 with int8 QK^T ≈ 4e-2, fp8 with e4m3 QK^T ≈ 5e-2; a torch emulation of the same
rounding gives the same, and bf16-rounded inputs alone give 3e-3. Random normal data is the
hard case (outputs are averages of many values; errors do not shrink with them). On the
GPU, `python -m engine.models.triton_attention` prints each path's error at the real shapes.

fp8 needs tensor cores with fp8 (sm89+: Ada, Hopper); bf16/fp16 need sm80+. On the CPU the
kernels run under the Triton interpreter (`TRITON_INTERPRET=1` set before triton is imported),
which is how the tests check them; the interpreter uses one block configuration.
"""

from __future__ import annotations

import json
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_OPAQUE = os.environ.get("DREAMDECK_TRITON_OPAQUE", "1") == "1"  # see the module docstring
_LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
_QUANT_ROWS = 64  # tokens per program of the quantisation kernels


class TritonAttentionError(ValueError):
    """Inputs the kernel cannot take; the message names the argument."""


# --------------------------------------------------------------------------- quantisation


@triton.jit
def _to_fp8(x, EXACT: tl.constexpr):
    """float32 -> float8_e4m3fn. EXACT (the CPU interpreter only): round to the e4m3 grid
    by arithmetic first, because the interpreter's cast (Triton 3.9) drops the carry when a
    value rounds up to the next power of two (127 -> 64). On GPUs the hardware cast
    (round to nearest even) is used. Inputs are already within ±448."""
    if EXACT:
        a = tl.abs(x)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)  # -6: subnormals
        ulp = tl.exp2(e - 3.0)  # 3 mantissa bits
        r = tl.minimum(tl.floor(a / ulp + 0.5) * ulp, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_tile(
    x_ptr, o_ptr, s_ptr, b, h, n0, N, sx_b, sx_n, sx_h, so_b, so_h, so_n, so_d, ss_b, ss_h,
    post_scale, D: tl.constexpr, ROWS: tl.constexpr, EXACT: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """fp8 (or int8) values and one scale per token for a [ROWS, D] tile of one head."""
    rows = n0 + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    ok = rows[:, None] < N
    x = tl.load(
        x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_n + cols[None, :], mask=ok, other=0.0
    )
    x = x.to(tl.float32)
    # a floor keeps all-zero rows finite (their values quantise to 0 anyway)
    qmax = 127.0 if INT8 else 448.0
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / qmax
    y = tl.minimum(tl.maximum(x / scale[:, None], -qmax), qmax)
    optr = o_ptr + b * so_b + h * so_h + rows[:, None] * so_n + cols[None, :] * so_d
    if INT8:  # round half away from zero; the cast alone would truncate
        tl.store(optr, tl.where(y < 0, -tl.floor(-y + 0.5), tl.floor(y + 0.5)).to(tl.int8), mask=ok)
    else:
        tl.store(optr, _to_fp8(y, EXACT), mask=ok)
    tl.store(s_ptr + b * ss_b + h * ss_h + rows, scale * post_scale, mask=rows < N)


@triton.jit
def _quant_kernel(
    x_ptr, xo_ptr, xs_ptr, y_ptr, yo_ptr, ys_ptr, N, H,
    sx_b, sx_n, sx_h, sxo_b, sxo_h, sxo_n, sxo_d,
    sy_b, sy_n, sy_h, syo_b, syo_h, syo_n, syo_d,
    ss_b, ss_h, x_post, D: tl.constexpr, ROWS: tl.constexpr, PAIR: tl.constexpr,
    EXACT: tl.constexpr, X_INT8: tl.constexpr,
):  # fmt: skip
    """Quantise x (and y when PAIR: the k and v of one key set in one launch). y is always
    fp8 (values); x is int8 when X_INT8 (q or k for an int8 QK^T)."""
    n0 = tl.program_id(0) * ROWS
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    _quant_tile(x_ptr, xo_ptr, xs_ptr, b, h, n0, N, sx_b, sx_n, sx_h,
                sxo_b, sxo_h, sxo_n, sxo_d, ss_b, ss_h, x_post, D, ROWS, EXACT, X_INT8)  # fmt: skip
    if PAIR:
        _quant_tile(y_ptr, yo_ptr, ys_ptr, b, h, n0, N, sy_b, sy_n, sy_h,
                    syo_b, syo_h, syo_n, syo_d, ss_b, ss_h, 1.0, D, ROWS, EXACT, False)  # fmt: skip


# --------------------------------------------------------------------------- attention


@triton.jit
def _key_tiles(
    acc, m_i, l_i, q, sq, k_ptr, v_ptr, sk_ptr, sv_ptr, s_kn, s_kd, s_vn, s_vd,
    lo, hi, N, qk_scale, bias2,
    BLOCK_N: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, BIAS: tl.constexpr,
    FP8: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [lo, hi) of one set (base-2 logits). MASK only for the
    last, partial tile, so the main loop has no bounds checks."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        # The contiguous axis is written as a literal 1 (not a stride argument), so the
        # compiler vectorises the loads whether or not the launcher specialises strides
        # equal to 1: head_dim for K (checked on the host), tokens for the fp8 V buffer.
        kp = k_ptr + cols[None, :] * s_kn + offs_d[:, None]  # K^T tile [D, BLOCK_N]
        if FP8:
            vp = v_ptr + cols[:, None] + offs_d[None, :] * s_vd  # V tile [BLOCK_N, D]
        else:
            vp = v_ptr + cols[:, None] * s_vn + offs_d[None, :]
        if MASK:
            valid = cols < N
            kt = tl.load(kp, mask=valid[None, :], other=0.0)
        else:
            kt = tl.load(kp)
        s = tl.dot(q, kt)
        if FP8:
            if MASK:
                sk = tl.load(sk_ptr + cols, mask=valid, other=0.0)
            else:
                sk = tl.load(sk_ptr + cols)
            s = s.to(tl.float32) * sq[:, None] * sk[None, :]  # int8 QK^T gives int32
        else:
            s = s * qk_scale
        if BIAS:
            s = s + bias2
        if MASK:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASK:
            v = tl.load(vp, mask=valid[:, None], other=0.0)
        else:
            v = tl.load(vp)
        if FP8:
            if MASK:
                sv = tl.load(sv_ptr + cols, mask=valid, other=0.0)
            else:
                sv = tl.load(sv_ptr + cols)
            sv_max = tl.maximum(tl.max(sv, axis=0), 1e-30)
            p8 = _to_fp8(p * (sv * (448.0 / sv_max))[None, :], EXACT)
            # accumulate in place in this tile's units (no second [M, D] accumulator, which
            # made the 128x128 tile spill registers on sm90), then back
            c = sv_max / 448.0
            acc = tl.dot(p8, v, acc * (alpha / c)[:, None]) * c
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_set(
    acc, m_i, l_i, q, sq, k_ptr, v_ptr, sk_ptr, sv_ptr, s_kn, s_kd, s_vn, s_vd,
    N, qk_scale, bias2,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BIAS: tl.constexpr, FP8: tl.constexpr,
    EXACT: tl.constexpr,
):  # fmt: skip
    """All N keys of one set: the whole tiles without bounds checks, then the partial one."""
    full = (N // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _key_tiles(acc, m_i, l_i, q, sq, k_ptr, v_ptr, sk_ptr, sv_ptr, s_kn, s_kd,
                               s_vn, s_vd, 0, full, N, qk_scale, bias2, BLOCK_N, D, False,
                               BIAS, FP8, EXACT)  # fmt: skip
    return _key_tiles(acc, m_i, l_i, q, sq, k_ptr, v_ptr, sk_ptr, sv_ptr, s_kn, s_kd, s_vn,
                      s_vd, full, N, N, qk_scale, bias2, BLOCK_N, D, True, BIAS, FP8,
                      EXACT)  # fmt: skip


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # numpy per program: one small configuration keeps the tests fast
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # H100: 128-query tiles with 8 warps are the usual winners at head_dim 128; 64-wide
    # tiles stay for small head dims and short key sets.
    # 128-query tiles with 4 warps spill registers (ptxas, sm90, Triton 3.9): left out.
    shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
              (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 3), (64, 64, 4, 2)]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


@triton.autotune(configs=_configs(), key=["N1", "N2", "D", "FP8"])
@triton.jit
def _attn_kernel(
    q_ptr, k1_ptr, v1_ptr, k2_ptr, v2_ptr, o_ptr, bias_ptr,
    sq_ptr, sk1_ptr, sv1_ptr, sk2_ptr, sv2_ptr,
    s_qb, s_qh, s_qn, s_qd,
    s_k1b, s_k1h, s_k1n, s_k1d, s_v1b, s_v1h, s_v1n, s_v1d,
    s_k2b, s_k2h, s_k2n, s_k2d, s_v2b, s_v2h, s_v2n, s_v2d,
    s_ob, s_oh, s_on,
    s_sb, s_sh, s_s1b, s_s1h, s_s2b, s_s2h,
    H, Nq, N1, N2, qk_scale,
    D: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, head) against set 1 (biased), then set 2.
    Strides are given per tensor and per axis (b, h, n, d), so [B,N,H,D] views of a cache
    and the fp8 buffers ([B,H,N,D] and transposed [B,H,D,N] for v) share this code."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = rows < Nq
    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if FP8:
        sq = tl.load(sq_ptr + b * s_sb + h * s_sh + rows, mask=row_ok, other=0.0)
    else:
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    bias2 = 0.0
    if HAS_BIAS:
        # clamped so log b = -inf (b = 0) still gives finite arithmetic: set 1 is ignored
        bias2 = tl.maximum(tl.load(bias_ptr).to(tl.float32) * 1.4426950408889634, -1e30)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    k1 = k1_ptr + b * s_k1b + h * s_k1h
    v1 = v1_ptr + b * s_v1b + h * s_v1h
    sk1 = sk1_ptr + b * s_s1b + h * s_s1h
    sv1 = sv1_ptr + b * s_s1b + h * s_s1h
    acc, m_i, l_i = _key_set(acc, m_i, l_i, q, sq, k1, v1, sk1, sv1, s_k1n, s_k1d, s_v1n,
                             s_v1d, N1, qk_scale, bias2, BLOCK_N, D, HAS_BIAS, FP8,
                             EXACT)  # fmt: skip
    k2 = k2_ptr + b * s_k2b + h * s_k2h
    v2 = v2_ptr + b * s_v2b + h * s_v2h
    sk2 = sk2_ptr + b * s_s2b + h * s_s2h
    sv2 = sv2_ptr + b * s_s2b + h * s_s2h
    acc, m_i, l_i = _key_set(acc, m_i, l_i, q, sq, k2, v2, sk2, sv2, s_k2n, s_k2d, s_v2n,
                             s_v2d, N2, qk_scale, bias2, BLOCK_N, D, False, FP8,
                             EXACT)  # fmt: skip
    out = acc / l_i[:, None]
    optr = o_ptr + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :]
    tl.store(optr, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- host side


def _quantize(x: Tensor, y: Tensor | None, post: float, x_int8: bool = False):
    """fp8 (x: int8 if `x_int8`) copies of x and y plus float32 scales [B, H, N] (x's
    multiplied by `post`). x goes to [B, H, N, D]; y
    (the values) to [B, H, D, Npad] with N contiguous and Npad a multiple of 16 so every
    row of the transposed tile starts 16-byte aligned."""
    from torch.library import wrap_triton

    B, N, H, D = x.shape
    xo = torch.empty((B, H, N, D), device=x.device, dtype=torch.int8 if x_int8 else FP8_DTYPE)
    xs = torch.empty((B, H, N), device=x.device, dtype=torch.float32)
    yo, ys = xo, xs
    if y is not None:
        npad = -(-N // 16) * 16
        yo = torch.empty((B, H, D, npad), device=x.device, dtype=FP8_DTYPE)
        ys = torch.empty((B, H, N), device=x.device, dtype=torch.float32)
    yt = y if y is not None else x
    grid = (triton.cdiv(N, _QUANT_ROWS), B * H)
    if N > 0:
        wrap_triton(_quant_kernel)[grid](
            x, xo, xs, yt, yo, ys, N, H,
            x.stride(0), x.stride(1), x.stride(2), *xo.stride(),
            yt.stride(0), yt.stride(1), yt.stride(2),
            yo.stride(0), yo.stride(1), yo.stride(3), yo.stride(2),
            xs.stride(0), xs.stride(1), post,
            D=D, ROWS=_QUANT_ROWS, PAIR=y is not None, EXACT=_INTERPRET, X_INT8=x_int8,
            num_warps=4,
        )  # fmt: skip
    return xo, xs, yo, ys


def _attention_impl(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    log_bias: Tensor | None,
    fp8: bool,
    qk_int8: bool,
) -> Tensor:
    from torch.library import wrap_triton

    B, Nq, H, D = q.shape
    N1, N2 = k1.shape[1], k2.shape[1]
    out = torch.empty((B, Nq, H, D), device=q.device, dtype=q.dtype)
    if _INTERPRET and is_fake(q):
        # wrap_triton hands interpreter kernels back raw (they cannot be traced): dynamo's
        # shape pass gets only the output's metadata; a graph capture (AOT) cannot work.
        from torch._subclasses.functional_tensor import FunctionalTensor

        if isinstance(q, FunctionalTensor):
            raise TritonAttentionError(
                "the Triton interpreter's kernels cannot be captured into a graph: compile with "
                "backend='eager' or use the opaque registration (DREAMDECK_TRITON_OPAQUE=1, the default)"
            )
        return out
    qk_scale = D**-0.5 * _LOG2E
    if fp8:
        # [B,H,N,D] / [B,H,D,Npad] buffers: strides in (b, h, n, d) order for the kernel
        q_, sq, _, _ = _quantize(q, None, qk_scale, qk_int8)
        k1_, sk1, v1_, sv1 = _quantize(k1, v1, 1.0, qk_int8)
        k2_, sk2, v2_, sv2 = _quantize(k2, v2, 1.0, qk_int8)
        st = lambda t: (t.stride(0), t.stride(1), t.stride(2), t.stride(3))  # noqa: E731
        sv = lambda t: (t.stride(0), t.stride(1), t.stride(3), t.stride(2))  # noqa: E731
        q_s, k1_s, v1_s, k2_s, v2_s = st(q_), st(k1_), sv(v1_), st(k2_), sv(v2_)
        sc = (
            sq.stride(0),
            sq.stride(1),
            sk1.stride(0),
            sk1.stride(1),
            sk2.stride(0),
            sk2.stride(1),
        )
    else:
        q_, k1_, v1_, k2_, v2_ = q, k1, v1, k2, v2
        sq = sk1 = sv1 = sk2 = sv2 = q  # unused pointers (FP8 is off)
        # model layout [B,N,H,D]: reorder strides to (b, h, n, d)
        st = lambda t: (t.stride(0), t.stride(2), t.stride(1), t.stride(3))  # noqa: E731
        q_s, k1_s, v1_s, k2_s, v2_s = st(q), st(k1), st(v1), st(k2), st(v2)
        sc = (0, 0, 0, 0, 0, 0)
    bias = log_bias if log_bias is not None else q_  # unused pointer when HAS_BIAS is off

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    wrap_triton(_attn_kernel)[grid](
        q_, k1_, v1_, k2_, v2_, out, bias, sq, sk1, sv1, sk2, sv2,
        *q_s, *k1_s, *v1_s, *k2_s, *v2_s,
        out.stride(0), out.stride(2), out.stride(1),
        *sc, H, Nq, N1, N2, qk_scale,
        D=D, HAS_BIAS=log_bias is not None, FP8=fp8, EXACT=_INTERPRET,
    )  # fmt: skip
    return out


# Two registrations of the same body. The opaque `custom_op` (the default) runs as one
# unit under Inductor; `triton_op` (DREAMDECK_TRITON_OPAQUE=0) lets Inductor see and
# inline the kernels, which failed for the bf16 variant on the H100 (module docstring).
# Both are traced by dynamo with fullgraph=True.
_biased_attention_op = torch.library.triton_op("dreamdeck::biased_attention", mutates_args=())(
    _attention_impl
)


@torch.library.custom_op("dreamdeck::biased_attention_opaque", mutates_args=())
def _biased_attention_opaque(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    log_bias: Tensor | None,
    fp8: bool,
    qk_int8: bool,
) -> Tensor:
    return _attention_impl(q, k1, v1, k2, v2, log_bias, fp8, qk_int8)


@_biased_attention_opaque.register_fake
def _(q, k1, v1, k2, v2, log_bias, fp8, qk_int8):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)


def _check(q: Tensor, k1: Tensor, v1: Tensor, k2: Tensor, v2: Tensor, log_bias, fp8) -> None:
    """Clear errors for inputs the kernel cannot take (it would read out of bounds or
    compute garbage otherwise)."""
    named = {"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise TritonAttentionError(f"{name} must be a 4-d tensor [B, N, H, D]")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TritonAttentionError(
                f"{name} has dtype {t.dtype}; use bfloat16, float16 or float32"
            )
        if t.dtype != q.dtype:
            raise TritonAttentionError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
        if t.device != q.device:
            raise TritonAttentionError(f"{name} is on {t.device}, q on {q.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise TritonAttentionError(f"{name} must be contiguous along head_dim (last axis)")
    B, _, H, D = q.shape
    if D < 16 or D > 256 or D & (D - 1):
        raise TritonAttentionError(f"head_dim {D} is not supported: use a power of 2 in 16..256")
    for a, b in (("k1", "v1"), ("k2", "v2")):
        if named[a].shape != named[b].shape:
            raise TritonAttentionError(
                f"{a} {tuple(named[a].shape)} and {b} {tuple(named[b].shape)} differ"
            )
    for name in ("k1", "k2"):
        t = named[name]
        if (t.shape[0], t.shape[2], t.shape[3]) != (B, H, D):
            raise TritonAttentionError(
                f"{name} {tuple(t.shape)} does not match q {tuple(q.shape)} in B, H or D"
            )
    if k1.shape[1] + k2.shape[1] == 0:
        raise TritonAttentionError("no keys: k1 and k2 are both empty")
    if log_bias is not None:
        if not isinstance(log_bias, Tensor) or log_bias.numel() != 1:
            raise TritonAttentionError("log_bias must be a one-element float32 tensor or None")
        if log_bias.dtype != torch.float32 or log_bias.device != q.device:
            raise TritonAttentionError(
                f"log_bias must be float32 on {q.device}, not {log_bias.dtype} on {log_bias.device}"
            )
    if q.device.type == "cuda":
        cap = torch.cuda.get_device_capability(q.device)
        if fp8 and cap < (8, 9):
            raise TritonAttentionError(
                f"fp8 attention needs fp8 tensor cores (sm89+), not sm{cap[0]}{cap[1]}"
            )
    elif not _INTERPRET:
        raise TritonAttentionError(
            f"Triton attention runs on CUDA (or on the CPU with TRITON_INTERPRET=1), not {q.device}"
        )


def biased_attention(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    log_bias: Tensor | None,
    *,
    fp8: bool = False,
    qk_int8: bool = False,
) -> Tensor:
    """softmax over [k1; k2] with `log_bias` added to the logits of k1 (None: no bias),
    times [v1; v2], exactly (online softmax, one launch). Shapes [B, N, H, D]; see the
    module docstring for fp8."""
    _check(q, k1, v1, k2, v2, log_bias, fp8)
    if log_bias is not None and log_bias.dim() != 0:
        log_bias = log_bias.reshape(())
    if qk_int8 and not fp8:
        raise TritonAttentionError("qk_int8 is a variant of the fp8 path: pass fp8=True with it")
    op = _opaque_op() if _OPAQUE else torch.ops.dreamdeck.biased_attention
    return op(q, k1, v1, k2, v2, log_bias, fp8, qk_int8)


def _opaque_op():
    return torch.ops.dreamdeck.biased_attention_opaque


# --------------------------------------------------------------------------- benchmark


def reference(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    log_bias: float | None,
    chunk: int = 512,
) -> Tensor:
    """float32 attention over [k1; k2] with log b on set 1, in query chunks (the dense
    logits of the real shape would need 7 GB)."""
    k = torch.cat([k1, k2], 1).float()
    v = torch.cat([v1, v2], 1).float()
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    for i in range(0, q.shape[1], chunk):
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, i : i + chunk].float(), k) * q.shape[-1] ** -0.5
        if log_bias is not None:
            s[..., : k1.shape[1]] += log_bias
        out[:, i : i + chunk] = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def _time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _bench_shape(
    nq: int, n1: int, n2: int, heads: int, head_dim: int, bias: float, compiled: bool
) -> dict:
    """One shape: every path's median ms, TFLOP/s and error against float32. A failing
    path is recorded with its error and the others still run."""
    from engine.models.attention import Attention

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k1, v1, k2, v2 = (
        torch.randn(1, n, heads, head_dim, device=dev, generator=g).bfloat16()
        for n in (nq, n1, n1, n2, n2)
    )
    lb = torch.tensor(math.log(bias), device=dev)
    ref = reference(q, k1, v1, k2, v2, math.log(bias))
    flops = 4 * nq * (n1 + n2) * heads * head_dim
    cudnn = Attention("cudnn")
    args = (q, k1, v1, k2, v2, lb)
    paths = {
        "cudnn_lse_merge": lambda: cudnn.biased(*args),
        "triton_bf16": lambda: biased_attention(*args),
        "triton_fp8": lambda: biased_attention(*args, fp8=True),
        "triton_fp8_qk_int8": lambda: biased_attention(*args, fp8=True, qk_int8=True),
    }
    if compiled:  # inside a compiled graph, as the model's blocks run it (fullgraph: no break)
        f = torch.compile(
            lambda *a: biased_attention(*a, fp8=True, qk_int8=True), fullgraph=True, dynamic=False
        )
        paths["triton_fp8_qk_int8_compiled"] = lambda: f(*args)

    def quant():  # what the fp8 path pays before its first dot
        _quantize(q, None, 1.0, True)
        _quantize(k1, v1, 1.0, True)
        _quantize(k2, v2, 1.0, True)

    row: dict = {"Nq": nq, "N1": n1, "N2": n2, "H": heads, "D": head_dim}
    for name, fn in paths.items():
        try:
            err = _rel(fn(), ref)
            ms = _time_ms(fn)
            row[name] = {
                "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9, 1),
                "rel_l2": float(f"{err:.3g}"),
            }
        except Exception as e:  # report and go on: the other paths still get measured
            row[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"  {name}: {row[name]}", flush=True)
    from engine.models.attention import _importable

    if _importable("sageattention"):  # PyPI's 1.x has no log-sum-exp: plain attention only
        ref_plain = reference(q, k1[:, :0], v1[:, :0], k2, v2, 0.0)
        for name, fn in (
            ("cudnn_plain_k2", lambda: cudnn(q, k2, v2)),
            ("sage_plain_k2", lambda: Attention("sage")(q, k2, v2)),
        ):
            try:
                err = _rel(fn(), ref_plain)
                ms = _time_ms(fn)
                row[name] = {"ms": round(ms, 4), "rel_l2": float(f"{err:.3g}")}
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {name}: {row[name]}", flush=True)

    try:
        row["fp8_quantize_only"] = {"ms": round(_time_ms(quant), 4)}
    except Exception as e:
        row["fp8_quantize_only"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(f"  fp8_quantize_only: {row['fp8_quantize_only']}", flush=True)
    try:
        row["autotune_best"] = {str(k): str(v) for k, v in _attn_kernel.cache.items()}
    except Exception:
        pass
    return row


def benchmark(
    shapes: dict[str, tuple[int, int, int]] | None = None,
    heads: int = 40,
    head_dim: int = 128,
    bias: float = 0.3,
    compiled: bool = True,
) -> dict:
    """Time the cuDNN two-call path against the Triton kernel (bf16; fp8 with e4m3 or int8
    QK^T; the latter compiled) at the real shapes (B=1): median of 20 CUDA-event timings
    after warm-up, TFLOP/s counting 4·Nq·(N1+N2)·H·D, relative L2 error against float32."""
    shapes = shapes or {"832x480": (4680, 3120, 6240), "576x320": (2160, 1440, 2880)}
    dev = torch.device("cuda")
    results: dict = {
        "device": torch.cuda.get_device_name(dev),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shapes": {},
    }
    for name, (nq, n1, n2) in shapes.items():
        print(f"[{name}] Nq={nq} N1={n1} N2={n2} H={heads} D={head_dim}", flush=True)
        try:
            results["shapes"][name] = _bench_shape(nq, n1, n2, heads, head_dim, bias, compiled)
        except Exception as e:  # e.g. out of memory for the reference: the next shape still runs
            results["shapes"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  failed: {results['shapes'][name]}", flush=True)
        torch.cuda.empty_cache()
    return results


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: the benchmark times GPU kernels"}))
        return
    res = benchmark()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
