"""Where the interpolation network runs: uint8 RGBA frames in, the frame at time t out.

The frame path's publisher thread calls :meth:`Interpolator.frame` once per output frame
that falls between two generated frames. On CUDA the work goes on a side stream of its
own (the generation thread's stream never waits for it; the GPU overlaps the two), and
the result comes back through one pinned host buffer that the publisher waits for,
the publisher and never the generation thread. On the CPU it runs inline.

``t`` = 0 and ``t`` = 1 return the endpoint frames themselves (no network): the pacer
asks for them whenever a presentation time lands exactly on a generated frame.
Alpha is blended linearly (the network interpolates RGB only).

``downscale`` d > 1 estimates the flow on frames d times smaller and synthesises at full
size (flows scaled up by d): the cost of the network drops by about d squared while the
frame keeps its resolution. The tiny CPU model uses it; on a GPU at 832x480 it is 1.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.rife import synthesize

log = logging.getLogger(__name__)

__all__ = ["Interpolator", "InterpolationUnavailable", "build_interpolator"]


class InterpolationUnavailable(RuntimeError):
    """Interpolation was asked for but there is no network (weights missing)."""


class Interpolator:
    """``Interpolator(net, device)``; ``frame(a, b, t)`` -> [H, W, 4] uint8 numpy view
    (valid until the next call). ``a`` and ``b`` are [H, W, 4] uint8 torch tensors (on the
    net's device or the CPU) or numpy arrays."""

    def __init__(
        self,
        net: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype | None = None,
        scale: float = 1.0,
        downscale: int = 1,
        name: str = "rife",
    ):
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.net = net.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        if not scale > 0:
            raise ValueError(f"interpolation flow scale must be > 0, got {scale}")
        self.scale = float(scale)
        if not (isinstance(downscale, int) and downscale >= 1):
            raise ValueError(f"interpolation downscale must be an integer >= 1, got {downscale}")
        self.downscale = downscale
        self.name = name
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._done = torch.cuda.Event(blocking=True) if self.stream is not None else None
        self._host: torch.Tensor | None = None  # pinned (CUDA) or plain output buffer
        self._single: set[int] = set()  # threads already limited to one CPU thread
        self._cache: tuple[Any, tuple[torch.Tensor, ...]] | None = None  # last pair's inputs
        self.frames = 0  # network calls
        self.ms: float | None = None  # EMA of wall ms per interpolated frame
        self.last_ms: float | None = None

    def _to_device(self, x: Any) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def frame(self, a: Any, b: Any, t: float, key: Any = None) -> np.ndarray:
        """``key`` (hashable, optional) names the pair: consecutive calls with the same
        key (several output frames between the same two generated ones) reuse the
        frames' float conversion instead of redoing it."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"interpolation time must be in [0, 1], got {t}")
        if t == 0.0 or t == 1.0:
            x = a if t == 0.0 else b
            return x if isinstance(x, np.ndarray) else x.cpu().numpy()
        if tuple(a.shape) != tuple(b.shape) or len(a.shape) != 3 or a.shape[2] != 4:
            raise ValueError(
                f"frames must both be [H, W, 4] uint8, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        t0 = time.perf_counter()
        if self.stream is None and threading.get_ident() not in self._single:
            # CPU: one intra-op thread for this (publisher) thread only; the setting is per
            # thread. Two OpenMP pools spinning against generation on a few cores cost 10x.
            torch.set_num_threads(1)
            self._single.add(threading.get_ident())
        h, w = int(a.shape[0]), int(a.shape[1])
        if self._host is None or tuple(self._host.shape) != (h, w, 4):
            self._host = torch.empty(
                (h, w, 4), dtype=torch.uint8, pin_memory=self.stream is not None
            )
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = self._run(a, b, t, key)
                self._host.copy_(out, non_blocking=True)
                self._done.record(self.stream)
            self._done.synchronize()  # the publisher waits, on its own thread
        else:
            self._host.copy_(self._run(a, b, t, key))
        ms = (time.perf_counter() - t0) * 1e3
        self.last_ms = ms
        self.ms = ms if self.ms is None else 0.9 * self.ms + 0.1 * ms
        self.frames += 1
        return self._host.numpy()

    def _inputs(self, a: Any, b: Any, key: Any) -> tuple[torch.Tensor, ...]:
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        a, b = self._to_device(a), self._to_device(b)
        x0 = a[..., :3].permute(2, 0, 1).unsqueeze(0).to(self.dtype).div_(255.0)
        x1 = b[..., :3].permute(2, 0, 1).unsqueeze(0).to(self.dtype).div_(255.0)
        alpha = (a[..., 3:].float(), b[..., 3:].float())
        inputs: tuple[torch.Tensor, ...] = (x0, x1, *alpha)
        if self.downscale > 1:
            h, w = x0.shape[-2:]
            small = (max(1, h // self.downscale), max(1, w // self.downscale))
            s0 = F.interpolate(x0, size=small, mode="bilinear", align_corners=False)
            s1 = F.interpolate(x1, size=small, mode="bilinear", align_corners=False)
            inputs += (s0, s1)
        self._cache = (key, inputs) if key is not None else None
        return inputs

    def _run(self, a: Any, b: Any, t: float, key: Any = None) -> torch.Tensor:
        x0, x1, a0, a1, *low = self._inputs(a, b, key)
        if not low:
            y = self.net(x0, x1, t, scale=self.scale)
        else:
            h, w = x0.shape[-2:]
            s0, s1 = low
            small = tuple(s0.shape[-2:])
            flow, mask = self.net.flow(s0, s1, t, scale=self.scale)
            # pixels of the small frame -> pixels of the full one, scaled while small (the
            # bilinear upsampling is linear, so it commutes); python scalars: no copy to
            # the device
            sx, sy = w / small[1], h / small[0]
            flow = torch.cat(
                (flow[:, 0:1] * sx, flow[:, 1:2] * sy, flow[:, 2:3] * sx, flow[:, 3:4] * sy), 1
            )
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
            y = synthesize(x0, x1, flow, mask)
        h, w = x0.shape[-2:]
        out = torch.empty((h, w, 4), dtype=torch.uint8, device=x0.device)
        out[..., :3] = y[0].mul(255.0).add_(0.5).clamp_(0, 255).permute(1, 2, 0)
        out[..., 3:] = (a0 * (1.0 - t) + a1 * t).add_(0.5)
        return out


def build_interpolator(
    *,
    model: str,
    device: str | torch.device,
    models_dir: str | Path | None = None,
    random_weights: bool = False,
    scale: float | None = None,
) -> Interpolator:
    """The interpolator for an engine: the tiny RIFE (random weights) with the tiny model,
    a full-size random one with ``--random-weights`` (timing), else the downloaded v4.25
    weights. Raises InterpolationUnavailable naming the file and the download command."""
    from engine.models.rife import CONFIGS, load_rife, random_rife
    from engine.weights.catalog import FILES, check_file

    device = torch.device(device)
    if model == "tiny":
        # flow on frames 4x smaller: the CPU has to keep 30 fps next to generation
        net = random_rife(CONFIGS["tiny"], device=device)
        return Interpolator(net, device, scale=scale or 1.0, downscale=4, name="rife-tiny")
    if random_weights:
        return Interpolator(random_rife(device=device), device, scale=scale or 1.0)
    f = FILES["rife"]
    path = f.path(models_dir)
    why = check_file(path)
    if why is not None:
        raise InterpolationUnavailable(
            f"interpolation needs the RIFE v4.25 weights: {path} ({why}); fetch them with"
            f" `dreamdeck download --rife`"
        )
    from engine.weights.checkpoint import WeightsError

    try:
        net = load_rife(path, device=device)
    except WeightsError as e:
        raise InterpolationUnavailable(
            f"interpolation: the RIFE weights cannot be used: {e}; fetch them again with"
            " `dreamdeck download --rife` (after deleting the file)"
        ) from None
    return Interpolator(net, device, scale=scale or 1.0)


class BlockResampler:
    """Whole blocks in, blocks at another frame rate out: for the recording and the
    offline render, where frames are not presented one by one.

    Generated frames are numbered on, block after block; output frame j sits at source
    position ``j * step`` (``step`` = source frames per output frame: 16 / 30 for a
    render at 30 fps, the generation rate / output rate for a live ``fit`` recording,
    read again for each block). A position between two frames is interpolated, one on a
    frame is that frame. The last frame of each block is kept for the next one, so block
    edges interpolate too. Deterministic for the same frames and interpolator.
    """

    def __init__(self, interpolator: Interpolator, step: float | Any):
        self.interp = interpolator
        self._step = step
        self._pos = 0.0  # source position of the next output frame
        self._base = 0  # source index of the first frame of the next block
        self._last: np.ndarray | None = None

    def step(self) -> float:
        s = float(self._step() if callable(self._step) else self._step)
        if not (s > 0 and np.isfinite(s)):
            raise ValueError(f"resampling step must be a positive number, got {s}")
        return s

    def reset(self) -> None:
        self._pos, self._base, self._last = 0.0, 0, None

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """[T, H, W, 4] uint8 in; [T', H, W, 4] uint8 out (T' may be 0)."""
        block = np.asarray(block)
        n = block.shape[0]
        if self._last is not None and self._last.shape != block.shape[1:]:
            self.reset()  # new frame size: start over
        step = self.step()
        out = []
        end = self._base + n - 1  # the last source index available
        while self._pos <= end + 1e-9:
            k = int(np.floor(self._pos + 1e-9))
            t = self._pos - k
            if t < 1e-6:
                t = 0.0
            a = self._frame(block, k)
            if t == 0.0:
                out.append(a.copy())
            elif k + 1 > end:
                break  # needs the next block
            else:
                out.append(self.interp.frame(a, self._frame(block, k + 1), t).copy())
            self._pos += step
        self._last = block[-1].copy()
        self._base += n
        if not out:
            return np.empty((0, *block.shape[1:]), dtype=np.uint8)
        return np.stack(out)

    def _frame(self, block: np.ndarray, k: int) -> np.ndarray:
        i = k - self._base
        if i >= 0:
            return block[i]
        if i == -1 and self._last is not None:
            return self._last
        raise IndexError(f"source frame {k} is no longer held")  # pragma: no cover
