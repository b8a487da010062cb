"""TAEHV: the tiny autoencoder for Wan2.1's latent space (`taew2_1.pth`, madebyollin/taehv, MIT).

Our own implementation of the published architecture; the parameter names follow the
file exactly (`encoder.{i}.*`, `decoder.{i}.*`, indices of its two flat sequences).

Latent scaling (checked against the reference's README and code, spec §4): taew2_1
encodes and decodes the latents the diffusion model works on, i.e. Wan's *normalised*
latents (mu - mean) / std. No mean/std step is applied here; only the "light" variants
(`lighttaew2_1`, another architecture, not supported here) apply Wan's mean/std
themselves. Frames are [0, 1] on TAEHV's side; the stream wrappers map to [-1, 1].

Time: the decoder grows time 4x from the first latent on (n latents -> 4n frames); the
first 3 frames of a stream are warm-up and are trimmed, so the counts equal Wan's VAE
(1 + 4(n-1), then 4n). The encoder pools 4 frames into one latent. To keep Wan's
alignment (latent 0 <- frame 0 alone, latent i <- frames 4i-3..4i) the stream encoder
repeats the first frame of a stream 3 times in front (the mirror of the decoder's trim);
the reference's whole-video encoder pads at the end instead.

Why it streams: the only temporal state is a MemBlock's previous input frame (one frame
of memory per MemBlock), and TPool/TGrow act within a group of frames. So a block of
latents goes through each layer at once, and carrying each MemBlock's last input across
calls equals running the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.wan_vae import check_frames, check_latents, to_model
from engine.weights.checkpoint import WeightsError, assign_state_dict, load_checkpoint, strip_prefix


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    image_channels: int = 3
    enc_dim: int = 64
    dec_dims: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)


CONFIGS = {"taew2_1": TAEHVConfig(), "tiny": TAEHVConfig(enc_dim=8, dec_dims=(16, 8, 8, 8))}


def conv3x3(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class SoftClamp(nn.Module):
    """Smoothly bounds the decoder's input to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees its own input one frame earlier."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(c_in * 2, c_out),
            nn.ReLU(),
            conv3x3(c_out, c_out),
            nn.ReLU(),
            conv3x3(c_out, c_out),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge `stride` consecutive frames into one (frames stacked on channels, 1x1 conv)."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c * stride, c, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        return self.conv(x.reshape(nt // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """Split each frame into `stride` frames (1x1 conv to stride*C channels, in frame order)."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


