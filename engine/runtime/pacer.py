"""Turns bursts of frames (one block = 9 or 12 frames at once) into a steady stream.

Generation delivers a whole block at a time; showing its frames as fast as they come
would look like stutter then freeze. The pacer presents them at the measured generation
rate instead (an EMA of frames per second from block arrival times), or at a fixed rate.

Steady pacing of bursts costs up to one block of latency: the frames of block k are
shown while block k+1 is being generated. A small controller keeps about
``margin_frames`` frames still queued when the next block lands, so ordinary arrival
jitter is absorbed rather than shown; when a block is really late the last frame is held
(nothing is published, so every sink keeps showing it) and presentation restarts at the
next arrival. More than ``max_blocks`` queued blocks means the consumer side is too slow
(a fixed rate below the generation rate): the oldest frames are dropped, latest wins.

The pacer is a plain state machine with injected clocks, driven by the frame path's
publisher thread, so its schedule can be tested deterministically.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.runtime.sinks import FrameMeta

__all__ = ["Pacer", "Presented"]


@dataclass(frozen=True)
class Presented:
    """A frame due now: frame ``frame`` of the block whose payload is ``payload``."""

    payload: Any
    frame: int
    meta: FrameMeta
    due: float  # the scheduled (monotonic) time it was due


@dataclass
class _Block:
    index: int
    nframes: int
    payload: Any
    next_frame: int = 0


class Pacer:
    """Schedules presentation of pushed blocks.

    ``fps``: None measures the generation rate; a number > 0 fixes the rate; ``math.inf``
    presents frames as soon as they arrive (no pacing). ``on_release(payload)`` is called
    when the pacer is done with a block (all its frames presented or dropped), so the
    caller can reuse its buffer.
    """

    def __init__(
        self,
        fps: float | None = None,
        *,
        initial_fps: float = 16.0,
        smoothing: float = 0.2,
        margin_frames: float = 1.5,
        gain: float = 0.3,
        max_blocks: int = 2,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        on_release: Callable[[Any], None] | None = None,
    ):
        if fps is not None and not (fps > 0):
            raise ValueError(f"fps must be > 0 (or None to follow generation), got {fps!r}")
        if not initial_fps > 0:
            raise ValueError(f"initial_fps must be > 0, got {initial_fps!r}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks!r}")
        self.fixed_fps = fps
        self.smoothing = smoothing
        self.margin = margin_frames
        self.gain = gain
        self.max_blocks = max_blocks
        self.clock = clock
        self.on_release = on_release
        self._wall_offset = wallclock() - clock()
        self.measured_fps: float | None = None
        self._rate = fps if fps is not None else initial_fps
        self._queue: deque[_Block] = deque()
        self._last_arrival: float | None = None
        self._next_due: float | None = None
        self.presented = 0  # frames presented since start (FrameMeta.index of the next + 0)
        self.dropped = 0  # frames never presented (consumer side too slow)
        self.holds = 0  # times generation was late: a frame was due, none queued
        self._backlog_at_arrival = margin_frames

    # -- rate --------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Frames per second presented right now (including the backlog correction)."""
        if self.fixed_fps is not None:
            return self.fixed_fps
        return self._rate * self._correction()

    def _correction(self) -> float:
        # Keep about `margin` frames queued at arrival: more -> a bit faster, fewer -> slower.
        n = self._queue[-1].nframes if self._queue else 12
        err = self._backlog_at_arrival - self.margin
        return min(1.25, max(0.8, 1.0 + self.gain * err / max(n, 1)))

    def _measure(self, nframes: int, t: float) -> None:
        last, self._last_arrival = self._last_arrival, t
        if last is None or self.fixed_fps is not None:
            return
        dt = t - last
        if dt <= 0:
            return
        fps = nframes / dt
        expected = nframes / self._rate
        if self.measured_fps is not None and dt > max(1.0, 4 * expected):
            return  # a pause (stream stopped, reloading), not a rate: don't learn from it
        if self.measured_fps is None:
            self.measured_fps = fps
        else:
            self.measured_fps += self.smoothing * (fps - self.measured_fps)
        self._rate = self.measured_fps

    # -- blocks in ---------------------------------------------------------------------------
    def backlog(self) -> int:
        """Frames queued and not yet presented."""
        return sum(b.nframes - b.next_frame for b in self._queue)

    def push(self, block: int, nframes: int, payload: Any = None, arrival: float | None = None):
        """A block of ``nframes`` frames arrived (at ``arrival``, default now)."""
        if nframes < 1:
            raise ValueError(f"a block needs at least one frame, got {nframes}")
        t = self.clock() if arrival is None else arrival
        self._backlog_at_arrival = float(self.backlog())
        self._measure(nframes, t)
        if not self._queue:
            # Late (or first) block: start now, don't catch up on the missed schedule.
            if self._next_due is not None and self._next_due < t:
                self.holds += 1  # a frame was due and there was none: the last one held
            if self._next_due is None or self._next_due < t:
                self._next_due = t
        self._queue.append(_Block(block, nframes, payload))
        while len(self._queue) > self.max_blocks:
            old = self._queue.popleft()
            self.dropped += old.nframes - old.next_frame
            self._release(old)

    def _release(self, b: _Block) -> None:
        if self.on_release is not None and b.payload is not None:
            self.on_release(b.payload)

    def clear(self) -> None:
        """Forget queued frames (stream reset); they are released, not presented."""
        while self._queue:
            self._release(self._queue.popleft())
        self._last_arrival = None

    # -- frames out --------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """Monotonic time the next frame is due, or None when holding (nothing queued)."""
        return self._next_due if self._queue else None

    def pop_due(self, now: float | None = None) -> Presented | None:
        """The frame due at ``now``, if any; advances the schedule."""
        now = self.clock() if now is None else now
        due = self._next_due
        if not self._queue or due is None or now < due:
            return None
        b = self._queue[0]
        frame = b.next_frame
        b.next_frame += 1
        meta = FrameMeta(block=b.index, index=self.presented, timestamp=now + self._wall_offset)
        self.presented += 1
        if b.next_frame >= b.nframes:
            self._queue.popleft()
            self._release(b)
        rate = self.rate
        interval = 0.0 if math.isinf(rate) else 1.0 / rate
        # Keep the grid (no drift from wake-up latency) unless we fell a whole frame behind.
        nxt = due + interval
        self._next_due = nxt if nxt > now - interval else now
        return Presented(b.payload, frame, meta, due)
