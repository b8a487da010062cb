"""Decoded frames to the 8-bit RGBA that frame sinks send (TouchDesigner, NDI, Spout)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_rgba8(frames: Tensor) -> Tensor:
    """[B,3,T,H,W] in [-1,1] -> uint8 [B*T,H,W,4] (alpha 255), contiguous, on the frames'
    device (no host copy: the sinks read it once, the GPU does the arithmetic).

    Values are clamped and rounded to nearest (ties to even), computed in float32 so bf16
    frames round the same as float32 ones would; NaN becomes black rather than garbage.
    """
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"to_rgba8: expected frames [B,3,T,H,W], got shape {tuple(frames.shape)}")
    b, _, t, h, w = frames.shape
    out = torch.empty((b * t, h, w, 4), dtype=torch.uint8, device=frames.device)
    rgb = frames.float().permute(0, 2, 3, 4, 1).reshape(b * t, h, w, 3)
    out[..., :3] = rgb.nan_to_num(-1.0).clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    out[..., 3] = 255
    return out
