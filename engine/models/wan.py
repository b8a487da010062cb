"""The Wan2.1 text-to-video DiT, with Wan-native parameter names so that
`krea-realtime-video-14b.safetensors` loads as it is, and the streaming forward Krea
Realtime needs: a per-layer self-attention KV cache, cached cross-attention K/V and the
KV-cache attention bias (docs/streaming-model.md §1, §2).

Two entry points:
- `WanModel.forward(x, t, text)`: one full-sequence forward, time positions 0..F-1, as
  Wan and diffusers do it (the oracle test compares the two).
- `WanModel.forward_stream(...)`: one forward of a 3-frame chunk against the KV cache; the
  stream session (engine/stream/session.py) drives it.

Modulation, time embedding and norms run in float32 like Wan; the time MLPs and
modulation tables are kept in float32 whatever the model dtype (see `FP32_PARAMS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.attention import Attention
from engine.models.kv_cache import KVCache, LayerKV, denoise_keys, write_context


@dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    heads: int
    layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real dims of a head given to (time, rows, columns): 44/42/42 for head_dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, WanConfig] = {
    "14b": WanConfig(dim=5120, ffn_dim=13824, heads=40, layers=40),
    "1.3b": WanConfig(dim=1536, ffn_dim=8960, heads=12, layers=30),
    # Runs the whole engine on a CPU in seconds (tests, `--model tiny`).
    "tiny": WanConfig(
        dim=64, ffn_dim=128, heads=2, layers=2, text_dim=32, text_len=16, freq_dim=32
    ),
}

# Parameters kept in float32 whatever the model dtype: small, and they set the scale of
# every residual update (Wan computes modulation in float32).
FP32_PARAMS = ("time_embedding.", "time_projection.", "modulation")


def is_fp32_param(name: str) -> bool:
    return any(p in name for p in FP32_PARAMS)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to `dtype`, except `FP32_PARAMS` (works on meta too)."""
    for name, p in model.named_parameters():
        want = torch.float32 if is_fp32_param(name) else dtype
        if p.dtype != want:
            p.data = p.data.to(want)
    return model


# --------------------------------------------------------------------------- helpers


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding: [cos | sin] of t·10000^(-k/half), in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    a = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


