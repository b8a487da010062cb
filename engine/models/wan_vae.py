"""Wan2.1 VAE: causal 3D convolutional autoencoder with a streaming cache.

Parameter names are Wan-native (those of `Wan2.1_VAE.pth`), so the file loads as is and
diffusers' `convert_wan_vae_to_diffusers` maps our state dict onto `AutoencoderKLWan`
(the test oracle).

Why a cache, and how this one differs from Wan's own code: every temporal operation is
causal, so decoding a stream block by block, carrying each layer's last input frames,
equals decoding the whole sequence at once. Wan (and diffusers) feed the decoder one
latent at a time; here a whole block of latents goes through each layer in one call
(bigger convolutions, a fraction of the kernel launches) and the cache carries across
calls. The three kinds of temporal state:

- causal conv with a temporal kernel of 3: the last 2 input frames (zeros at stream start);
- temporal upsampling (decoder): the very first frame of a stream is not upsampled in
  time (1 latent -> 1 frame); all later frames go through a causal conv that doubles them;
- temporal downsampling (encoder): the first frame passes alone, later frames are taken in
  pairs by a stride-2 conv that also sees the previous frame.

Hence T video frames <-> 1 + (T-1)/4 latents; a stream decoder yields 1 + 4(n-1) frames
for its first n latents and 4n for every later n.

The transformer works on normalised latents z = (mu - mean) / std, per channel (the 16
means and stds of diffusers' `AutoencoderKLWan` config); `normalize`/`denormalize` do that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.weights.checkpoint import WeightsError, assign_state_dict, load_checkpoint, strip_prefix

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD


CONFIGS = {"wan2.1": WanVAEConfig(), "tiny": WanVAEConfig(base_dim=8)}
SPATIAL, TEMPORAL = 8, 4  # compression factors


class StreamCache:
    """Temporal state of one stream through one network (encoder or decoder): each causal
    conv's last `pad` input frames, each resample's last frame and started mark.

    Only the history is kept between calls, not a full [history, input] window per conv:
    such windows would hold ~12 GB at 832x480 for the decoder's 12-frame blocks. The
    per-call `torch.cat` costs one copy of the input, as writing it into a persistent
    window would; under torch.compile the cat is written directly by the op producing
    its input (norm + SiLU), so it costs nothing extra there.
    """

    def __init__(self) -> None:
        self.hist: dict[int, Tensor] = {}
        self.started: set[int] = set()

    def window(self, slot: int, x: Tensor, pad: int) -> Tensor:
        """[history, x] along time for the conv in `slot`; remembers the new history."""
        hist = self.hist.get(slot)
        if hist is None:
            win = F.pad(x, (0, 0, 0, 0, pad, 0))
        else:
            if hist.shape[:2] != x.shape[:2] or hist.shape[3:] != x.shape[3:]:
                raise ValueError(
                    f"stream input of shape {tuple(x.shape)} does not continue the stream (cached"
                    f" {tuple(hist.shape)}): call reset() when batch or resolution changes"
                )
            win = torch.cat([hist.to(x.dtype), x], 2)
        self.hist[slot] = win[:, :, -pad:].clone()  # a copy: a view would keep the window alive
        return win


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time on the past side only; spatial padding is symmetric."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad = 2 * p[0]
        self.space_pad = (0, p[1], p[2])
        self.slot = -1  # set by the owning network

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        w, b, pad = self.weight, self.bias, self.time_pad
        if pad == 0:
            return F.conv3d(x, w, b, self.stride, self.space_pad)
        if cache is None:  # one shot, zero history
            if x.shape[2] == 1:  # only the last temporal tap sees a non-zero frame
                return F.conv3d(x, w[:, :, -1:], b, 1, self.space_pad)
            return F.conv3d(F.pad(x, (0, 0, 0, 0, pad, 0)), w, b, self.stride, self.space_pad)
        return F.conv3d(cache.window(self.slot, x, pad), w, b, self.stride, self.space_pad)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (Wan's `RMS_norm`).
    `gamma` keeps Wan's shape ([C,1,1,1] for video, [C,1,1] for images)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics: bf16 sums of squares over hundreds of channels drift.
        y = F.normalize(x.float(), dim=1).to(x.dtype)
        return y * (self.scale * self.gamma.view(-1, *([1] * (x.ndim - 2))))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        # Index positions are Wan's: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.Sequential(
            RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](F.silu(r[3](h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (no temporal mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        q, k, v = (
            F.linear(y, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
            .unsqueeze(1)
            .chunk(3, dim=-1)
        )
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = F.linear(y, self.proj.weight.view(c, c), self.proj.bias)
        return x + y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x in time (see module docstring)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.slot = -1
        up = mode.startswith("up")
        # Index 0 of Wan's `resample` is a parameterless upsample/zero-pad; done functionally here.
        self.resample = nn.Sequential(
            nn.Identity(),
            nn.Conv2d(dim, dim // 2, 3, padding=1) if up else nn.Conv2d(dim, dim, 3, stride=2),
        )
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _space(self, x: Tensor) -> Tensor:
        conv = self.resample[1]
        w = conv.weight.unsqueeze(2)  # frame-wise 2D conv as a (1,3,3) 3D conv: no reshapes
        if self.mode.startswith("up"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            return F.conv3d(x, w, conv.bias, 1, (0, 1, 1))
        return F.conv3d(F.pad(x, (0, 1, 0, 1)), w, conv.bias, (1, 2, 2))

    def forward(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = self._space(x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _first(self, cache: StreamCache | None) -> bool:
        if cache is None:
            return True
        first = self.slot not in cache.started
        cache.started.add(self.slot)
        return first

    def _time_up(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        head = None
        if self._first(cache):
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                return head
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)  # [B, 2C, T, H, W]: two output frames per input frame
        y = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], 2)

    def _time_down(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        conv = self.time_conv
        if self._first(cache):
            if (x.shape[2] - 1) % 2:
                raise ValueError(
                    f"temporal downsampling needs 1 + 2k frames first, got {x.shape[2]}"
                )
            y = torch.cat([x[:, :, :1], conv(x)], 2) if x.shape[2] > 1 else x
        else:
            if x.shape[2] % 2:
                raise ValueError(
                    f"temporal downsampling needs an even number of frames, got {x.shape[2]}"
                )
            y = conv(torch.cat([cache.hist[self.slot], x], 2))
        if cache is not None:
            cache.hist[self.slot] = x[:, :, -1:].clone()
        return y


def _number_slots(module: nn.Module) -> None:
    for i, m in enumerate(module.modules()):
        if hasattr(m, "slot"):
            m.slot = i


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        d, mult = cfg.base_dim, cfg.dim_mult
        dims = [d * u for u in (1, *mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(mult) - 1:
                layers.append(
                    Resample(
                        c_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                    )
                )
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(
            RMSNorm(c), nn.SiLU(), CausalConv3d(c, cfg.z_dim * 2, 3, padding=1)
        )
        _number_slots(self)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        d, mult = cfg.base_dim, cfg.dim_mult
        dims = [d * u for u in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0]),
        )
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                c_in //= 2  # the previous level's upsampling conv halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(mult) - 1:
                layers.append(
                    Resample(c_out, "upsample3d" if temporal_upsample[i] else "upsample2d")
                )
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(
            RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )
        _number_slots(self)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class WanVAE(nn.Module):
    """Encoder, decoder and the two 1x1x1 convs around the latent (`conv1`, `conv2`).

    `encode`/`decode` work on raw (un-normalised) latents; pass a `StreamCache` to carry
    temporal state across calls, or none for a one-shot call (zero history).
    """

    def __init__(
        self,
        cfg: WanVAEConfig = CONFIGS["wan2.1"],
        *,
        parts: tuple[str, ...] = ("encoder", "decoder"),
    ) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        if "encoder" in parts:
            self.encoder = Encoder(cfg)
            self.conv1 = CausalConv3d(z * 2, z * 2, 1)
        if "decoder" in parts:
            self.decoder = Decoder(cfg)
            self.conv2 = CausalConv3d(z, z, 1)
        # Not buffers: the state dict stays exactly Wan's file, and `.to(bf16)` must not
        # round them (2.8184 -> 2.8125); kept in float32 per device.
        self._norm_stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def encode(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        """[B,3,T,H,W] in [-1,1] -> raw latent means [B,z,1+(T-1)/4,h,w] (first call) or
        [B,z,T/4,h,w] (later calls of a stream)."""
        return self.conv1(self.encoder(x, cache))[:, : self.cfg.z_dim]

    def decode(self, z: Tensor, cache: StreamCache | None = None) -> Tensor:
        """Raw latents [B,z,n,h,w] -> frames [B,3,T,H,W] clamped to [-1,1]."""
        return self.decoder(self.conv2(z), cache).clamp_(-1.0, 1.0)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        stats = self._norm_stats.get(like.device)
        if stats is None:  # once per device: no host-to-device copy in the hot path
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(
                self.cfg.latents_mean, dtype=torch.float32, device=like.device
            ).view(shape)
            std = torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=like.device).view(
                shape
            )
            stats = self._norm_stats[like.device] = (mean, std)
        return stats

    def normalize(self, mu: Tensor) -> Tensor:
        mean, std = self._stats(mu)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return (z.float() * std + mean).to(z.dtype)

    def to_channels_last(self) -> WanVAE:
        """Conv3d weights in channels-last-3d: cuDNN's NDHWC kernels are faster on recent
        GPUs; activations follow the weights' layout through the convs."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        return self


