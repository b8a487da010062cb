"""VACE for the Wan transformer: a side branch of extra blocks that reads a 96-channel
context (control video, masks, reference images) and adds "hints" to the main stream
(docs/streaming-model.md §6).

Parameter names are those of `Wan2_1-VACE_module_14B_bf16.safetensors`:
`vace_patch_embedding.*` (Conv3d 96 -> dim, kernel = stride = (1,2,2)) and
`vace_blocks.{i}.*`, each block shaped like a main `WanBlock` plus `after_proj` (Linear
dim -> dim) and, on the first, `before_proj`. The file sits next to the base transformer;
`VaceModule` holds only those keys, and `load_vace` loads them. diffusers'
`WanVACETransformer3DModel` is the oracle (tests/test_vace.py).

The computation, one forward at timestep t:
    x    = patch_embedding(latents)                    (the main stream's input tokens)
    c    = before_proj(vace_patch_embedding(ctx)) + x
    for each VACE block i: c = block_i(c); hint_i = after_proj_i(c)
    main blocks as usual, and after main layer vace_layers[i]: x += scale · hint_i
The hints depend only on the *input* tokens, not on any main layer's output, so the whole
VACE branch runs first and the main loop only adds. `scale` 0 (or no context) skips the
branch: the result is then the base model's, bit for bit (same ops in the same order).

Streaming design (how phase 2 drives `forward_stream_vace`):
- Hints run at the denoising steps only. The recompute pass (cache mode CONTEXT) is a
  plain base forward: the context latents are already clean, the hints shaped the block
  they came from, and Krea's scheme keeps the recompute exactly a base forward.
- The VACE branch sees the current block's 3 latent frames of context (time positions
  3, 4, 5, like the main stream's current frames). It has no KV cache: it does not look
  at the context frames the main stream attends to. Its self-attention is full attention
  within its own tokens.
- Reference images (up to 3 latent frames, 16 VAE channels zero-padded to 96) are put in
  front of the current block *in the VACE branch only*. Their time positions are
  -r..-1, i.e. right before the window's first frame: in Wan's VACE the r references sit
  at positions 0..r-1 and the video starts at r, and RoPE only sees position differences,
  so the reference-to-frame distances here are those of a video whose window starts at
  its first frame, which is what the streaming window imitates. The main-stream tokens x
  at reference positions (needed for c = before_proj(...) + x) are the reference latents
  noised to the current step's sigma with a fixed noise drawn once per reference set
  (in Wan the reference slots of x are noisy latents at the same t). Reference tokens
  take part in the VACE blocks' attention, and their hints are dropped: hints are added
  to the current block's tokens only.
- `scale` is a live control in 0..2 (`vace/scale`).

fp8: `quantize_vace(vace)` puts the VACE blocks' linears in fp8 (about 2.5B parameters
at 14B) with `engine.models.fp8.quantize_linears`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.models.attention import Attention
from engine.models.kv_cache import KVCache, LayerKV
from engine.models.wan import (
    SELF,
    WanBlock,
    WanConfig,
    WanModel,
    cast_model,
    init_random_,
    is_fp32_param,
    rope_table,
)
from engine.weights.checkpoint import (
    WeightsError,
    assign_state_dict,
    load_checkpoint,
    materialize_,
    strip_prefix,
)

MAX_REFS = 3


@dataclass(frozen=True)
class VaceConfig:
    """Which main layers get a hint (one VACE block each, in order) and the context width."""

    layers: tuple[int, ...]
    in_dim: int = 96

    def check(self, cfg: WanConfig) -> None:
        ls = self.layers
        if not ls or ls[0] != 0 or list(ls) != sorted(set(ls)) or ls[-1] >= cfg.layers:
            raise ValueError(
                f"VACE layers {ls} must be strictly increasing, start at 0 and stay below the"
                f" model's {cfg.layers} layers"
            )


VACE_CONFIGS: dict[str, VaceConfig] = {
    "14b": VaceConfig(layers=tuple(range(0, 40, 5))),
    "1.3b": VaceConfig(layers=tuple(range(0, 30, 2))),
    "tiny": VaceConfig(layers=(0, 1)),
}


class VaceBlock(WanBlock):
    """A main block plus the hint projections. `before_proj` only on the first block."""

    def __init__(self, cfg: WanConfig, first: bool):
        super().__init__(cfg)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


class VaceModule(nn.Module):
    """The VACE weights (state dict = the VACE module file's keys) and the hint branch."""

    def __init__(self, cfg: WanConfig, vcfg: VaceConfig):
        super().__init__()
        vcfg.check(cfg)
        self.cfg, self.vcfg = cfg, vcfg
        self.vace_patch_embedding = nn.Conv3d(
            vcfg.in_dim, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch
        )
        self.vace_blocks = nn.ModuleList(VaceBlock(cfg, i == 0) for i in range(len(vcfg.layers)))

    @property
    def dtype(self) -> torch.dtype:
        return self.vace_patch_embedding.weight.dtype

    def cross_kv(self, text_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-VACE-block cross-attention K/V of the *embedded* text (the main model's
        `text_embedding` output, shared): compute once per text embedding."""
        return [b.cross_attn.kv(text_tokens) for b in self.vace_blocks]

    def hints(
        self,
        x_tokens: Tensor,
        ctx: Tensor,
        e0: Tensor,
        cross_kv: Sequence[tuple[Tensor, Tensor]],
        rope: tuple[Tensor, Tensor],
        attn: Attention,
    ) -> list[Tensor]:
        """x_tokens [B, N, dim] (main input tokens), ctx [B, 96, n, h, w] with n·hp·wp = N,
        e0 from `WanModel.embed_time` -> one hint [B, N, dim] per VACE block."""
        c = self.vace_patch_embedding(ctx.to(self.dtype)).flatten(2).transpose(1, 2)
        if c.shape != x_tokens.shape:
            raise ValueError(
                f"VACE context gives {tuple(c.shape)} tokens, the latents {tuple(x_tokens.shape)}"
            )
        c = self.vace_blocks[0].before_proj(c) + x_tokens
        cos, sin = rope
        out = []
        for b, kv in zip(self.vace_blocks, cross_kv, strict=True):
            c = b(c, e0, kv, cos, sin, attn)  # through __call__: `compile_vace` applies
            out.append(b.after_proj(c))
        return out


def _check_ctx(vace: VaceModule, ctx: Tensor, x: Tensor, extra: int = 0) -> None:
    want = (x.shape[0], vace.vcfg.in_dim, x.shape[2] + extra, *x.shape[3:])
    if ctx.dim() != 5 or tuple(ctx.shape) != want:
        raise ValueError(f"VACE context must be {list(want)}, got {list(ctx.shape)}")


def forward_vace(
    model: WanModel,
    vace: VaceModule,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    ctx: Tensor | None,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """One full-sequence forward with hints (time positions 0..F-1, full attention): what
    diffusers' `WanVACETransformer3DModel` computes. ctx [B, 96, F, h, w] or None."""
    if ctx is None or _is_zero(scale):
        return model(x, t, text)
    _check_ctx(vace, ctx, x)
    tokens = model.text_embedding(text.to(model.dtype))
    pt, ph, pw = model.cfg.patch
    rope = rope_table(
        model.cfg, range(x.shape[2] // pt), x.shape[3] // ph, x.shape[4] // pw, x.device
    )

    def hints(h: Tensor, e0: Tensor) -> dict[int, Tensor]:
        out = vace.hints(h, ctx, e0, vace.cross_kv(tokens), rope, model.attn)
        return {layer: hint * scale for layer, hint in zip(vace.vcfg.layers, out, strict=True)}

    return model(x, t, text, hints=hints)


def _is_zero(scale: float | Tensor) -> bool:
    # A Python number is checked here; a tensor scale is never synced to the host.
    return not isinstance(scale, Tensor) and float(scale) == 0.0


@dataclass
class VaceInputs:
    """What the VACE branch needs for one denoising step of a streaming block.

    ctx: [B, 96, 3, h, w] context of the current block (engine/stream/vace_context.py).
    cross_kv: `VaceModule.cross_kv` of the current text (cache it per text key).
    rope: `vace_rope(cfg, refs, hp, wp)`: positions -r..-1 then 3, 4, 5.
    refs_ctx: [B, 96, r, h, w] reference context (latents zero-padded) or None.
    refs_x: [B, 16, r, h, w] main-stream latents at the reference positions for this step
        (`noised_refs`), or None. Must be given together with refs_ctx.
    scale: hint strength (0..2); Python float 0 skips the branch.
    """

    ctx: Tensor
    cross_kv: list[tuple[Tensor, Tensor]]
    rope: tuple[Tensor, Tensor]
    refs_ctx: Tensor | None = None
    refs_x: Tensor | None = None
    scale: float | Tensor = 1.0


def vace_cross_kv(model: WanModel, vace: VaceModule, text: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The VACE blocks' cross-attention K/V for a text embedding [B, L, text_dim]; like
    `WanModel.cross_kv`, compute once per text key."""
    return vace.cross_kv(model.text_embedding(text.to(model.dtype)))


def vace_rope(
    cfg: WanConfig, refs: int, hp: int, wp: int, device=None, current: Sequence[int] = (3, 4, 5)
) -> tuple[Tensor, Tensor]:
    """RoPE table of the VACE branch: reference frames at -refs..-1, then `current`."""
    if not 0 <= refs <= MAX_REFS:
        raise ValueError(f"at most {MAX_REFS} reference frames, got {refs}")
    return rope_table(cfg, [*range(-refs, 0), *current], hp, wp, device)


def noised_refs(ref_latents: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """Reference latents on the flow path at the current step's noise level (see module
    docstring): (1 - sigma)·ref + sigma·noise, with a noise fixed per reference set."""
    return (1.0 - sigma) * ref_latents + sigma * noise


def forward_stream_vace(
    model: WanModel,
    vace: VaceModule | None,
    x: Tensor,
    t: Tensor,
    cross_kv: list[tuple[Tensor, Tensor]],
    rope: tuple[Tensor, Tensor],
    cache: KVCache | Sequence[LayerKV] | None = None,
    mode: str = SELF,
    log_bias: Tensor | None = None,
    vin: VaceInputs | None = None,
) -> Tensor:
    """`WanModel.forward_stream` with VACE hints on the chunk's tokens. With `vin` None,
    `vace` None or a Python-zero scale this runs exactly the base forward's ops."""
    hints = None
    if vace is not None and vin is not None and not _is_zero(vin.scale):

        def hints(h: Tensor, e0: Tensor) -> dict[int, Tensor]:
            found = _stream_hints(model, vace, x, h, e0, vin)
            return {layer: hint * vin.scale for layer, hint in found.items()}

    return model.forward_stream(x, t, cross_kv, rope, cache, mode, log_bias, hints)


def _stream_hints(model, vace, x, h, e0, vin: VaceInputs) -> dict[int, Tensor]:
    _check_ctx(vace, vin.ctx, x)
    ctx, xt = vin.ctx, h
    if (vin.refs_ctx is None) != (vin.refs_x is None):
        raise ValueError("VACE reference context and reference latents go together")
    r = 0
    if vin.refs_ctx is not None:
        r = vin.refs_ctx.shape[2]
        _check_ctx(vace, vin.refs_ctx, x, extra=r - x.shape[2])
        ctx = torch.cat([vin.refs_ctx.to(ctx.dtype), ctx], dim=2)
        xt = torch.cat([model.patchify(vin.refs_x), h], dim=1)
    n = h.shape[1]
    if vin.rope[0].shape[0] != xt.shape[1]:
        raise ValueError(
            f"VACE rope table has {vin.rope[0].shape[0]} positions for {xt.shape[1]} tokens"
            f" ({r} reference frames): build it with vace_rope(cfg, {r}, hp, wp)"
        )
    hints = vace.hints(xt, ctx, e0, vin.cross_kv, vin.rope, model.attn)
    return {layer: hint[:, -n:] for layer, hint in zip(vace.vcfg.layers, hints, strict=True)}


# --------------------------------------------------------------------------- building


def random_vace(
    cfg: WanConfig,
    vcfg: VaceConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
) -> VaceModule:
    """Random VACE weights made on `device` (bench and tests)."""
    with torch.device("meta"):
        vace = cast_model(VaceModule(cfg, vcfg), dtype)
    vace = materialize_(vace, device)
    return init_random_(vace, seed).eval().requires_grad_(False)


def load_vace(
    path: str | Path,
    cfg: WanConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    vcfg: VaceConfig | None = None,
) -> VaceModule:
    """Load `Wan2_1-VACE_module_14B_bf16.safetensors` (only its `vace_*` keys are used, so
    a full VACE model file that also holds the base blocks loads too). The VACE layer list
    comes from `vcfg`, or is inferred from the number of blocks in the file (8 -> every
    5th of 40 layers, 15 -> every 2nd of 30, else spread evenly from layer 0)."""
    sd = strip_prefix(strip_prefix(load_checkpoint(path)), "diffusion_model.")
    sd = {k: v for k, v in sd.items() if k.startswith(("vace_blocks.", "vace_patch_embedding."))}
    if not sd:
        raise WeightsError(f"{path}: no VACE weights in it (no vace_blocks.* keys)")
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("vace_blocks."))
    if vcfg is None:
        step = cfg.layers // n
        if step < 1:
            raise WeightsError(f"{path}: {n} VACE blocks for a model of {cfg.layers} layers")
        vcfg = VaceConfig(layers=tuple(range(0, n * step, step)))
    elif len(vcfg.layers) != n:
        raise WeightsError(f"{path}: {n} VACE blocks, the config names {len(vcfg.layers)} layers")
    with torch.device("meta"):
        vace = VaceModule(cfg, vcfg)
    assign_state_dict(vace, sd, file=path, dtype=dtype, device=device)
    for k, p in vace.named_parameters():
        if is_fp32_param(k):
            p.data = sd[k].to(device=device, dtype=torch.float32)
    return vace.eval().requires_grad_(False)


def compile_vace(vace: VaceModule, **kwargs) -> None:
    """torch.compile each VACE block's forward (like `WanModel.compile_blocks`).

    VACE blocks share `WanBlock.forward` with the main blocks, so their variants (one
    token count per number of reference images) add to the same code object's graphs
    (main: first block, context, denoise, with and without bias): raise dynamo's
    recompile limit so none of them silently falls back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    for b in vace.vace_blocks:
        b.compile(**{"dynamic": False, **kwargs})


def quantize_vace(vace: VaceModule) -> int:
    """fp8 weights for the VACE blocks' linears (fp8 matmuls: Ada/Hopper GPUs, or the CPU). Returns the
    number of linears replaced."""
    from engine.models.fp8 import quantize_linears

    return quantize_linears(vace.vace_blocks)
