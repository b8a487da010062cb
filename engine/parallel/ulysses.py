"""Ulysses (head-parallel) sequence parallelism for the Wan transformer, applied from
outside like gpt-fast's tp.py: `apply_ulysses(model, group)` swaps the classes of the
model and of its blocks' attention for subclasses that know about the process group; the
weights, fused q/k/v, fp8 linears and compile settings stay as they are.

Per forward of a chunk of N tokens over W ranks (rank r owns tokens r·N/W .. (r+1)·N/W):

- patchify, time embedding and (VACE) hints run replicated on the full chunk (cheap,
  and every rank then slices the same tensors), then each rank keeps its token slice;
- per layer, self-attention: q, k, v of the rank's tokens for all heads (norms over the
  full dim need all heads), one all-to-all of the stacked q/k/v -> all tokens for the
  rank's H/W heads; attention over all keys for those heads, including the KV cache and
  the KV bias (the cache holds the rank's heads only: `shard_cache`); one all-to-all of
  the output back to the rank's tokens, all heads; then o, the cross-attention and the
  FFN on the rank's tokens;
- cross-attention: `cross="tokens"` (default) keeps the text K/V of all heads on every
  rank, so the rank's tokens attend locally with no communication; `cross="heads"` keeps
  only the rank's heads of the text K/V and does two more all-to-alls per layer (q in,
  output back). The text K/V is small (14B, 512 text tokens: 420 MB over 40 layers in
  bf16) while the two all-to-alls add half again to the traffic, so "tokens" is the
  default; `comm_volume` gives both;
- the head's output (64 channels a token, not 5120) is all-gathered, so every rank ends
  the forward with the same full velocity: the sampler, the noise and the cache update
  run identically on every rank.

The collectives are PyTorch's functional collectives (traceable by torch.compile), over
NCCL on GPUs and gloo on a CPU. Ring attention is not implemented: with 40 heads and
N <= 8 Ulysses moves 4·N·dim per layer per rank at full NVLink bandwidth, while a ring
would move the keys and values W-1 times; the comparison is left to measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from engine.models.attention import Attention
from engine.models.kv_cache import KVCache, LayerKV
from engine.models.wan import SELF, CrossAttention, SelfAttention, WanConfig, WanModel, rope_table

CROSS_MODES = ("tokens", "heads")


class ParallelConfigError(ValueError):
    """A world size this model or resolution cannot be split into."""


def check_world(cfg: WanConfig, world: int, tokens_per_frame: int | None = None) -> None:
    """Refuse a world size that does not divide the heads (or the tokens of a chunk of 3
    latent frames, when given), with the reason and the sizes that would work."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ParallelConfigError(f"the number of ranks must be a positive integer, got {world!r}")
    if cfg.heads % world:
        ok = [n for n in range(1, cfg.heads + 1) if cfg.heads % n == 0]
        raise ParallelConfigError(
            f"{world} ranks do not divide the model's {cfg.heads} attention heads "
            f"(each rank attends for heads/N of them); use one of {ok}"
        )
    if tokens_per_frame is not None and (3 * tokens_per_frame) % world:
        raise ParallelConfigError(
            f"{world} ranks do not divide the {3 * tokens_per_frame} tokens of a block "
            f"(3 latent frames of {tokens_per_frame}); pick another resolution or rank count"
        )


# --------------------------------------------------------------------------- collectives


