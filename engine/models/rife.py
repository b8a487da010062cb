"""RIFE v4-class frame interpolation (IFNet), for smooth output at the display's rate.

Our own implementation of the published architecture (Huang et al., "Real-Time
Intermediate Flow Estimation for Video Frame Interpolation", ECCV 2022) in the layout of
the MIT-licensed Practical-RIFE v4.25 weights (`flownet.pkl`); parameter names follow that
file (`encode.cnn{0..3}`, `block{i}.conv0.{0,1}.0`, `block{i}.convblock.{j}.conv/.beta`,
`block{i}.lastconv.0`) once the training wrapper's `module.` prefix is dropped.

How it works, in the terms the tests use:

- An encoder (`encode`) turns each frame into a few feature channels at full resolution.
- Blocks run coarse to fine (scales 16, 8, 4, 2, 1: the block sees its input
  downsampled by that factor). Block 0 sees both frames, their features and the time
  ``t``; it predicts the flows from the output time to each frame (4 channels, pixels),
  a fusion mask logit and a few side features. Each later block sees both frames and
  both feature maps *backward-warped* by the current flows, ``t``, the mask, the side
  features and the flow (divided by its scale), and predicts a flow correction
  (``flow += delta``), a new mask and new side features.
- The output is ``sigmoid(m) * warp(I0, F_t0) + (1 - sigmoid(m)) * warp(I1, F_t1)``.

``t`` is an input map, so any time in [0, 1] works (not only the midpoint): the pacer
asks for the exact presentation time. Frames are [0, 1] floats; sizes are padded up to a
multiple of 64 (the coarsest block sees 1/16, then two stride-2 convolutions) for the
flow estimation; the flows and mask are cut back to the frame before the final synthesis,
so edges clamp to the frame's own border rather than sampling the zero pad (the one
deliberate difference from Practical-RIFE's inference code, visible only at the
bottom/right edge of padded sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.weights.checkpoint import WeightsError, assign_state_dict, load_checkpoint, strip_prefix

__all__ = [
    "RifeConfig",
    "CONFIGS",
    "IFNet",
    "warp",
    "synthesize",
    "random_rife",
    "load_rife",
]


@dataclass(frozen=True)
class RifeConfig:
    head_channels: int = 16  # encoder width
    feat_channels: int = 4  # encoder output channels per frame
    block_channels: tuple[int, ...] = (192, 128, 96, 64, 32)  # one block per scale
    scales: tuple[int, ...] = (16, 8, 4, 2, 1)  # coarse to fine
    side_channels: int = 8  # features a block hands to the next
    res_convs: int = 8  # residual convolutions per block

    def __post_init__(self) -> None:
        if len(self.block_channels) != len(self.scales) or not self.scales:
            raise ValueError("one block width per scale, at least one scale")
        if any(c < 2 or c % 2 for c in self.block_channels):
            raise ValueError(f"block widths must be even and >= 2, got {self.block_channels}")

    @property
    def out_channels(self) -> int:
        """Per-block prediction: 4 flow + 1 mask + side features."""
        return 5 + self.side_channels


CONFIGS = {
    "v4.25": RifeConfig(),
    # Same code, other numbers: cheap enough to run at 30 fps on a CPU next to the tiny model.
    "tiny": RifeConfig(
        head_channels=4,
        feat_channels=2,
        block_channels=(8, 8, 8),
        scales=(4, 2, 1),
        side_channels=2,
        res_convs=1,
    ),
}


_GRIDS: dict[tuple, Tensor] = {}


def _base_grid(h: int, w: int, device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised sampling grid [-1, 1] (align_corners=True), [1, h, w, 2] (x, y), float32
    whatever the frames' dtype: in half precision the coordinates of an 832-pixel row
    would be off by up to half a pixel. Cached per size and device."""
    if torch.compiler.is_compiling():  # traced: a few fused index ops, no global cache
        return _make_grid(h, w, device, dtype)
    key = (h, w, str(device), dtype)
    grid = _GRIDS.get(key)
    if grid is None:
        grid = _make_grid(h, w, device, dtype)
        if len(_GRIDS) > 32:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def _make_grid(h: int, w: int, device, dtype: torch.dtype) -> Tensor:
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def warp(img: Tensor, flow: Tensor) -> Tensor:
    """Backward warp: out[y, x] = img sampled bilinearly at (x + flow_x, y + flow_y),
    positions clamped to the border. ``flow`` [N, 2, H, W] in pixels. Coordinates are
    float32 (and so is the sampling, for half-precision frames); the result has
    ``img``'s dtype."""
    return _warp_f(img.to(_warp_dtype(img)), flow).to(img.dtype)


def _conv_act(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # Sequential(conv, act): the file's keys are conv0.{i}.0.*
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.LeakyReLU(0.2))