# ---- checks shared by the stream wrappers -------------------------------------------


def check_frames(x: Tensor, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected frames [B,3,T,H,W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 16 or w % 16:
        raise ValueError(
            f"{what}: resolution {w}x{h} is not a multiple of 16 (the VAE compresses 8x and the"
            " transformer patches 2x2 latents)"
        )


def check_latents(z: Tensor, channels: int, what: str) -> None:
    if z.ndim != 5 or z.shape[1] != channels:
        raise ValueError(
            f"{what}: expected latents [B,{channels},n,h,w], got shape {tuple(z.shape)}"
        )
    if z.shape[2] < 1:
        raise ValueError(f"{what}: no latent frames to decode")
    h, w = z.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(
            f"{what}: latent size {w}x{h} gives a resolution of {8 * w}x{8 * h}, not a multiple of 16"
        )


# ---- streaming objects seen by the stream session ------------------------------------


def to_model(module: nn.Module, x: Tensor) -> Tensor:
    """`x` on the module's device and in its dtype: the session may run the transformer in
    another dtype than the VAE (and hands over float32 latents)."""
    p = next(module.parameters())
    return x.to(device=p.device, dtype=p.dtype)


class WanStreamDecoder:
    """FrameDecoder: transformer latents block by block, cache carried across blocks.

    `chunk` latents go through the network at once (None: the whole block). Smaller
    chunks give the same frames with a lower peak memory (1 = Wan's own schedule: at
    832x480 a 12-frame full-resolution activation is ~1 GB in bf16) at more launches.
    """

    def __init__(self, vae: WanVAE, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of latents or None, got {chunk}")
        self.vae = vae
        self.chunk = chunk
        self._decode = vae.decode
        self.reset()

    def compile(self, **kw) -> WanStreamDecoder:
        """torch.compile the decoder (whole graph: the cache is plain Python state). Expect
        three graphs: the stream's first block, the second (history appears), steady state."""
        self._decode = torch.compile(self.vae.decode, fullgraph=True, **kw)
        return self

    def reset(self) -> None:
        self.cache = StreamCache()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        check_latents(latents, self.vae.cfg.z_dim, "Wan VAE decode")
        z = to_model(self.vae, self.vae.denormalize(latents))
        if self.chunk is None or self.chunk >= z.shape[2]:
            return self._decode(z, self.cache)
        return torch.cat([self._decode(c, self.cache) for c in z.split(self.chunk, 2)], 2)


class WanImageEncoder:
    """AnchorEncoder: one image, no temporal cache (the anchor must look like a video start)."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self._encode = vae.encode

    def compile(self, **kw) -> WanImageEncoder:
        self._encode = torch.compile(self.vae.encode, fullgraph=True, **kw)
        return self

    @torch.no_grad()
    def encode_image(self, frame: Tensor) -> Tensor:
        check_frames(frame, "Wan VAE encode_image")
        if frame.shape[2] != 1:
            raise ValueError(f"Wan VAE encode_image: expected one frame, got {frame.shape[2]}")
        return self.vae.normalize(self._encode(to_model(self.vae, frame)))


class WanStreamEncoder:
    """Incoming video -> transformer latents; first call 1+4k frames, then 4k per call."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self._encode = vae.encode
        self.reset()

    def compile(self, **kw) -> WanStreamEncoder:
        """torch.compile the encoder as the decoder is (whole graph, the cache is plain
        Python state): a video start, then steady blocks. The VACE context encode (two
        streams of 12 frames at 832x480) took 243 ms a block eager (issue 15)."""
        self._encode = torch.compile(self.vae.encode, fullgraph=True, **kw)
        return self

    def reset(self) -> None:
        self.cache = StreamCache()
        self.started = False

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        check_frames(frames, "Wan VAE encode")
        t = frames.shape[2]
        if (t - 1 if not self.started else t) % TEMPORAL or t == 0:
            want = (
                "1 + 4k frames on the first call"
                if not self.started
                else "a multiple of 4 frames after the first call"
            )
            raise ValueError(f"Wan VAE encode: got {t} frames, the stream encoder needs {want}")
        self.started = True
        return self.vae.normalize(self._encode(to_model(self.vae, frames), self.cache))


# ---- construction ---------------------------------------------------------------------


def random_wan_vae(
    cfg: WanVAEConfig = CONFIGS["wan2.1"], *, device="cpu", dtype=torch.float32, seed: int = 0,
    parts: tuple[str, ...] = ("encoder", "decoder"),
) -> WanVAE:  # fmt: skip
    """Random weights (tests, `bench` without downloads)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            vae = WanVAE(cfg, parts=parts)
    return vae.to(dtype).eval().requires_grad_(False)


def load_wan_vae(
    path: str | Path, device="cpu", dtype=torch.float32, *, cfg: WanVAEConfig | None = None,
    parts: tuple[str, ...] = ("encoder", "decoder"),
) -> WanVAE:  # fmt: skip
    """Load `Wan2.1_VAE.pth` (or a tiny file in the same naming). `parts` drops the half
    not needed (the TAEHV path needs only the encoder for the anchor)."""
    sd = strip_prefix(load_checkpoint(path))
    if cfg is None:
        cfg = _infer_config(sd, path)
    keep = {"encoder": ("encoder.", "conv1."), "decoder": ("decoder.", "conv2.")}
    keep = tuple(prefix for part in parts for prefix in keep[part])
    sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    with torch.device("meta"):
        vae = WanVAE(cfg, parts=parts)
    assign_state_dict(vae, sd, file=path, dtype=dtype, device=device)
    return vae.eval().requires_grad_(False)


def _infer_config(sd: dict[str, Tensor], path) -> WanVAEConfig:
    """base_dim and z_dim from the file, so tiny test files and the real one load alike."""
    w = sd.get("decoder.conv1.weight")
    e = sd.get("encoder.conv1.weight")
    if w is None and e is None:
        raise WeightsError(
            f"{path}: not a Wan VAE checkpoint (no encoder.conv1 / decoder.conv1 weights)"
        )
    if e is not None:
        base = e.shape[0]
    else:
        base = w.shape[0] // CONFIGS["wan2.1"].dim_mult[-1]
    z = w.shape[1] if w is not None else sd["encoder.head.2.weight"].shape[0] // 2
    if z != 16:
        raise WeightsError(
            f"{path}: a VAE with {z} latent channels; the Wan2.1 VAE has 16 (a Wan2.2 VAE?)"
        )
    return replace(CONFIGS["wan2.1"], base_dim=base, z_dim=z)