def rope_table(
    cfg: WanConfig,
    frames: Sequence[int],
    hp: int,
    wp: int,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos/sin [N, 1, head_dim/2] (float32) for tokens of latent frames with the given time
    positions, in (frame, row, column) order. Positions are a runtime choice (the stream
    gives the anchor 0, context 1,2, current 3,4,5), so the table is built per layout,
    once, rather than indexed from a max-length table."""
    dt, dh, dw = cfg.rope_split

    def angles(pos: Tensor, d: int) -> Tensor:
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        return pos.double()[:, None] * inv[None]

    f = angles(torch.tensor(list(frames)), dt)  # [F, dt/2]
    h = angles(torch.arange(hp), dh)
    w = angles(torch.arange(wp), dw)
    nf = len(frames)
    a = torch.cat(
        [
            f[:, None, None].expand(nf, hp, wp, -1),
            h[None, :, None].expand(nf, hp, wp, -1),
            w[None, None, :].expand(nf, hp, wp, -1),
        ],
        dim=-1,
    ).reshape(nf * hp * wp, 1, -1)
    return torch.cos(a).float().to(device), torch.sin(a).float().to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of each head, in float32. x: [B, N, H, D]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the full dim (all heads together), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def _ln(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


# --------------------------------------------------------------------------- layers

# How a chunk's self-attention meets the cache (see `WanModel.forward_stream`).
SELF = "self"  # attend to the chunk's own K/V only; cache untouched
CONTEXT = "context"  # write own K/V into the context cache, attend to own K/V
DENOISE = "denoise"  # attend to the context cache and own K/V (own K/V not cached)


class _Projections(nn.Module):
    """Wan's attention parameters: q, k, v, o and RMS norms of q and k over the full dim."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)


class SelfAttention(_Projections):
    def __init__(self, cfg: WanConfig):
        super().__init__(cfg)
        self.fused = False  # q, k, v as one `qkv` linear: see `fuse_qkv`

    def fuse(self) -> None:
        """Replace q, k, v by one linear of 3·dim outputs (same math): one GEMM instead of
        three, and with fp8 one activation quantisation instead of three."""
        if self.fused:
            return
        q, k, v = self.q, self.k, self.v
        qkv = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device)
        qkv.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), requires_grad=False)
        qkv.bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=False)
        del self.q, self.k, self.v
        self.qkv, self.fused = qkv, True

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn: Attention,
        cache: LayerKV | None = None,
        mode: str = SELF,
        log_bias: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.o(self.attend(q, k, v, attn, cache, mode, log_bias).flatten(2))

    # `project` and `attend` are separate so that engine/parallel can put its all-to-all
    # between them (tokens -> heads) and after `attend` (heads -> tokens).

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, N, H, D] of tokens x [B, N, dim], normed over the full dim and with
        RoPE on q and k (cos/sin: one row per token of x)."""
        shape = (*x.shape[:2], self.heads, -1)
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = apply_rope(self.norm_q(q).view(shape), cos, sin)
        k = apply_rope(self.norm_k(k).view(shape), cos, sin)
        return q, k, v.reshape(shape)

    @staticmethod
    def attend(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn: Attention,
        cache: LayerKV | None,
        mode: str,
        log_bias: Tensor | None,
    ) -> Tensor:
        """Attention of q over k, v (and the cache, by `mode`) -> [B, N, H, D]. Works on any
        subset of heads, as long as the cache holds the same heads."""
        if mode == SELF:
            out = attn(q, k, v)
        elif mode == CONTEXT:
            write_context(cache, k, v)
            out = attn(q, k, v)
        else:  # DENOISE: RoPE is already in the cached keys, so key order is free.
            kb, vb, kr, vr = denoise_keys(cache, k, v)
            out = attn.biased(q, kb, vb, kr, vr, log_bias)
        return out


def fuse_qkv(module: nn.Module) -> int:
    """Fuse q/k/v of every self-attention in `module` (after its weights are loaded, before
    fp8 quantisation). Returns how many were fused."""
    found = [m for m in module.modules() if isinstance(m, SelfAttention) and not m.fused]
    for m in found:
        m.fuse()
    return len(found)


class CrossAttention(_Projections):
    def kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of the text tokens [B, L, H, D]: computed once per text embedding."""
        shape = (*ctx.shape[:2], self.heads, -1)
        return self.norm_k(self.k(ctx)).view(shape), self.v(ctx).view(shape)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], attn: Attention) -> Tensor:
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.heads, -1)
        return self.o(attn(q, *kv).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ffn_dim, cfg.dim),
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        cos: Tensor,
        sin: Tensor,
        attn: Attention,
        cache: LayerKV | None = None,
        mode: str = SELF,
        log_bias: Tensor | None = None,
    ) -> Tensor:
        # e0: [B, 6, dim] float32, or [B, N, 6, dim] for per-token timesteps.
        mod = (self.modulation + e0) if e0.dim() == 3 else (self.modulation[:, None] + e0)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(-2)
        if e0.dim() == 3:
            shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
                m[:, None] for m in (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f)
            )
        dt = x.dtype
        y = (_ln(x, self.eps) * (1 + scale_a) + shift_a).to(dt)
        y = self.self_attn(y, cos, sin, attn, cache, mode, log_bias)
        x = (x.float() + y.float() * gate_a).to(dt)
        n3 = self.norm3
        y = F.layer_norm(x.float(), n3.normalized_shape, n3.weight.float(), n3.bias.float(), n3.eps)
        x = x + self.cross_attn(y.to(dt), cross_kv, attn)
        y = (_ln(x, self.eps) * (1 + scale_f) + shift_f).to(dt)
        x = (x.float() + self.ffn(y).float() * gate_f).to(dt)
        return x


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # e: [B, dim] or [B, N, dim] float32
        mod = (
            (self.modulation + e[:, None])
            if e.dim() == 2
            else (self.modulation[:, None] + e[:, :, None])
        )
        shift, scale = mod.unbind(-2)
        if e.dim() == 2:
            shift, scale = shift[:, None], scale[:, None]
        return self.head((_ln(x, self.eps) * (1 + scale) + shift).to(x.dtype))


# --------------------------------------------------------------------------- model