class ResConv(nn.Module):
    """act(conv(x) * beta + x): a residual 3x3 with a learnt per-channel gain."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class Head(nn.Module):
    """Per-frame features: stride-2 conv, two convs, a transposed conv back to full size."""

    def __init__(self, cfg: RifeConfig):
        super().__init__()
        c = cfg.head_channels
        self.cnn0 = nn.Conv2d(3, c, 3, 2, 1)
        self.cnn1 = nn.Conv2d(c, c, 3, 1, 1)
        self.cnn2 = nn.Conv2d(c, c, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(c, cfg.feat_channels, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(self.cnn0(x), 0.2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)


class IFBlock(nn.Module):
    """One scale: (input at 1/scale) -> 1/4 of that -> residual convs -> back up, 4x by a
    transposed conv and a pixel shuffle, then to full size."""

    def __init__(self, c_in: int, c: int, cfg: RifeConfig):
        super().__init__()
        self.conv0 = nn.Sequential(_conv_act(c_in, c // 2, 2), _conv_act(c // 2, c, 2))
        self.convblock = nn.Sequential(*[ResConv(c) for _ in range(cfg.res_convs)])
        self.lastconv = nn.Sequential(
            nn.ConvTranspose2d(c, 4 * cfg.out_channels, 4, 2, 1), nn.PixelShuffle(2)
        )

    def forward(self, x: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        if scale != 1:
            x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        out = self.lastconv(self.convblock(self.conv0(x)))
        if scale != 1:
            out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class IFNet(nn.Module):
    """``IFNet(cfg)(img0, img1, t)`` -> the frame at time ``t`` (0 = img0, 1 = img1).

    ``img0``/``img1``: [N, 3, H, W] in [0, 1]; ``t``: a float or a tensor broadcastable to
    [N, 1, 1, 1]. ``scale`` < 1 estimates flow at a lower resolution (faster, for large
    frames); the frames themselves are always warped at full resolution.
    """

    def __init__(self, cfg: RifeConfig = CONFIGS["v4.25"]):
        super().__init__()
        self.cfg = cfg
        f = cfg.feat_channels
        self.encode = Head(cfg)
        first = 3 + 3 + 2 * f + 1  # both frames, both features, t
        later = 6 + 2 * f + 1 + 1 + cfg.side_channels + 4  # + mask, side features, flow
        for i, c in enumerate(cfg.block_channels):
            self.add_module(f"block{i}", IFBlock(first if i == 0 else later, c, cfg))

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.cfg.block_channels))]

    def pad_multiple(self, scale: float = 1.0) -> int:
        return int(math.ceil(4 * max(self.cfg.scales) / scale))

    def forward(self, img0: Tensor, img1: Tensor, t: float | Tensor, scale: float = 1.0) -> Tensor:
        flow, mask = self.flow(img0, img1, t, scale)
        return synthesize(img0, img1, flow, mask)

    def flow(
        self, img0: Tensor, img1: Tensor, t: float | Tensor, scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """The flows from time ``t`` to each frame ([N, 4, H, W], pixels) and the fusion
        mask logit ([N, 1, H, W]): everything but the final synthesis. (The interpolator
        can run this on smaller frames and synthesise at full size.)

        ``t`` may be a tensor of N times for one pair of frames ([1, 3, H, W] each): the
        N outputs of one call equal N calls with one time each (batch = times)."""
        if img0.shape != img1.shape or img0.ndim != 4 or img0.shape[1] != 3:
            raise ValueError(
                f"frames must both be [N, 3, H, W], got {tuple(img0.shape)} and {tuple(img1.shape)}"
            )
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        h, w = img0.shape[-2:]
        p0, p1 = self.pad(img0, scale), self.pad(img1, scale)
        flow, mask = self.flow_padded(p0, p1, self.encode(p0), self.encode(p1), t, scale)
        return flow[:, :, :h, :w], mask[:, :, :h, :w]

    def pad(self, img: Tensor, scale: float = 1.0) -> Tensor:
        """Zero-pad the bottom/right up to the multiple the coarsest block needs."""
        m = self.pad_multiple(scale)
        h, w = img.shape[-2:]
        ph, pw = -h % m, -w % m
        return F.pad(img, (0, pw, 0, ph)) if ph or pw else img

    def flow_padded(
        self,
        img0: Tensor,
        img1: Tensor,
        f0: Tensor,
        f1: Tensor,
        t: float | Tensor,
        scale: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`flow` on frames already padded (:meth:`pad`) with their encoder features
        ``f0 = encode(img0)``, ``f1 = encode(img1)`` given: the features do not depend
        on ``t``, so a frame that is in two pairs (every generated frame is) or in a
        batch of times is encoded once. Flow and mask come back padded.

        Frames of batch 1 with ``t`` a tensor of N times are broadcast to N."""
        n = img0.shape[0]
        hh, ww = img0.shape[-2:]
        nc = img0.shape[1]
        # Each frame and its features are warped by the same flow: one sampling call for
        # both (grid_sample treats channels independently: the same numbers as two calls),
        # from one float32 copy made once instead of once per block.
        s0 = torch.cat((img0, f0), 1).to(_warp_dtype(img0))
        s1 = torch.cat((img1, f1), 1).to(_warp_dtype(img0))
        if torch.is_tensor(t):
            t = t.to(img0.dtype).reshape(-1, 1, 1, 1)
            if t.shape[0] != n:
                if n != 1:
                    raise ValueError(f"{t.shape[0]} times for a batch of {n} frame pairs")
                n = t.shape[0]
                img0, img1 = img0.expand(n, -1, -1, -1), img1.expand(n, -1, -1, -1)
                f0, f1 = f0.expand(n, -1, -1, -1), f1.expand(n, -1, -1, -1)
                s0, s1 = s0.expand(n, -1, -1, -1), s1.expand(n, -1, -1, -1)
            tmap = t.expand(n, 1, hh, ww)
        else:  # a fill, not a host-to-device copy
            tmap = torch.full((n, 1, hh, ww), float(t), device=img0.device, dtype=img0.dtype)
        flow = mask = side = None
        w0, w1, wf0, wf1 = img0, img1, f0, f1
        for i, block in enumerate(self.blocks):  # (indexing, not zip: simplest to trace)
            s = self.cfg.scales[i] / scale
            if flow is None:
                flow, mask, side = block(torch.cat((img0, img1, f0, f1, tmap), 1), s)
            else:
                x = torch.cat((w0, w1, wf0, wf1, tmap, mask, side, flow / s), 1)
                delta, mask, side = block(x, s)
                flow = flow + delta
            ws0 = _warp_f(s0, flow[:, :2]).to(img0.dtype)
            ws1 = _warp_f(s1, flow[:, 2:4]).to(img0.dtype)
            w0, wf0 = ws0[:, :nc], ws0[:, nc:]
            w1, wf1 = ws1[:, :nc], ws1[:, nc:]
        return flow, mask


