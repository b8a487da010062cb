"""Merging low-rank LoRA deltas into weights in place, with bounded scratch memory.

Why a module of its own: the LoRA slots (engine/models/lora.py) merge
``W = base + (B · diag(c)) @ A`` (``c`` the per-rank-column strength × alpha/rank) every
time strengths settle, and, with the pristine weights on the device, at EVERY block while a
strength moves. On the 14B that is 14 G weights per block, so the bytes moved decide the
cost (H100, ~3 TB/s):

- bf16 / fp32 linears: one ``addmm`` per part, written straight into the weight's storage
  (``out=``): read the pristine once, write the weight once, 4 B per bf16 weight, no
  float32 scratch (cuBLAS adds C in float32 before its one rounding).
- fp8 linears (engine/models/fp8.py, one scale per row): the merged row must be
  re-quantised with a new row scale, which needs the row's absolute maximum before any
  value is written. `fp8_merge_rows_` does it in Triton (`VARIANTS`): ``src·scale +
  (B·c) @ A`` is computed tile by tile in registers (the low-rank product is recomputed,
  K = rank is small), the row maxima in a first pass and the fp8 values written in a
  second: ~3 B per weight (read fp8 twice, write fp8 once), no weight-sized scratch. The
  "rows" variants give each program whole rows (one launch); the "split" variants one
  program per tile in two launches (row maxima by atomic max, then the writes), for the
  parallelism a linear's few row blocks lack. Both may run in place (src is dst): a
  program reads a tile before it writes that tile, no other program writes it, and the
  split variants copy the new row scales only after the second launch.
- Anything else (CPU, `.diff` full differences): `merge_rows_reference`, float32 in row
  chunks of at most `chunk_elems` through one reused scratch buffer, so the scratch is
  bounded (was: a float32 copy of the whole weight plus the float32 delta, ~0.6 GB for a
  14B FFN linear) and the allocator sees one block size, not hundreds.

The rounding is the still path's: float32 sums, one cast (or per-row re-quantisation with
`quantize_rowwise`'s formula).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from engine.models.fp8 import FP8, FP8_MAX, quantize_rowwise

# Rows per GEMM of the general merge (fixed, so chunking never changes a result); weight
# columns per tile of the fp8 merge kernel (rows per program: VARIANTS).
TILE = 64
_BK = 128


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())


def scaled_up(B: Tensor, colscale: Tensor) -> Tensor:
    """``B · diag(colscale)`` in float32 (rows × rank: small)."""
    return B.float() * colscale


def linear_merge_rows_(dst: Tensor, src: Tensor, B: Tensor, A: Tensor, colscale: Tensor) -> None:
    """dst := src + (B·diag(colscale)) @ A for a bf16/fp16/fp32 weight's rows. `dst` and
    `src` may be the same tensor (the pristine staged into the weight first)."""
    if dst.dtype == torch.float32:
        Bs, Af = scaled_up(B, colscale), A.float()
    else:  # cuBLAS: float32 accumulation, C added in float32, one rounding
        Bs, Af = scaled_up(B, colscale).to(dst.dtype), A.to(dst.dtype)
    if dst.data_ptr() == src.data_ptr():
        dst.addmm_(Bs, Af)
    else:
        torch.addmm(src, Bs, Af, out=dst)


def merge_rows_reference(
    dst_w: Tensor,
    dst_s: Tensor | None,
    src_w: Tensor,
    src_s: Tensor | None,
    parts: list[tuple[int, Tensor, Tensor, Tensor]],
    diffs: list[tuple[int, float, Tensor]],
    scratch: Tensor,
) -> None:
    """The general merge, in float32 row chunks through `scratch` (1-D float32; its size
    decides the chunk, at least `TILE` rows): rows of dst := src (dequantised when
    `src_s`) + Σ parts + Σ diffs, cast, or re-quantised per row when `dst_s` (fp8).
    `parts`: (first row, B rows × r, A r × in, colscale r); `diffs`: (first row,
    strength, rows × in). `src_w` may live on the host (copied chunk by chunk).

    The result does not depend on the chunk size, bit for bit: every low-rank product is
    one GEMM per `TILE` rows counted from its part's first row, whatever the chunking
    (a BLAS GEMM's rounding may depend on how many rows it is given), and everything else
    is elementwise or per row."""
    if dst_w.dim() == 1:  # a norm's weight (`.diff` only): one row
        dst_w, src_w = dst_w.view(1, -1), src_w.view(1, -1)
        diffs = [(r0, s, d.view(1, -1)) for r0, s, d in diffs]
    n_out, n_in = dst_w.shape
    per = max(TILE, scratch.numel() // n_in)
    if per * n_in > scratch.numel():
        scratch = torch.empty(per * n_in, device=scratch.device)  # too small: a bigger one
    lows = [(r0, scaled_up(B, c), A.float()) for r0, B, A, c in parts]
    # row blocks: one part's tile at most, so a chunk holds whole GEMM tiles
    # (parts cover disjoint rows; rows outside them are cut every TILE rows too)
    cuts, spans = {0, n_out}, []
    for r0, Bs, _ in lows:
        cuts.update(range(r0, r0 + Bs.shape[0], TILE))
        cuts.add(r0 + Bs.shape[0])
        spans.append((r0, r0 + Bs.shape[0]))
    at = 0
    for g0, g1 in sorted(spans) + [(n_out, n_out)]:
        cuts.update(range(at, g0, TILE))
        at = max(at, g1)
    bounds = sorted(c for c in cuts if 0 <= c <= n_out)
    a = 0
    while a < n_out:
        b = a
        for c in bounds:  # the furthest block boundary within `per` rows (at least one)
            if c > a and (c - a <= per or b == a):
                b = c
            elif c > a:
                break
        w = scratch[: (b - a) * n_in].view(b - a, n_in)
        w.copy_(src_w[a:b])
        if src_s is not None:
            w.mul_(src_s[a:b].to(w.device).view(-1, 1))
        for r0, Bs, Af in lows:
            r1 = r0 + Bs.shape[0]
            for t0 in range(max(a, r0), min(b, r1), TILE):  # tile starts: r0 + j * TILE
                t1 = min(t0 + TILE, r1)
                w[t0 - a : t1 - a].addmm_(Bs[t0 - r0 : t1 - r0], Af)
        for r0, s, d in diffs:
            lo, hi = max(a, r0), min(b, r0 + d.shape[0])
            if lo < hi:  # product then sum, both rounded alike in SIMD and scalar code
                w[lo - a : hi - a].add_(d[lo - r0 : hi - r0].float() * s)
        if dst_s is not None:
            q, sc = quantize_rowwise(w)
            dst_w[a:b].copy_(q)
            dst_s[a:b].copy_(sc.view(-1))
        else:
            dst_w[a:b].copy_(w)
        a = b


def fp8_merge_rows_(
    dst_q: Tensor,
    dst_s: Tensor,
    src_q: Tensor,
    src_s: Tensor,
    B: Tensor,
    A: Tensor,
    colscale: Tensor,
    variant: str | None = None,
) -> None:
    """fp8 rows: dst := quantize_rowwise(src_q · src_s + (B·diag(colscale)) @ A), in one
    Triton kernel (CUDA, or the Triton interpreter on the CPU), in place allowed.
    dst_s / src_s: 1-D float32 row scales of these rows."""
    n, k = dst_q.shape
    r = A.shape[0]
    if n == 0:
        return
    for t in (dst_q, src_q):
        if t.stride(1) != 1:
            raise ValueError("fp8 merge: weight rows must be contiguous")
    br = _pow2(r)
    kind, bm, bk, dot_bf16 = VARIANTS[variant or fp8_variant]
    if dot_bf16 and (_interpret() or A.dtype != torch.bfloat16):
        dot_bf16 = False  # the interpreter's bf16 dot is unreliable; float32 factors: tf32
        if kind == "rows":
            bm = VARIANTS["tf32-32"][1]
    if kind == "rows":
        bk = bk if br <= 128 else 64
        _kernel()[(triton_cdiv(n, bm),)](
            src_q, src_s, dst_q, dst_s, B, A, colscale.float().contiguous(),
            n, k, r, src_q.stride(0), dst_q.stride(0), B.stride(0), B.stride(1),
            A.stride(0), A.stride(1),
            BM=bm, BK=bk, BR=br, EXACT=_interpret(), DOT_BF16=dot_bf16,
        )  # fmt: skip
        return
    from engine.models import lora_merge_triton as K

    if br > 64:  # wide ranks (several slots on one site): smaller tiles, fewer registers
        bm, bk = min(bm, 64), min(bk, 128 if br <= 128 else 64)
    cs = colscale.float().contiguous()
    scratch = torch.zeros(2 * n, device=dst_q.device)  # row maxima, then the new scales
    amax, out_s = scratch[:n], scratch[n:]
    grid = (triton_cdiv(n, bm), triton_cdiv(k, bk))
    K.fp8_merge_amax_kernel[grid](
        src_q, src_s, amax, B, A, cs, n, k, r,
        src_q.stride(0), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        BM=bm, BK=bk, BR=br, DOT_BF16=dot_bf16,
    )  # fmt: skip
    K.fp8_merge_write_kernel[grid](
        src_q, src_s, dst_q, amax, out_s, B, A, cs, n, k, r,
        src_q.stride(0), dst_q.stride(0), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        BM=bm, BK=bk, BR=br, EXACT=_interpret(), DOT_BF16=dot_bf16,
    )  # fmt: skip
    dst_s.copy_(out_s)


# Kernel variants: (kind, rows per tile, columns per tile, low-rank product on bf16 tensor
# cores, else tf32). "rows": one program walks whole rows (lora_merge_triton.fp8_merge_kernel);
# "tf32-32" is the one measured on an H100 (docs/PERFORMANCE.md: 82 ms per 14B re-merge).
# "split": one program per tile in two launches (fp8_merge_amax_kernel, then
# fp8_merge_write_kernel), for the parallelism a 14B linear's 160-432 row blocks lack.
# `pick_fp8_variant` times them all on a real weight at warm-up and keeps the fastest one
# that agrees.
VARIANTS = {
    "tf32-32": ("rows", 32, _BK, False),
    "bf16-64": ("rows", 64, _BK, True),
    "split-64x128": ("split", 64, 128, True),
    "split-64x256": ("split", 64, 256, True),
    "split-128x128": ("split", 128, 128, True),
}
# The default until `pick_fp8_variant` has timed them (warm-up; a warm start skips it): the
# one variant that has run on a GPU so far. The split variants pass the interpreter tests
# but were never run on a GPU (no device came this session), so none is the default before
# warm-up has checked it against this one on the card in hand.
fp8_variant = "tf32-32"


def pick_fp8_variant(src_q: Tensor, src_s: Tensor, rank: int = 64, reps: int = 3) -> dict:
    """Time every kernel variant merging `src_q` (a real fp8 weight, its 1-D row scales)
    with a random rank-`rank` delta into a throwaway tensor, check each against the
    measured variant (row scales within 1e-3, values within one fp8 step), and make the
    fastest correct one the default (`fp8_variant`). CUDA only; returns {variant: ms or
    the error}."""
    global fp8_variant
    if src_q.device.type != "cuda":
        return {}
    g = torch.Generator(device=src_q.device).manual_seed(0)
    n, k = src_q.shape
    B = (torch.randn(n, rank, device=src_q.device, generator=g) * 0.02).to(torch.bfloat16)
    A = (torch.randn(rank, k, device=src_q.device, generator=g) * k**-0.5).to(torch.bfloat16)
    cs = torch.ones(rank, device=src_q.device)
    ref_q, ref_s = torch.empty_like(src_q), torch.empty_like(src_s)
    fp8_merge_rows_(ref_q, ref_s, src_q, src_s, B, A, cs, variant="tf32-32")
    out: dict = {}
    for name in VARIANTS:
        q, s = torch.empty_like(src_q), torch.empty_like(src_s)
        try:
            fp8_merge_rows_(q, s, src_q, src_s, B, A, cs, variant=name)  # JIT, warm
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            for _ in range(reps):
                fp8_merge_rows_(q, s, src_q, src_s, B, A, cs, variant=name)
            ev[1].record()
            ev[1].synchronize()
            ok = ((s - ref_s).abs() <= 1e-3 * ref_s.abs()).all()
            codes = (q.view(torch.uint8).int() - ref_q.view(torch.uint8).int()).abs()
            ok = bool(ok) and int(codes.max()) <= 1
            out[name] = ev[0].elapsed_time(ev[1]) / reps if ok else "disagrees"
        except Exception as e:  # a variant that does not build here is not used
            out[name] = f"{type(e).__name__}: {e}"[:200]
    timed = {v: ms for v, ms in out.items() if isinstance(ms, float)}
    if timed:
        fp8_variant = min(timed, key=timed.get)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """The fp8 kernel runs here: a CUDA device with Triton, or the interpreter (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpret())


def _kernel():
    """Imported on first use, so this module needs no Triton (CPU installs)."""
    from engine.models.lora_merge_triton import fp8_merge_kernel

    return fp8_merge_kernel


__all__ = [
    "FP8",
    "FP8_MAX",
    "fp8_merge_rows_",
    "linear_merge_rows_",
    "merge_rows_reference",
    "triton_usable",
]