class TAEHV(nn.Module):
    def __init__(self, cfg: TAEHVConfig = CONFIGS["taew2_1"]) -> None:
        super().__init__()
        self.cfg = cfg
        e, (d0, d1, d2, d3) = cfg.enc_dim, cfg.dec_dims
        enc: list[nn.Module] = [conv3x3(cfg.image_channels, e), nn.ReLU()]
        for down in cfg.encoder_time_downscale:
            enc += [TPool(e, 2 if down else 1), conv3x3(e, e, stride=2, bias=False)]
            enc += [MemBlock(e, e) for _ in range(3)]
        enc.append(conv3x3(e, cfg.latent_channels))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [SoftClamp(), conv3x3(cfg.latent_channels, d0), nn.ReLU()]
        for c_in, c_out, up in zip(
            (d0, d1, d2), (d1, d2, d3), cfg.decoder_time_upscale, strict=True
        ):
            dec += [MemBlock(c_in, c_in) for _ in range(3)]
            dec += [
                nn.Upsample(scale_factor=2),
                TGrow(c_in, 2 if up else 1),
                conv3x3(c_in, c_out, bias=False),
            ]
        dec += [nn.ReLU(), conv3x3(d3, cfg.image_channels)]
        self.decoder = nn.Sequential(*dec)
        self.t_downscale = 2 ** sum(cfg.encoder_time_downscale)
        self.t_upscale = 2 ** sum(cfg.decoder_time_upscale)
        self.frames_to_trim = self.t_upscale - 1

    def to_channels_last(self) -> TAEHV:
        """Conv weights in channels-last (NHWC): faster cuDNN kernels on recent GPUs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return self

    @staticmethod
    def run(layers: nn.Sequential, x: Tensor, memory: list[Tensor | None] | None) -> Tensor:
        """Apply `layers` to frames x [N,T,C,H,W] -> [N,T',C',H',W'], all frames of a layer
        at once. `memory[i]` is MemBlock i's last input frame [N,C,H,W] from the previous
        call (None: zeros, the stream start); it is updated in place."""
        n, t = x.shape[:2]
        x = x.reshape(n * t, *x.shape[2:])
        for i, layer in enumerate(layers):
            if isinstance(layer, MemBlock):
                xt = x.view(n, t, *x.shape[1:])
                prev = memory[i] if memory is not None else None
                if prev is None:
                    prev = x.new_zeros((n, 1, *x.shape[1:]))
                else:
                    prev = prev.unsqueeze(1)
                past = torch.cat([prev, xt[:, :-1]], 1).view_as(x)
                if memory is not None:
                    memory[i] = xt[:, -1].clone()
                x = layer(x, past)
            else:
                x = layer(x)
            t = x.shape[0] // n
        return x.view(n, t, *x.shape[1:])

    def decode_video(self, z: Tensor, memory: list[Tensor | None] | None = None) -> Tensor:
        """Latents [N,n,C,h,w] -> frames [N,4n,3,H,W] in [0,1] (untrimmed)."""
        return self.run(self.decoder, z, memory).clamp(0.0, 1.0)

    def encode_video(self, x: Tensor, memory: list[Tensor | None] | None = None) -> Tensor:
        """Frames [N,T,3,H,W] in [0,1], T a multiple of 4 -> latents [N,T/4,C,h,w]."""
        if x.shape[1] % self.t_downscale:
            raise ValueError(
                f"TAEHV encode: {x.shape[1]} frames, needs a multiple of {self.t_downscale}"
            )
        return self.run(self.encoder, x, memory)


# ---- streaming objects seen by the stream session ------------------------------------


def _check_continues(shape: tuple[int, ...] | None, x: Tensor) -> tuple[int, ...]:
    """Batch and spatial size of a stream are fixed until reset()."""
    new = (x.shape[0], *x.shape[3:])
    if shape is not None and new != shape:
        raise ValueError(
            f"TAEHV stream: input of shape {tuple(x.shape)} does not continue the stream (batch,"
            f" height, width were {shape}): call reset() when batch or resolution changes"
        )
    return new


class TAEHVStreamDecoder:
    """FrameDecoder: [B,16,n,h,w] transformer latents -> [B,3,T,H,W] in [-1,1]."""

    def __init__(self, tae: TAEHV) -> None:
        self.tae = tae
        self._decode = tae.decode_video
        self.reset()

    def compile(self, **kw) -> TAEHVStreamDecoder:
        """torch.compile the decoder (two graphs: stream start without memory, then steady)."""
        self._decode = torch.compile(self.tae.decode_video, fullgraph=True, **kw)
        return self

    def reset(self) -> None:
        self.memory: list[Tensor | None] = [None] * len(self.tae.decoder)
        self.started = False
        self.shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        check_latents(latents, self.tae.cfg.latent_channels, "TAEHV decode")
        self.shape = _check_continues(self.shape, latents)
        y = self._decode(to_model(self.tae, latents).transpose(1, 2), self.memory)
        if not self.started:
            y = y[:, self.tae.frames_to_trim :]
            self.started = True
        return y.transpose(1, 2).mul(2.0).sub_(1.0)


class TAEHVStreamEncoder:
    """Incoming video [B,3,T,H,W] in [-1,1] -> transformer latents [B,16,n,h,w], with Wan's
    frame alignment: first call 1+4k frames -> 1+k latents, then 4k frames -> k latents."""

    def __init__(self, tae: TAEHV) -> None:
        self.tae = tae
        self.reset()

    def reset(self) -> None:
        self.memory: list[Tensor | None] = [None] * len(self.tae.encoder)
        self.started = False
        self.shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        check_frames(frames, "TAEHV encode")
        shape = _check_continues(self.shape, frames)
        t, k = frames.shape[2], self.tae.t_downscale
        if (t - 1 if not self.started else t) % k or t == 0:
            want = (
                f"1 + {k}j frames on the first call"
                if not self.started
                else f"a multiple of {k} after the first"
            )
            raise ValueError(f"TAEHV encode: got {t} frames, the stream encoder needs {want}")
        self.shape = shape
        x = to_model(self.tae, frames).transpose(1, 2).add(1.0).mul_(0.5)
        if not self.started:
            x = torch.cat([x[:, :1].expand(-1, k - 1, -1, -1, -1), x], 1)
            self.started = True
        return self.tae.encode_video(x, self.memory).transpose(1, 2)


class TAEHVImageEncoder:
    """AnchorEncoder from TAEHV's encoder: the image as a stream start (repeated to 4 frames).
    Cheap, but only approximately Wan's latent of the image: `decoders.build_decoder`
    uses Wan's encoder for the anchor unless asked otherwise."""

    def __init__(self, tae: TAEHV) -> None:
        self.tae = tae

    @torch.no_grad()
    def encode_image(self, frame: Tensor) -> Tensor:
        check_frames(frame, "TAEHV encode_image")
        if frame.shape[2] != 1:
            raise ValueError(f"TAEHV encode_image: expected one frame, got {frame.shape[2]}")
        x = (
            to_model(self.tae, frame)
            .transpose(1, 2)
            .add(1.0)
            .mul_(0.5)
            .expand(-1, self.tae.t_downscale, -1, -1, -1)
        )
        return self.tae.encode_video(x).transpose(1, 2)