def _warp_dtype(img: Tensor) -> torch.dtype:
    return torch.float64 if img.dtype == torch.float64 else torch.float32


def _warp_f(img: Tensor, flow: Tensor) -> Tensor:
    """:func:`warp` of an image already in its sampling dtype (float32/64); the result
    stays in that dtype."""
    n, _, h, w = img.shape
    grid = _base_grid(h, w, img.device, img.dtype)
    sx, sy = 2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)
    f = flow.to(img.dtype)
    coords = grid + torch.stack((f[:, 0] * sx, f[:, 1] * sy), dim=-1)
    return F.grid_sample(img, coords, mode="bilinear", padding_mode="border", align_corners=True)


def synthesize(img0: Tensor, img1: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """``sigmoid(m) * warp(I0, F_t0) + (1 - sigmoid(m)) * warp(I1, F_t1)``."""
    a = torch.sigmoid(mask)
    return warp(img0, flow[:, :2]) * a + warp(img1, flow[:, 2:4]) * (1 - a)


def random_rife(
    cfg: RifeConfig = CONFIGS["v4.25"], *, device="cpu", dtype=torch.float32, seed: int = 0
) -> IFNet:
    """Random weights (tests, `bench`, the tiny model): same code, same cost."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            net = IFNet(cfg)
    return net.to(dtype).eval().requires_grad_(False)


def load_rife(path: str | Path, device="cpu", dtype=torch.float32) -> IFNet:
    """Load a Practical-RIFE v4.25 `flownet.pkl` (or a file in its layout, with or without
    the `module.` prefix). A file of another v4 release (other block count or widths)
    gets an error naming the mismatching keys."""
    sd = strip_prefix(load_checkpoint(path), "module.")
    if "block0.conv0.0.0.weight" not in sd or "encode.cnn0.weight" not in sd:
        raise WeightsError(
            f"{path}: not a RIFE v4.25-layout checkpoint (no block0.conv0.0.0.weight /"
            " encode.cnn0.weight); use Practical-RIFE v4.25's flownet.pkl"
        )
    n_blocks = len({k.split(".")[0] for k in sd if k.startswith("block")})
    cfg = CONFIGS["v4.25"]
    if n_blocks != len(cfg.scales):
        raise WeightsError(
            f"{path}: {n_blocks} flow blocks, RIFE v4.25 has {len(cfg.scales)} (another v4"
            " release? use v4.25's flownet.pkl)"
        )
    with torch.device("meta"):
        net = IFNet(cfg)
    assign_state_dict(net, sd, file=path, dtype=dtype, device=device)
    return net.eval().requires_grad_(False)
