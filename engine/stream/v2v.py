"""Plain video-to-video math (docs/streaming-model.md §6): start a block from the encoded input
video instead of pure noise, and a strength that follows the input's motion.

Known to look worse than VACE V2V; kept because it is cheap (fewer steps) and simple.
Pure functions; the stream session decides when to use them (phase 2).

- start latents: x = s·ε + (1 − s)·E(frames), i.e. the flow path at sigma = s;
- step list: the first step at t = 1000·s, then the steps of the normal list below it
  (a strength of 0.5 with [1000, 750, 500, 250] runs [500, 250]; the list is cut, not
  squeezed, so V2V is cheaper than T2V). s = 0 gives no step at all: the block is the
  encoded input itself;
- motion-adaptive strength: motion = clamp(max frame-to-frame RMSE / 0.2, 0, 1) on frames
  in 0..1, and s ← 0.9·(0.8 − 0.2·motion) + 0.1·s: more motion, less noise (keep the
  input's motion), smoothed over blocks so it does not flicker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.models.wan_vae import TEMPORAL, WanStreamEncoder, WanVAE
from engine.stream.schedule import MAX_T

MOTION_RMSE_FULL = 0.2


def _check_strength(s: float) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"v2v strength must be a number in 0..1, got {s!r}") from None
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"v2v strength must be in 0..1, got {s}")
    return s


def v2v_start(encoded: Tensor, noise: Tensor, strength: float) -> Tensor:
    """x = s·ε + (1 − s)·E(frames) (float32)."""
    s = _check_strength(strength)
    if encoded.shape != noise.shape:
        raise ValueError(f"noise {list(noise.shape)} must match the latents {list(encoded.shape)}")
    return s * noise.float() + (1.0 - s) * encoded.float()


def v2v_steps(steps: Sequence[int], strength: float) -> tuple[int, ...]:
    """The step list for strength s: round(1000·s) first, then the given (decreasing) steps
    below it. Empty for s = 0 (the block is the encoded input, no model call)."""
    s = _check_strength(strength)
    first = round(MAX_T * s)
    if first <= 0:
        return ()
    return (first, *(int(t) for t in steps if int(t) < first))


def motion(frames: Tensor, previous: Tensor | None = None) -> float:
    """clamp(max frame-to-frame RMSE / 0.2, 0, 1) of frames [B, C, T, H, W] in [-1, 1]
    (RMSE measured on the 0..1 scale). `previous` ([B, C, 1, H, W], the last frame of the
    last block) adds the step across the block boundary. 0 for a single frame."""
    return float(motion_tensor(frames, previous))


def motion_tensor(frames: Tensor, previous: Tensor | None = None) -> Tensor:
    """`motion` as a 0-d float32 tensor on the frames' device (no host sync)."""
    x = frames if previous is None else torch.cat([previous, frames], dim=2)
    if x.shape[2] < 2:
        return torch.zeros((), device=x.device)
    d = (x[:, :, 1:].float() - x[:, :, :-1].float()) / 2.0  # [-1,1] -> 0..1 scale
    rmse = d.pow(2).mean(dim=(0, 1, 3, 4)).sqrt().amax()
    return (rmse / MOTION_RMSE_FULL).clamp(0.0, 1.0)


class LaggedMotion:
    """The motion of one block's input, read by the next block: the value decides which
    steps run (host control flow), and reading it in the same block would stall the host
    on the GPU (`.item()`). The copy to pinned memory is queued with the block and read a
    block later, when it is long done; CPU and GPU behave the same (always one block late)."""

    def __init__(self):
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None
        self._host: Tensor | None = None  # one pinned slot: pull always comes before push
        self.value = 0.0

    def reset(self) -> None:
        self._pending, self.value = None, 0.0

    def push(self, m: Tensor) -> None:
        if m.is_cuda:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host = self._host
            host.copy_(m, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (m.clone(), None)

    def pull(self) -> float:
        """The last pushed motion (0 before any): waits only for work queued a block ago."""
        if self._pending is not None:
            host, event = self._pending
            if event is not None:
                event.synchronize()
            self.value, self._pending = float(host), None
        return self.value


def adapt_strength(strength: float, motion_value: float) -> float:
    """s ← 0.9·(0.8 − 0.2·motion) + 0.1·s, motion clamped to 0..1."""
    m = min(max(float(motion_value), 0.0), 1.0)
    return 0.9 * (0.8 - 0.2 * m) + 0.1 * _check_strength(strength)


class VideoLatentEncoder:
    """E(frames) block by block: the input video as transformer latents (normalised, like
    the anchor), the Wan VAE's causal cache carried across blocks so a stream of blocks
    encodes like the whole video at once.

    9 frames (1 + 4k) start a video; 12 (4k) continue it. A block of 12 with nothing to
    continue (after `reset`: stream reset, new source, input back after a loss) puts its
    first frame once more in front as the video start and drops that latent, so it still
    gives 3 latents."""

    def __init__(self, vae: WanVAE):
        self.stream = WanStreamEncoder(vae)

    def reset(self) -> None:
        self.stream.reset()

    @torch.no_grad()
    def encode_block(self, frames: Tensor) -> Tensor:
        """[1, 3, T, H, W] in [-1, 1] -> [1, 16, n, h, w] float32."""
        t = frames.shape[2]
        if t % TEMPORAL == 1:
            self.stream.reset()
            return self.stream.encode(frames).float()
        if not self.stream.started:
            lead = torch.cat([frames[:, :, :1], frames], dim=2)
            return self.stream.encode(lead)[:, :, 1:].float()
        return self.stream.encode(frames).float()
