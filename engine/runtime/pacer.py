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

__all__ = ["Pacer", "Presented", "OutputPacer", "SPEEDS", "NATIVE_FPS"]

NATIVE_FPS = 16.0  # the video's own rate (Wan2.1): "real" speed plays its motion at this rate
SPEEDS = ("fit", "real")


@dataclass(frozen=True)
class Presented:
    """A frame due now: frame ``frame`` of the block whose payload is ``payload``.

    From an interpolating :class:`OutputPacer`, ``t`` > 0 asks for the frame a fraction
    ``t`` of the way from that frame to frame ``next_frame`` of ``next_payload``."""

    payload: Any
    frame: int
    meta: FrameMeta
    due: float  # the scheduled (monotonic) time it was due
    next_payload: Any = None
    next_frame: int = -1
    t: float = 0.0


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
        if dt < expected / 4:
            return  # a burst (blocks that queued up behind a slow reader), not a rate
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

    def handover(self) -> tuple[list[tuple[int, int, Any, int]], dict[str, Any]]:
        """Give up the queued frames without releasing them, for a new pacer to take
        over (:meth:`take_over`): [(block, nframes, payload, first frame not shown)],
        oldest first, and what was learnt about the generation rate."""
        items = [(b.index, b.nframes, b.payload, b.next_frame) for b in self._queue]
        self._queue.clear()
        rate = {
            "measured_fps": self.measured_fps,
            "rate": self._rate,
            "last_arrival": self._last_arrival,
            "backlog_at_arrival": self._backlog_at_arrival,
        }
        return items, rate

    def take_over(
        self,
        items: list[tuple[int, int, Any, int]],
        rate: dict[str, Any],
        limit: int | None = None,
    ) -> None:
        """Continue another pacer's queue (an output setting changed live): its frames are
        presented from now on at this pacer's schedule instead of being dropped. At most
        ``limit`` (default ``max_blocks``) blocks are kept, the newest."""
        if self.fixed_fps is None and rate.get("measured_fps") is not None:
            self.measured_fps = rate["measured_fps"]
            self._rate = rate["rate"]
        self._last_arrival = rate.get("last_arrival")
        self._backlog_at_arrival = rate.get("backlog_at_arrival", self.margin)
        for index, nframes, payload, start in items:
            if start < nframes:
                self._queue.append(_Block(index, nframes, payload, start))
            else:
                self._release(_Block(index, nframes, payload))
        while len(self._queue) > (self.max_blocks if limit is None else limit):
            old = self._queue.popleft()
            self.dropped += old.nframes - old.next_frame
            self._release(old)
        if self._queue:
            self._next_due = self.clock()

    # -- frames out --------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """Monotonic time the next frame is due, or None when holding (nothing queued)."""
        return self._next_due if self._queue else None

    def peek(self) -> tuple[Any, int, int] | None:
        """(payload, frame, block) of the next frame to be presented, or None."""
        if not self._queue:
            return None
        b = self._queue[0]
        return b.payload, b.next_frame, b.index

    def upcoming(self, n: int) -> list[tuple[Any, int, int, float]]:
        """The next ``n`` queued frames as (payload, frame, block, due), due times as
        :meth:`pop_due` will set them if nothing is pushed meanwhile (the rate changes
        only on a push) and presentation keeps up. Changes nothing."""
        out: list[tuple[Any, int, int, float]] = []
        due = self._next_due
        if due is None:
            return out
        rate = self.rate
        interval = 0.0 if math.isinf(rate) else 1.0 / rate
        for b in self._queue:
            for f in range(b.next_frame, b.nframes):
                if len(out) >= n:
                    return out
                out.append((b.payload, f, b.index, due))
                due = due + interval
        return out

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