# ---- construction ---------------------------------------------------------------------


def random_taehv(
    cfg: TAEHVConfig = CONFIGS["taew2_1"], *, device="cpu", dtype=torch.float32, seed: int = 0
) -> TAEHV:
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            tae = TAEHV(cfg)
    return tae.to(dtype).eval().requires_grad_(False)


def load_taehv(
    path: str | Path, device="cpu", dtype=torch.float32, *, cfg: TAEHVConfig | None = None
) -> TAEHV:
    """Load `taew2_1.pth` (or a tiny file in its layout)."""
    sd = strip_prefix(load_checkpoint(path))
    first = sd.get("decoder.1.weight")
    if first is None:
        raise WeightsError(f"{path}: not a TAEHV checkpoint (no decoder.1.weight)")
    if first.shape[1] != 16:
        raise WeightsError(
            f"{path}: a TAEHV for {first.shape[1]} latent channels (taew2_2 / taehv1_5 / another model?);"
            " Wan2.1's latent space has 16: use taew2_1.pth"
        )
    if cfg is None:
        enc = sd.get("encoder.0.weight")
        dims = (
            tuple(sd[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
            if all(f"decoder.{i}.weight" in sd for i in (1, 8, 14, 20))
            else CONFIGS["taew2_1"].dec_dims
        )
        cfg = replace(
            CONFIGS["taew2_1"], enc_dim=enc.shape[0] if enc is not None else 64, dec_dims=dims
        )
    with torch.device("meta"):
        tae = TAEHV(cfg)
    # Some TAEHV files store a TGrow with more output channels than this configuration
    # uses (trained with time growth there); the reference keeps the last frame's channels.
    own = tae.state_dict()
    for i, layer in enumerate(tae.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > own[key].shape[0]:
            sd[key] = sd[key][-own[key].shape[0] :]
    assign_state_dict(tae, sd, file=path, dtype=dtype, device=device)
    return tae.eval().requires_grad_(False)