class Traffic:
    """Bytes this rank sends to other ranks through the collectives below, counted when
    `TRAFFIC` is set to one (tests check `comm_volume` against it; eager mode only: under
    torch.compile the count runs once, at trace time)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.all_to_alls = 0


TRAFFIC: Traffic | None = None


def _a2a(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-to-all over dim 0 (one slice per rank, equal sizes)."""
    if TRAFFIC is not None:
        TRAFFIC.bytes += x.numel() * x.element_size() * (x.shape[0] - 1) // x.shape[0]
        TRAFFIC.all_to_alls += 1
    out = funcol.all_to_all_single(x.contiguous(), None, None, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def heads_from_tokens(x: Tensor, world: int, group: dist.ProcessGroup) -> Tensor:
    """[S, B, n, H, D] (S stacked tensors, this rank's n tokens, all heads) ->
    [S, B, n·W, H/W, D] (all tokens in rank order, this rank's heads)."""
    s, b, n, h, d = x.shape
    x = x.reshape(s, b, n, world, h // world, d).permute(3, 0, 1, 2, 4, 5)
    y = _a2a(x, group)  # y[r]: rank r's tokens, my heads
    return y.permute(1, 2, 0, 3, 4, 5).reshape(s, b, world * n, h // world, d)


def tokens_from_heads(x: Tensor, world: int, group: dist.ProcessGroup) -> Tensor:
    """[B, N, H/W, D] (all tokens, this rank's heads) -> [B, N/W, H, D] (my tokens)."""
    b, n, h, d = x.shape
    x = x.reshape(b, world, n // world, h, d).permute(1, 0, 2, 3, 4)
    y = _a2a(x, group)  # y[r]: my tokens, rank r's heads
    return y.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * h, d)


def gather_tokens(x: Tensor, world: int, group: dist.ProcessGroup) -> Tensor:
    """[B, n, C] on each rank -> [B, n·W, C] in rank order, the same on every rank."""
    if TRAFFIC is not None:
        TRAFFIC.bytes += x.numel() * x.element_size() * (world - 1)
    y = funcol.all_gather_single(x.transpose(0, 1).contiguous(), 0, group)
    y = funcol.wait_tensor(y) if isinstance(y, funcol.AsyncCollectiveTensor) else y
    return y.transpose(0, 1)


# --------------------------------------------------------------------------- modules


class UlyssesSelfAttention(SelfAttention):
    """`SelfAttention` on this rank's tokens: all-to-all to heads around `attend`."""

    group: dist.ProcessGroup
    world: int

    def forward(self, x, cos, sin, attn, cache=None, mode=SELF, log_bias=None) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        q, k, v = heads_from_tokens(torch.stack([q, k, v]), self.world, self.group).unbind(0)
        out = self.attend(q, k, v, attn, cache, mode, log_bias)
        return self.o(tokens_from_heads(out, self.world, self.group).flatten(2))


class UlyssesCrossAttention(CrossAttention):
    """`CrossAttention` with the text K/V of this rank's heads only (cross="heads")."""

    group: dist.ProcessGroup
    world: int
    rank: int

    def kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        k, v = super().kv(ctx)
        h = self.heads // self.world
        sl = slice(self.rank * h, (self.rank + 1) * h)
        return k[:, :, sl].contiguous(), v[:, :, sl].contiguous()

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], attn: Attention) -> Tensor:
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.heads, -1)
        q = heads_from_tokens(q[None], self.world, self.group)[0]
        out = attn(q, *kv)
        return self.o(tokens_from_heads(out, self.world, self.group).flatten(2))


class UlyssesWanModel(WanModel):
    """`WanModel` whose forwards split the tokens across the group (see module docstring).
    Every rank calls the forwards with the same full inputs and gets the same full
    output; in between, each holds 1/W of the tokens."""

    group: dist.ProcessGroup
    world: int
    rank: int
    cross_mode: str

    def _shard(self, n: int) -> slice:
        if n % self.world:
            raise ParallelConfigError(
                f"a chunk of {n} tokens does not split over {self.world} ranks"
            )
        m = n // self.world
        return slice(self.rank * m, (self.rank + 1) * m)

    def _run(self, x, t, cross_kv, cos, sin, cache, mode, log_bias, hints) -> Tensor:
        pt, ph, pw = self.cfg.patch
        f, hp, wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        e, e0 = self.embed_time(t)
        h = self.patchify(x)
        added = hints(h, e0) if hints is not None else {}
        sl = self._shard(h.shape[1])
        h, cos, sin = h[:, sl], cos[sl], sin[sl]
        if e0.dim() == 4:  # per-token timesteps
            e, e0 = e[:, sl], e0[:, sl]
        added = {i: a[:, sl] for i, a in added.items()}
        for i, b in enumerate(self.blocks):
            c = cache[i] if cache is not None else None
            h = b(h, e0, cross_kv[i], cos, sin, self.attn, c, mode, log_bias)
            if i in added:
                h = h + added[i]
        out = gather_tokens(self.head(h, e), self.world, self.group)
        return self.unpatchify(out, f, hp, wp)

    def forward(self, x, t, text, hints=None) -> Tensor:
        pt, ph, pw = self.cfg.patch
        f, hp, wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        cos, sin = rope_table(self.cfg, range(f), hp, wp, x.device)
        return self._run(x, t, self.cross_kv(text), cos, sin, None, SELF, None, hints)

    def forward_stream(
        self, x, t, cross_kv, rope, cache=None, mode=SELF, log_bias=None, hints=None
    ) -> Tensor:
        cos, sin = rope
        return self._run(x, t, cross_kv, cos, sin, cache, mode, log_bias, hints)


