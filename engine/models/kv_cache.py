"""The self-attention KV cache of the stream: only the 3 context latent frames are kept.

Per layer the cache holds K and V of the context, in slot order

    slot:      0      1      2
    frame:   ctx1   ctx2  anchor
    time pos:  1      2      0

The current block's own K/V (3 more frames) are not cached: they are rewritten at every
denoising step and read only by that same forward, so they go into one scratch buffer
shared by all layers (layers run one after another). That halves the cache against a
6-frame-per-layer layout (14B at 832x480: 3.8 GB instead of 7.7 GB in bf16) with the same
attention: keys = [ctx1, ctx2 | anchor, current], the KV bias on the first set.

`fp8=True` stores the context K/V in float8 e4m3 with one float32 scale per (token, head),
a further halving (1.9 GB), and dequantises a layer's context into the scratch when that
layer attends. That is lossy; `dreamdeck bench --kv-cache fp8 --drift N` measures the drift
it causes against the bf16 cache.

Everything here is plain tensor code with static shapes: safe inside compiled blocks and
free of host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from engine.models.fp8 import FP8, quantize_rowwise

CONTEXT_FRAMES = 3  # ctx1, ctx2, anchor
BIASED_FRAMES = 2  # ctx1, ctx2: their logits get log(kv bias)


class LayerKV(NamedTuple):
    """One layer's view of the cache. k/v: [B, 3·fsl, H, D] (dtype or fp8); k_scale/v_scale:
    [B, 3·fsl, H, 1] float32 with fp8, else None; scratch_k/v: [B, 6·fsl, H, D] shared by
    all layers; biased: how many leading slots the KV bias applies to (2·fsl)."""

    k: Tensor
    v: Tensor
    k_scale: Tensor | None
    v_scale: Tensor | None
    scratch_k: Tensor
    scratch_v: Tensor
    biased: int


class KVCache:
    """Context K/V for every layer plus the shared scratch. See the module docstring."""

    def __init__(
        self,
        layers: int,
        fsl: int,
        heads: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        fp8: bool = False,
        batch: int = 1,
    ):
        n = CONTEXT_FRAMES * fsl
        self.fsl, self.fp8, self.dtype = fsl, fp8, dtype
        store = FP8 if fp8 else dtype
        self._kv = torch.zeros(layers, 2, batch, n, heads, head_dim, device=device, dtype=store)
        self._scale = (
            torch.ones(layers, 2, batch, n, heads, 1, device=device, dtype=torch.float32)
            if fp8
            else None
        )
        # 3 context + 3 current frames: room for the whole key set of a denoising forward
        self._scratch = torch.zeros(2, batch, 2 * n, heads, head_dim, device=device, dtype=dtype)
        self.layers = [
            LayerKV(
                self._kv[i, 0],
                self._kv[i, 1],
                self._scale[i, 0] if fp8 else None,
                self._scale[i, 1] if fp8 else None,
                self._scratch[0],
                self._scratch[1],
                BIASED_FRAMES * fsl,
            )
            for i in range(layers)
        ]

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held (cache, scales and scratch)."""
        parts = [self._kv, self._scratch] + ([self._scale] if self._scale is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def quantize_heads(x: Tensor) -> tuple[Tensor, Tensor]:
    """[B, N, H, D] -> (fp8 [B, N, H, D], float32 scale [B, N, H, 1]), one scale per
    (token, head): keys after RoPE have a few large heads, so a per-token scale alone would
    flatten the small ones. (fp8's row-wise quantisation over the last dim, head_dim.)"""
    return quantize_rowwise(x)


def write_context(c: LayerKV, k: Tensor, v: Tensor) -> None:
    """Store the recompute pass's K/V (slot order ctx1, ctx2, anchor) into the cache."""
    if c.k_scale is None:
        c.k.copy_(k)
        c.v.copy_(v)
        return
    qk, sk = quantize_heads(k)
    qv, sv = quantize_heads(v)
    c.k.copy_(qk)
    c.k_scale.copy_(sk)
    c.v.copy_(qv)
    c.v_scale.copy_(sv)


def denoise_keys(c: LayerKV, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Key sets of a denoising forward whose own K/V are `k`, `v` [B, 3·fsl, H, D]:
    (k_biased, v_biased, k_rest, v_rest) with biased = ctx1, ctx2 and rest = anchor, current.

    bf16 cache: the biased set is read in place; the anchor and the current K/V are copied
    next to each other into the scratch. fp8 cache: the whole context is dequantised into
    the scratch first."""
    n, b, m = c.k.shape[1], c.biased, k.shape[1]
    sk, sv = c.scratch_k, c.scratch_v
    if c.k_scale is None:
        sk[:, b:n].copy_(c.k[:, b:])
        sv[:, b:n].copy_(c.v[:, b:])
        kb, vb = c.k[:, :b], c.v[:, :b]
    else:
        sk[:, :n].copy_(c.k.float() * c.k_scale)
        sv[:, :n].copy_(c.v.float() * c.v_scale)
        kb, vb = sk[:, :b], sv[:, :b]
    sk[:, n : n + m].copy_(k)
    sv[:, n : n + m].copy_(v)
    return kb, vb, sk[:, b : n + m], sv[:, b : n + m]