# Additions to the residual stream after given layers, computed from the patchified input
# tokens and the time modulation: hints(h, e0) -> {layer index: tensor}. VACE uses it
# (engine/models/vace.py); None runs exactly the base model's ops.
Hints = Callable[[Tensor, Tensor], Mapping[int, Tensor]]


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.layers))
        self.head = Head(cfg)
        self.attn = Attention("sdpa")

    # -- settings

    def set_attention(self, backend: str | Attention) -> None:
        """Pick the attention kernel (see engine.models.attention.select_backend)."""
        self.attn = backend if isinstance(backend, Attention) else Attention(backend)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block's forward (same code, so the graphs are shared)."""
        for b in self.blocks:
            b.compile(**{"dynamic": False, **kwargs})

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # -- pieces

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B] (or [B, N]) in 0..1000 -> (e [.., dim], e0 [.., 6, dim]), float32."""
        shape = t.shape
        s = sinusoidal_embedding(t.reshape(-1), self.cfg.freq_dim).float()
        e = self.time_embedding(s.to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e).float().unflatten(-1, (6, self.cfg.dim))
        return e.reshape(*shape, -1), e0.reshape(*shape, 6, -1)

    def cross_kv(self, text: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer cross-attention K/V for a text embedding [B, L, text_dim]."""
        ctx = self.text_embedding(text.to(self.dtype))
        return [b.cross_attn.kv(ctx) for b in self.blocks]

    def patchify(self, x: Tensor) -> Tensor:
        return self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)

    def unpatchify(self, y: Tensor, f: int, hp: int, wp: int) -> Tensor:
        pt, ph, pw = self.cfg.patch
        y = y.reshape(y.shape[0], f, hp, wp, pt, ph, pw, -1)
        return y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(y.shape[0], -1, f * pt, hp * ph, wp * pw)

    # -- forwards

    def forward(self, x: Tensor, t: Tensor, text: Tensor, hints: Hints | None = None) -> Tensor:
        """One full-sequence forward: x [B,16,F,h,w], t [B], text [B,L,text_dim] -> velocity
        [B,16,F,h,w] (in the model dtype). Time positions 0..F-1, full attention.
        `hints` (VACE): see `Hints`."""
        pt, ph, pw = self.cfg.patch
        f, hp, wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        cos, sin = rope_table(self.cfg, range(f), hp, wp, x.device)
        e, e0 = self.embed_time(t)
        h = self.patchify(x)
        added = hints(h, e0) if hints is not None else {}
        for i, (b, kv) in enumerate(zip(self.blocks, self.cross_kv(text), strict=True)):
            h = b(h, e0, kv, cos, sin, self.attn)
            if i in added:
                h = h + added[i]
        return self.unpatchify(self.head(h, e), f, hp, wp)

    def forward_stream(
        self,
        x: Tensor,
        t: Tensor,
        cross_kv: list[tuple[Tensor, Tensor]],
        rope: tuple[Tensor, Tensor],
        cache: KVCache | Sequence[LayerKV] | None = None,
        mode: str = SELF,
        log_bias: Tensor | None = None,
        hints: Hints | None = None,
    ) -> Tensor:
        """One forward of a chunk of latent frames against the self-attention KV cache.

        x [B,16,n,h,w]; t [B]; cross_kv from `cross_kv`; rope from `rope_table` for the
        chunk's time positions; cache: the context K/V (engine/models/kv_cache.py), needed
        by CONTEXT (writes it) and DENOISE (attends to it and to the chunk); mode SELF /
        CONTEXT / DENOISE (module constants); in DENOISE with log_bias (a float32 0-d
        tensor, log b) the keys of ctx1 and ctx2 get log b added to their logits. `hints` (VACE): see `Hints`. No host syncs: safe to compile and to queue
        ahead on a GPU stream."""
        pt, ph, pw = self.cfg.patch
        f, hp, wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        cos, sin = rope
        e, e0 = self.embed_time(t)
        h = self.patchify(x)
        added = hints(h, e0) if hints is not None else {}
        for i, b in enumerate(self.blocks):
            c = cache[i] if cache is not None else None
            h = b(h, e0, cross_kv[i], cos, sin, self.attn, c, mode, log_bias)
            if i in added:
                h = h + added[i]
        return self.unpatchify(self.head(h, e), f, hp, wp)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, generators: dict | None = None) -> nn.Module:
    """Fill every parameter in place with random values of sane scale, drawn on the
    parameters' own device (no host init of a 28 GB model). Norm weights and modulation
    are random too, so a test notices if two of them are swapped. Passing the same
    `generators` dict to calls on a model's parts in parameter order draws what one call on
    the whole model draws (so a model can be built part by part)."""
    gen: dict[torch.device, torch.Generator] = {} if generators is None else generators
    for name, p in model.named_parameters():
        g = gen.get(p.device)
        if g is None:
            g = gen[p.device] = torch.Generator(p.device).manual_seed(seed)
        if name.endswith("modulation"):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        elif p.dim() >= 2:  # linear / conv weights
            p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=g)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
        else:  # norm weights
            p.normal_(1.0, 0.1, generator=g)
    return model