def apply_ulysses(
    model: WanModel, group: dist.ProcessGroup | None = None, *, cross: str = "tokens"
) -> WanModel:
    """Make `model` (already built: loaded, fused, quantised, compiled or not) run its
    forwards sequence-parallel over `group` (default: the world). Call it on every rank with
    the same weights. World size 1 leaves the model as it is."""
    if cross not in CROSS_MODES:
        raise ParallelConfigError(f"cross must be one of {', '.join(CROSS_MODES)}, got {cross!r}")
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_world(model.cfg, world)
    if world == 1:
        return model
    for b in model.blocks:
        b.self_attn.__class__ = UlyssesSelfAttention
        b.self_attn.group, b.self_attn.world = group, world
        if cross == "heads":
            b.cross_attn.__class__ = UlyssesCrossAttention
            b.cross_attn.group, b.cross_attn.world, b.cross_attn.rank = group, world, rank
    model.__class__ = UlyssesWanModel
    model.group, model.world, model.rank, model.cross_mode = group, world, rank, cross
    return model


def shard_cache(session, world: int) -> KVCache:
    """Give a `StreamSession` a KV cache of this rank's heads only (1/W of the memory),
    replacing the full one it made. The ranks' heads follow rank order, as in
    `heads_from_tokens`."""
    cfg = session.cfg
    check_world(cfg, world, session.fsl)
    old = session.cache
    session.cache = KVCache(
        cfg.layers,
        session.fsl,
        cfg.heads // world,
        cfg.head_dim,
        device=session.device,
        dtype=session.dtype,
        fp8=session.kv_cache == "fp8",
    )
    del old
    return session.cache


def layer_heads(cache: KVCache | Sequence[LayerKV]) -> int:
    """Heads held per layer (for checks and reports)."""
    return cache[0].k.shape[2]


# --------------------------------------------------------------------------- volume


@dataclass(frozen=True)
class CommVolume:
    """Bytes each rank sends per steady block (a recompute pass plus `steps` denoising
    forwards); see `comm_volume`."""

    world: int
    tokens: int  # per forward (3 latent frames)
    forwards: int  # per steady block
    all_to_alls: int  # per steady block
    bytes_per_forward: int  # sent by one rank
    bytes_per_block: int  # sent by one rank
    cross: str

    def seconds(self, gbytes_per_s: float) -> float:
        """Time of a block's communication at a per-rank send bandwidth (all-to-all bus
        bandwidth as nccl-tests reports it), with no overlap."""
        return self.bytes_per_block / (gbytes_per_s * 1e9)

    def to_dict(self) -> dict:
        return {
            "world": self.world,
            "tokens_per_forward": self.tokens,
            "forwards_per_block": self.forwards,
            "all_to_alls_per_block": self.all_to_alls,
            "bytes_per_forward_per_rank": self.bytes_per_forward,
            "bytes_per_block_per_rank": self.bytes_per_block,
            "cross": self.cross,
        }


def comm_volume(
    cfg: WanConfig,
    height: int,
    width: int,
    steps: int,
    world: int,
    *,
    elem_bytes: int = 2,
    cross: str = "tokens",
) -> CommVolume:
    """What one rank sends per steady block. Per layer and forward: q, k, v to heads and
    the output back (4 tensors of N·dim), plus q and the output of the cross-attention
    with cross="heads"; each all-to-all keeps 1/W of its input local. Per forward, the
    head's output is all-gathered (N·out channels). Control broadcasts (a few hundred
    bytes a block) and text embeddings (on prompt changes only) are left out."""
    check_world(cfg, world)
    if cross not in CROSS_MODES:
        raise ParallelConfigError(f"cross must be one of {', '.join(CROSS_MODES)}, got {cross!r}")
    hp, wp = height // 8 // cfg.patch[1], width // 8 // cfg.patch[2]
    n = 3 * hp * wp
    check_world(cfg, world, hp * wp)
    per_layer = 4 + (2 if cross == "heads" else 0)
    off_rank = (world - 1) / world
    a2a_bytes = per_layer * cfg.layers * (n // world) * cfg.dim * elem_bytes * off_rank
    out_ch = cfg.out_dim * cfg.patch[0] * cfg.patch[1] * cfg.patch[2]
    # the head's output: float32 modulation makes it the model dtype; each rank sends its
    # n/W tokens to W-1 others
    gather_bytes = (n // world) * out_ch * elem_bytes * (world - 1)
    per_forward = int(a2a_bytes + gather_bytes) if world > 1 else 0
    forwards = steps + 1
    a2as = (2 + (2 if cross == "heads" else 0)) * cfg.layers * forwards if world > 1 else 0
    return CommVolume(world, n, forwards, a2as, per_forward, per_forward * forwards, cross)
