"""Live video inputs: the source protocol, a threaded base that buffers timestamped frames
and retries a source that is not (yet) there, resampling by timestamps, and resizing.

Why a thread per source: the generation loop must never wait for a camera, a network
stream or another process. Each source grabs frames on its own thread into a short
buffer (the last few seconds) stamped with `time.time()`; the block loop takes what it
needs at the block boundary, without blocking.

Why resample by timestamps: inputs run at their own rate (TD at 60 fps, a camera at 30,
a file at its own), the model's blocks have 12 frames (9 for the first) covering the
block's span of output time. Each target time takes the newest frame at or before it
(sample and hold), so a fast source is decimated, a slow one repeated, and a stalled one
held, with no interpolation blur.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.runtime.input_names import FIT_MODES  # one list, shared with the controls

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A source spec or option that cannot work here; the message says which and why."""


@dataclass(frozen=True)
class InputFrame:
    rgba: np.ndarray  # [H, W, 4] uint8, top row first
    timestamp: float  # time.time() when captured (or presented, for files)


class InputSource(Protocol):
    name: str  # the spec, e.g. "shm:td_in"

    def start(self) -> None: ...
    def frames(self) -> list[InputFrame]: ...  # buffered frames, oldest first
    @property
    def last_time(self) -> float | None: ...  # timestamp of the newest frame
    @property
    def status(self) -> str: ...  # "" when fine, else why not
    def close(self) -> None: ...


class ThreadedSource:
    """Base of the sources: a grab thread, a time-bounded buffer, open retries.

    Subclasses implement `_open()` (raise when the source is not available), `_grab()`
    (return an InputFrame, or None after waiting at most ~50 ms) and `_release()`.
    Exceptions from `_grab` close the source and retry `_open` every `retry_s`.
    """

    keep_s = 3.0  # seconds of frames kept
    max_frames = 256
    retry_s = 0.5

    def __init__(self, name: str):
        self.name = name
        self._buf: deque[InputFrame] = deque(maxlen=self.max_frames)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = "starting"
        self.opened = False
        self.frames_in = 0

    # -- subclass hooks
    def _open(self) -> None:
        raise NotImplementedError

    def _grab(self) -> InputFrame | None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    # -- life cycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"input {self.name}", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self.opened:
            self._safe_release()

    def _safe_release(self) -> None:
        self.opened = False
        try:
            self._release()
        except Exception as e:  # closing a broken device must not raise into the engine
            log.debug("input %s: release failed: %s", self.name, e)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.opened:
                try:
                    self._open()
                    self.opened, self._status = True, ""
                except Exception as e:
                    self._status = f"{self.name}: not available ({e})"
                    self._stop.wait(self.retry_s)
                    continue
            try:
                f = self._grab()
            except Exception as e:
                self._status = f"{self.name}: lost ({e})"
                log.info("input %s lost: %s", self.name, e)
                self._safe_release()
                self._stop.wait(self.retry_s)
                continue
            if f is not None:
                self.push(f)

    def push(self, frame: InputFrame) -> None:
        with self._lock:
            self._buf.append(frame)
            while self._buf and frame.timestamp - self._buf[0].timestamp > self.keep_s:
                self._buf.popleft()
            self.frames_in += 1

    # -- readers (any thread)
    def frames(self) -> list[InputFrame]:
        with self._lock:
            return list(self._buf)

    @property
    def last_time(self) -> float | None:
        with self._lock:
            return self._buf[-1].timestamp if self._buf else None

    @property
    def status(self) -> str:
        return self._status


# --------------------------------------------------------------------------- resampling


def block_times(count: int, span: float, t_end: float) -> list[float]:
    """`count` evenly spaced times over the `span` seconds ending at `t_end` (inclusive)."""
    if count < 1 or span <= 0:
        raise ValueError(f"need count >= 1 and span > 0, got {count}, {span}")
    return [t_end - span + (k + 1) * span / count for k in range(count)]


def resample(frames: Sequence[InputFrame], times: Sequence[float]) -> list[InputFrame]:
    """For each target time the newest frame at or before it; before the first frame, the
    first frame. `frames` oldest first (timestamps non-decreasing)."""
    if not frames:
        raise ValueError("no frames to resample")
    stamps = [f.timestamp for f in frames]
    out = []
    for t in times:
        i = bisect.bisect_right(stamps, t) - 1
        out.append(frames[max(i, 0)])
    return out


# --------------------------------------------------------------------------- resizing


def _check_mode(mode: str) -> str:
    if mode not in FIT_MODES:
        raise InputError(f"resize mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    return mode


def to_video(
    frames: Sequence[np.ndarray],
    width: int,
    height: int,
    mode: str = "fill",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """RGBA frames [H, W, 4] uint8 (same size) -> (rgb [1, 3, T, height, width] in [-1, 1],
    alpha [1, 1, T, height, width] in 0..1), float32 on `device`.

    fit: whole picture inside, black bars (alpha 1 there: free to generate); fill: cover
    and centre-crop; stretch: ignore the aspect ratio. Bilinear with antialiasing."""
    _check_mode(mode)
    x = torch.from_numpy(np.stack(frames)).to(device)  # [T, H, W, 4]
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [T, 4, H, W]
    h0, w0 = x.shape[-2:]
    if mode == "stretch":
        size = (height, width)
    else:
        pick = max if mode == "fill" else min
        s = pick(width / w0, height / h0)
        size = (max(1, round(h0 * s)), max(1, round(w0 * s)))
        if mode == "fill":
            size = (max(size[0], height), max(size[1], width))
        else:
            size = (min(size[0], height), min(size[1], width))
    if size != (h0, w0):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    if mode == "fill":
        y0, x0 = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, y0 : y0 + height, x0 : x0 + width]
    elif mode == "fit" and size != (height, width):
        out = x.new_zeros(x.shape[0], 4, height, width)
        out[:, 3] = 1.0
        y0, x0 = (height - size[0]) // 2, (width - size[1]) // 2
        out[:, :, y0 : y0 + size[0], x0 : x0 + size[1]] = x
        x = out
    x = x.permute(1, 0, 2, 3)[None]  # [1, 4, T, H, W]
    return x[:, :3] * 2.0 - 1.0, x[:, 3:]


def now() -> float:
    return time.time()