class OutputPacer:
    """Presents frames at a fixed output rate, each one interpolated at its exact time.

    The generated frames get presentation times from an inner :class:`Pacer` (the same
    schedule as without interpolation: following the generation rate in ``fit`` speed, or
    the video's own 16 fps in ``real`` speed). The output ticks at ``fps``; a tick at
    time tau shows the frame between the last source frame k due at or before tau and the
    next one, at ``t = (tau - T_k) / (T_k+1 - T_k)``. Frame k+1 is usually already queued
    (the inner pacer keeps a margin), so the added latency is at most one generated frame.

    Starving (frame k+1 not there yet) holds: nothing is published, every sink keeps the
    last frame, and motion resumes when the next block lands. It never goes backwards in
    time and never blocks the caller. With ``interpolate`` False each tick shows the
    nearest source frame, published only when it changes.

    ``on_release(payload)`` is called once the pacer no longer needs a block: the block
    of the current frame stays held after the inner pacer is done with it, because the
    next tick may still interpolate from it.
    """

    def __init__(
        self,
        fps: float,
        *,
        speed: str = "fit",
        interpolate: bool = True,
        native_fps: float = NATIVE_FPS,
        max_blocks: int = 2,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        on_release: Callable[[Any], None] | None = None,
        **source_kwargs: Any,
    ):
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"output fps must be a positive number, got {fps!r}")
        if speed not in SPEEDS:
            raise ValueError(f"speed must be one of {', '.join(SPEEDS)}, got {speed!r}")
        self.fps = float(fps)
        self.speed = speed
        self.interpolate = interpolate
        self.clock = clock
        self.on_release = on_release
        self.max_blocks = max_blocks + 1  # + the block of the current frame, held
        self._wall_offset = wallclock() - clock()
        self.source = Pacer(
            None if speed == "fit" else native_fps,
            max_blocks=max_blocks,
            clock=clock,
            wallclock=wallclock,
            on_release=self._source_released,
            **source_kwargs,
        )
        self._cur: tuple[Any, int, int, float] | None = None  # payload, frame, block, due
        self._held: Any = None  # payload the source released while it is current
        self._last_key: tuple[int, int, float] | None = None  # (block, frame, t) shown last
        self._tick: float | None = None
        self.presented = 0
        self.holds = 0  # ticks with nothing new to show (generation behind)
        self.last_hold: float | None = None  # clock time of the latest hold
        self.late = 0  # ticks skipped because the caller fell a whole tick behind
        self.dropped = 0

    # -- the inner pacer's releases -----------------------------------------------------------
    def _source_released(self, payload: Any) -> None:
        if self._cur is not None and payload is self._cur[0]:
            self._held = payload  # still needed: released when the current frame moves on
        elif self.on_release is not None:
            self.on_release(payload)

    def _set_current(self, cur: tuple[Any, int, int, float]) -> None:
        old, self._cur = self._held, cur
        if old is not None and old is not cur[0]:
            self._held = None
            if self.on_release is not None:
                self.on_release(old)

    # -- the Pacer interface the frame path uses ----------------------------------------------
    @property
    def measured_fps(self) -> float | None:
        return self.source.measured_fps

    @property
    def rate(self) -> float:
        return self.fps

    @property
    def source_rate(self) -> float:
        """Generated frames per second the output is moving through."""
        return self.source.rate

    def backlog(self) -> int:
        return self.source.backlog()

    def push(self, block: int, nframes: int, payload: Any = None, arrival: float | None = None):
        t = self.clock() if arrival is None else arrival
        before = self.source.dropped
        self.source.push(block, nframes, payload, arrival=t)
        self.dropped += self.source.dropped - before
        if self._tick is None:
            self._tick = t

    def handover(self) -> tuple[list[tuple[int, int, Any, int]], dict[str, Any]]:
        """:meth:`Pacer.handover`, the frame shown now included (the first a new
        interpolating pacer needs); the held block goes with it, unreleased."""
        items, rate = self.source.handover()
        cur, self._cur, self._held = self._cur, None, None
        if cur is not None:
            payload, frame, block, _ = cur
            if items and items[0][2] is payload:
                items[0] = (block, items[0][1], payload, frame)
            else:
                items.insert(0, (block, frame + 1, payload, frame))
            rate["shown"] = (block, frame)
        self._tick = None
        return items, rate

    def take_over(self, items: list[tuple[int, int, Any, int]], rate: dict[str, Any]) -> None:
        """:meth:`Pacer.take_over`; the frame already on screen is not shown again."""
        shown = rate.get("shown")
        self.source.take_over(items, rate, limit=self.max_blocks)  # + the block on screen
        if self.source.next_due() is not None:
            self._tick = self.clock()
            if shown is not None:
                self._last_key = (shown[0], shown[1], 0.0)

    def clear(self) -> None:
        self.source.clear()
        held, self._held, self._cur = self._held, None, None
        if held is not None and self.on_release is not None:
            self.on_release(held)
        self._tick = None

    def next_due(self) -> float | None:
        if self._cur is None and self.source.next_due() is None:
            return None
        return self._tick

    def falling_behind(self, window: float = 2.0) -> bool:
        """Held frames (generation slower than the motion shown) in the last ``window`` s."""
        return self.last_hold is not None and self.clock() - self.last_hold <= window

    def added_latency(self) -> float:
        """Seconds interpolation adds: waiting for the next generated frame (one interval)."""
        return 1.0 / self.source.rate if self.interpolate else 0.0

    def plan(self, max_ticks: int = 16) -> list[Presented]:
        """The interpolated frames the next ``max_ticks`` output ticks will ask for, as
        :meth:`pop_due` will return them if no block arrives meanwhile and the caller
        keeps up (same pairs, same ``t``, bit for bit), up to the last tick whose next
        generated frame is already queued. Changes nothing: the frame path computes
        these ahead, a pair at a time, while it waits for the next tick."""
        if not self.interpolate or self._tick is None:
            return []
        src = self.source.upcoming(max_ticks + 2)
        cur = self._cur
        tick = self._tick
        interval = 1.0 / self.fps
        out: list[Presented] = []
        i = 0
        for _ in range(max_ticks):
            while i < len(src) and src[i][3] <= tick:
                cur = src[i]
                i += 1
            if cur is None or i >= len(src):
                break  # the frame after the current one is not there yet
            payload, frame, block, t_k = cur
            npay, nfr, _, t_next = src[i]
            if t_next > t_k:
                t = min(max((tick - t_k) / (t_next - t_k), 0.0), 1.0)
                if 0.0 < t < 1.0:
                    meta = FrameMeta(block=block, index=-1, timestamp=tick + self._wall_offset)
                    out.append(Presented(payload, frame, meta, tick, npay, nfr, t))
            tick = tick + interval
        return out

    def pop_due(self, now: float | None = None) -> Presented | None:
        """The output frame due at ``now``, if any (None: not due yet, or holding)."""
        now = self.clock() if now is None else now
        tau = self._tick
        if tau is None or now < tau or (self._cur is None and self.source.next_due() is None):
            return None
        interval = 1.0 / self.fps
        nxt = tau + interval
        if nxt <= now - interval:
            self.late += int((now - nxt) / interval)
            # a whole tick behind: restart the grid one interval from now (not now: that
            # would publish two frames back to back)
            nxt = now + interval
        self._tick = nxt
        # the source frames due by tau
        while (due := self.source.next_due()) is not None and due <= tau:
            p = self.source.pop_due(now=tau)
            if p is None:
                break
            self._set_current((p.payload, p.frame, p.meta.block, p.due))
        if self._cur is None:
            return None
        payload, frame, block, t_k = self._cur
        nxt_frame = self.source.peek()
        t_next = self.source.next_due()
        t = 0.0
        if nxt_frame is not None and t_next is not None and t_next > t_k:
            t = min(max((tau - t_k) / (t_next - t_k), 0.0), 1.0)
        elif self._last_key is not None and self._last_key[:2] == (block, frame):
            self.holds += 1  # starving: the next frame is not there, keep the last one shown
            self.last_hold = now
            return None
        npay, nfr = (nxt_frame[0], nxt_frame[1]) if nxt_frame is not None else (None, -1)
        if not self.interpolate:
            if t >= 0.5 and nxt_frame is not None:
                payload, frame, block = nxt_frame[0], nxt_frame[1], nxt_frame[2]
            t, npay, nfr = 0.0, None, -1
        key = (block, frame, t)
        if key == self._last_key:
            self.holds += 1
            return None
        self._last_key = key
        meta = FrameMeta(block=block, index=self.presented, timestamp=now + self._wall_offset)
        self.presented += 1
        return Presented(payload, frame, meta, tau, npay, nfr, t)
