"""From the generation thread's uint8 RGBA blocks to the frame sinks, without ever
making generation wait.

``submit_block`` is called by the generation thread with a block of frames already
packed on the GPU (``engine/stream/rgba.py: to_rgba8``). It only *enqueues* a device to
host copy into one of a few pinned host buffers, on a side CUDA stream that first waits
for the generation stream, records an event, and returns. A publisher thread waits on
that event (never the generation thread), feeds the block to the :class:`Pacer` and hands
each frame, when due, to every sink.

Interpolation (``interpolator`` given, ``configure(fps=30, interpolate=True)``): the pacer
becomes an :class:`OutputPacer` presenting at a fixed rate, and frames between two
generated ones are computed by the interpolator on the publisher thread (on a side CUDA
stream; the GPU block stays referenced until the pacer releases it). They are computed
ahead: while it waits for the next tick, the publisher asks the pacer which frames the
coming ticks will show (:meth:`OutputPacer.plan`) and computes a pair's worth in one
network call, so a tick usually only copies a finished frame. Every sink gets the
interpolated stream. Rate changes take effect on the publisher thread between
frames; a bad one raises in the caller and changes nothing.

Bounded everything: a fixed pool of host buffers (one being filled, one pending, one in
transit, up to ``max_blocks`` held by the pacer); one pending block, where a newer block
replaces an older one the publisher has not picked up (latest frame wins). A slow or dead
sink can stall only the publisher thread, so ``submit_block`` cost stays bounded.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.runtime.pacer import SPEEDS, OutputPacer, Pacer, Presented
from engine.runtime.sinks import FrameSink

log = logging.getLogger(__name__)

__all__ = ["FramePath", "MAX_OUTPUT_FPS", "MIN_OUTPUT_FPS", "check_output_fps"]

SWITCH_INTERVAL_S = 0.0005  # see FramePath: the GIL hand-over delay a due frame may wait
MIN_OUTPUT_FPS = 1.0
MAX_OUTPUT_FPS = 240.0


def check_output_fps(fps: Any) -> float | None:
    """An output rate: None or 0 = follow generation, else MIN..MAX frames per second.
    ValueError names what is wrong (never clamped: a typo must not become 240 fps)."""
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)):
        raise ValueError(f"output fps must be a number, got {type(fps).__name__}")
    f = float(fps)
    if f == 0:
        return None
    if not (MIN_OUTPUT_FPS <= f <= MAX_OUTPUT_FPS):
        raise ValueError(
            f"output fps {fps!r} out of range: 0 (follow generation) or"
            f" {MIN_OUTPUT_FPS:g} to {MAX_OUTPUT_FPS:g}"
        )
    return f


@dataclass(eq=False)
class _HostBlock:
    """One host buffer of up to ``capacity`` frames and what is in it now."""

    host: Any  # torch.Tensor [capacity, H, W, 4] uint8 (pinned when fed from CUDA)
    array: np.ndarray  # numpy view of ``host``
    generation: int  # buffer-pool generation (a new one per frame size)
    event: Any = None  # torch.cuda.Event marking the copy complete
    dev: Any = None  # the CUDA block itself, kept while interpolation may read it
    block: int = -1
    nframes: int = 0
    arrival: float = 0.0
    serial: int = 0  # one number per submitted block, never reused: names its frames


@dataclass
class FramePathStats:
    submitted: int = 0  # blocks given to submit_block
    dropped_blocks: int = 0  # blocks replaced before the publisher picked them up
    published: int = 0  # frames handed to the sinks
    interpolated: int = 0  # of which computed between two generated frames
    interp_errors: int = 0
    interp_ahead: int = 0  # interpolated frames that were computed before their tick
    interp_calls: int = 0  # network calls (one per pair of generated frames, usually)
    # when frames went out against when they were due (monotonic clock), in ms
    late_ms_max: float = 0.0
    late_ms_sum: float = 0.0
    late_over_2ms: int = 0
    sink_errors: dict[str, int] = field(default_factory=dict)


class FramePath:
    """``FramePath(sinks, pacer=Pacer())``; ``submit_block(rgba, block_index)``; ``close()``.

    ``buffers`` host buffers are allocated on the first block and again when the frame
    size grows or changes (pinned allocation is slow, so only then). Sinks are opened on
    the publisher thread with the first frame's size, and re-opened when it changes.
    """

    def __init__(
        self,
        sinks: Sequence[FrameSink],
        pacer: Pacer | OutputPacer | None = None,
        *,
        buffers: int | None = None,
        interpolator: Any = None,
        switch_interval: float | None = SWITCH_INTERVAL_S,
    ):
        self.sinks = list(sinks)
        self._switch = False  # whether this frame path holds a short switch interval
        if switch_interval is not None:
            # The publisher sleeps until a frame is due, then needs the GIL, which the
            # generation thread (Python launching kernels) holds for up to the switch
            # interval: 5 ms by default, shown as frame-time jitter. A shorter interval
            # costs nothing while the publisher sleeps (a switch is forced only when a
            # thread waits for the GIL). It is the process's setting: held while a
            # frame path is open, given back when the last one closes.
            _hold_switch_interval(switch_interval)
            self._switch = True
        self.pacer = pacer if pacer is not None else Pacer()
        self.pacer.on_release = self._release
        self.interpolator = interpolator  # engine.runtime.interpolator.Interpolator or None
        # filling + pending + in transit + what the pacer may hold (+ the block an
        # OutputPacer keeps for the current frame)
        self.buffers = buffers if buffers is not None else 4 + self.pacer.max_blocks
        if self.buffers < 3:
            raise ValueError(f"buffers must be >= 3, got {self.buffers}")
        self.stats = FramePathStats()
        self._cond = threading.Condition()
        self._free: list[_HostBlock] = []
        self._allocated = 0
        self._pool_key: tuple | None = None
        self._pool_cap = 0
        self._pool_gen = 0
        self._pending: _HostBlock | None = None
        self._side_stream = None
        self._closed = False
        self._open_size: tuple[int, int] | None = None
        self._dead: set[int] = set()  # sinks that failed to open
        self._reconfigure: Pacer | OutputPacer | None = None  # applied by the publisher
        self._serial = 0
        self.output: dict[str, Any] = {
            "fps": self.pacer.fixed_fps if isinstance(self.pacer, Pacer) else self.pacer.fps,
            "interpolate": isinstance(self.pacer, OutputPacer) and self.pacer.interpolate,
            "speed": getattr(self.pacer, "speed", "fit"),
        }
        self._thread = threading.Thread(target=self._run, name="frame-publisher", daemon=True)
        self._thread.start()

    # -- generation thread ---------------------------------------------------------------
    def submit_block(self, rgba, block_index: int) -> bool:
        """Hand over a uint8 [T, H, W, 4] block (torch, CPU or CUDA, or numpy). Returns at
        once for CUDA input (the copy is only enqueued); CPU input is copied here. False
        when the block was dropped (no buffer free: only if the pool is misconfigured)."""
        if self._closed:
            raise RuntimeError("FramePath is closed")
        shape, is_cuda = _check_block(rgba)
        t, h, w, _ = shape
        arrival = self.pacer.clock()
        with self._cond:
            self.stats.submitted += 1
            hb = self._take_buffer(t, h, w, is_cuda)
        if hb is None:
            with self._cond:
                self.stats.dropped_blocks += 1
            return False
        if is_cuda:
            import torch

            stream = self._side_stream
            if stream is None or stream.device != rgba.device:
                stream = self._side_stream = torch.cuda.Stream(device=rgba.device)
            # The copy must see the finished RGBA pack: wait for the producing stream
            # (on the GPU, not the host), and keep rgba's memory alive until the copy ran.
            stream.wait_stream(torch.cuda.current_stream(rgba.device))
            with torch.cuda.stream(stream):
                hb.host[:t].copy_(rgba, non_blocking=True)
                if hb.event is None:
                    hb.event = torch.cuda.Event(blocking=True)  # publisher sleeps, not spins
                hb.event.record(stream)
            rgba.record_stream(stream)
            if self.interpolator is not None and self.output["interpolate"]:
                # interpolation reads the block on the GPU: keep it until released
                hb.dev = rgba
                if self.interpolator.stream is not None:
                    rgba.record_stream(self.interpolator.stream)
        else:
            # numpy, not torch's copy_: torch's CPU thread pool can cost tens of ms here
            # when cores are contended, numpy's memcpy doesn't.
            np.copyto(hb.array[:t], rgba if isinstance(rgba, np.ndarray) else rgba.numpy())
        hb.block, hb.nframes, hb.arrival = int(block_index), t, arrival
        self._serial += 1
        hb.serial = self._serial
        with self._cond:
            if self._pending is not None:
                # The publisher has not even picked up the previous block: latest wins.
                self.stats.dropped_blocks += 1
                self._recycle(self._pending)
            self._pending = hb
            self._cond.notify()
        return True

    def _take_buffer(self, t: int, h: int, w: int, pinned: bool) -> _HostBlock | None:
        key = (h, w, pinned)
        if key != self._pool_key or t > self._pool_cap:
            # New size (or a longer block): a new pool. Buffers of the old one still in
            # use are dropped when released. 12 frames is a full block after the first.
            self._pool_cap = max(t, 12) if key != self._pool_key else t
            self._pool_key = key
            self._pool_gen += 1
            self._free.clear()
            self._allocated = 0
        if self._free:
            return self._free.pop()
        if self._allocated < self.buffers:
            import torch

            host = torch.empty((self._pool_cap, h, w, 4), dtype=torch.uint8, pin_memory=pinned)
            self._allocated += 1
            return _HostBlock(host, host.numpy(), self._pool_gen)
        if self._pending is not None and self._pending.generation == self._pool_gen:
            # reclaim the block nobody has seen yet
            hb, self._pending = self._pending, None
            self.stats.dropped_blocks += 1
            return hb
        return None

    def _recycle(self, hb: _HostBlock) -> None:
        """Return a buffer to the pool (caller holds the lock)."""
        hb.dev = None
        if hb.generation == self._pool_gen:
            self._free.append(hb)

    def _release(self, hb: _HostBlock) -> None:
        with self._cond:
            self._recycle(hb)

    # -- output rate (any thread) --------------------------------------------------------
    def configure(
        self,
        *,
        fps: float | None = None,
        interpolate: bool | None = None,
        speed: str | None = None,
    ) -> dict[str, Any]:
        """Change the output rate, interpolation or speed (None keeps a setting). Checks
        everything first: ValueError names the problem and nothing changes. The new
        schedule starts on the publisher thread between two frames and takes over the
        queued frames (they are shown at the new rate, not dropped)."""
        out = dict(self.output)
        if fps is not None:
            out["fps"] = check_output_fps(fps)
        if interpolate is not None:
            out["interpolate"] = bool(interpolate)
        if speed is not None:
            if speed not in SPEEDS:
                raise ValueError(f"output speed {speed!r}: use {' or '.join(SPEEDS)}")
            out["speed"] = speed
        if out["interpolate"]:
            if self.interpolator is None:
                raise ValueError(
                    "interpolation needs the RIFE weights (`dreamdeck download --rife`);"
                    " output stays as it is"
                )
            if out["fps"] is None:
                raise ValueError("interpolation needs an output rate: set output/fps (e.g. 30)")
        if out == self.output:
            return out
        old = self.pacer
        if out["fps"] is not None and (out["interpolate"] or out["speed"] == "real"):
            new: Pacer | OutputPacer = OutputPacer(
                out["fps"],
                speed=out["speed"],
                interpolate=out["interpolate"],
                max_blocks=getattr(old, "source", old).max_blocks,
                clock=old.clock,
            )
        else:
            new = Pacer(
                out["fps"], max_blocks=getattr(old, "source", old).max_blocks, clock=old.clock
            )
        with self._cond:
            self.output = out
            self._reconfigure = new
            self._cond.notify()
        return out

    def added_latency_ms(self) -> float:
        """What interpolation adds to the latency now: waiting for the next generated
        frame, plus computing the frame."""
        p = self.pacer
        if not isinstance(p, OutputPacer) or not p.interpolate:
            return 0.0
        ms = self.interpolator.ms if self.interpolator is not None else None
        return p.added_latency() * 1e3 + (ms or 0.0)

    def output_status(self) -> dict[str, Any]:
        p = self.pacer
        return {
            **self.output,
            "interp_ms": None if self.interpolator is None else self.interpolator.ms,
            "holds": p.holds,
            "presented": p.presented,
            "falling_behind": isinstance(p, OutputPacer) and p.falling_behind(),
            "added_latency_ms": self.added_latency_ms(),
        }

    # -- publisher thread ----------------------------------------------------------------
    def _swap_pacer(self) -> None:
        with self._cond:
            new, self._reconfigure = self._reconfigure, None
        if new is None:
            return
        old = self.pacer
        new.on_release = self._release
        self.pacer = new
        # the queued frames carry on at the new schedule (no hold of a block's length)
        items, rate = old.handover()
        if isinstance(new, Pacer) and isinstance(old, OutputPacer) and "shown" in rate:
            # a plain pacer presents every frame it gets: skip the one on screen
            items = [(b, n, pay, f + 1 if i == 0 else f) for i, (b, n, pay, f) in enumerate(items)]
        new.take_over(items, rate)
        old.clear()  # releases anything left (nothing, normally)
        fps = self.output["fps"]
        log.info(
            "output: %s%s%s",
            "following the generation rate" if fps is None else f"{fps:g} fps",
            ", interpolated" if self.output["interpolate"] else "",
            f", speed {self.output['speed']}" if isinstance(new, OutputPacer) else "",
        )

    def _run(self) -> None:
        while True:
            if self._reconfigure is not None:
                self._swap_pacer()
            clock = self.pacer.clock
            with self._cond:
                if self._closed:
                    return
                if self._reconfigure is not None:
                    continue
                hb, self._pending = self._pending, None
                wait = 0.0
                if hb is None:
                    due = self.pacer.next_due()
                    wait = 0.1 if due is None else due - clock()
            if hb is not None:
                if hb.event is not None:
                    hb.event.synchronize()
                self.pacer.push(hb.block, hb.nframes, payload=hb, arrival=hb.arrival)
                continue
            if wait > 0.003:
                # Time to spare before the next tick: compute a coming pair's frames
                # ahead (so the tick itself only copies), one pair per pass.
                if self._prefetch(wait - 0.002):
                    continue
                with self._cond:
                    if self._pending is None and self._reconfigure is None and not self._closed:
                        # Coarse wait (wakes early on a new block), then a fine sleep:
                        # condition timeouts are only ~ms precise on some platforms.
                        self._cond.wait(min(wait - 0.002, 0.1))
                continue
            if wait > 0:
                time.sleep(wait)
            p = self.pacer.pop_due()
            if p is not None:
                self._publish(p)

    # -- interpolation ahead of time -----------------------------------------------------
    def _pair(self, p: Presented) -> tuple[Any, Any, tuple]:
        """The two generated frames of an interpolated frame and the key naming them."""
        a_blk, b_blk = p.payload, p.next_payload
        a = a_blk.dev[p.frame] if a_blk.dev is not None else a_blk.host[p.frame]
        b = b_blk.dev[p.next_frame] if b_blk.dev is not None else b_blk.host[p.next_frame]
        return a, b, ((a_blk.serial, p.frame), (b_blk.serial, p.next_frame))

    def _plan(self) -> list[Presented]:
        p = self.pacer
        if not isinstance(p, OutputPacer) or not p.interpolate or self.interpolator is None:
            return []
        # about two generated frames' worth of ticks: the current pair and the next
        per_pair = p.fps / max(p.source_rate, 1e-3)
        return p.plan(max_ticks=int(min(32, max(2, 2 * per_pair + 2))))

    def _batch(self, first: Presented, plan: list[Presented], budget_s: float) -> None:
        """One network call for ``first`` and the following planned times of its pair,
        as many as the interpolator's own timing says fit in ``budget_s`` (at least
        ``first``): a whole pair on a GPU, where a batch costs little more than one
        frame; one or two frames at a time where frames are slow (the CPU), so a tick
        is never held up by frames whose ticks would pass meanwhile."""
        a, b, key = self._pair(first)
        ts = [first.t]
        for q in plan:
            if q.payload is first.payload and q.frame == first.frame:
                if q.next_payload is first.next_payload and q.next_frame == first.next_frame:
                    if q.t not in ts and not self.interpolator.has(key, q.t):
                        ts.append(q.t)
        while len(ts) > 1:
            est = self.interpolator.estimate_ms(len(ts))
            if est is None or est / 1e3 <= budget_s:
                break
            ts.pop()
        self.interpolator.batch(a, b, ts, key)
        self.stats.interp_calls += 1

    def _prefetch(self, budget_s: float) -> bool:
        """Compute the next frames not computed yet (of one pair), as many as fit in
        ``budget_s``. True when it did (the caller re-checks the time)."""
        plan = self._plan()
        if not plan:
            return False
        for i, q in enumerate(plan):
            a, b, key = self._pair(q)
            if self.interpolator.has(key, q.t):
                continue
            last = plan[-1]
            if i > 0 and (last.payload, last.frame) == (q.payload, q.frame):
                return False  # the plan's last pair may be cut short: wait for more ticks
            est = self.interpolator.estimate_ms(1)
            if est is not None and est / 1e3 > budget_s:
                return False
            try:
                self._batch(q, plan, budget_s)
            except Exception:
                self._interp_failed()
                return False
            return True
        return False

    def _interp_failed(self) -> None:
        self.stats.interp_errors += 1
        n = self.stats.interp_errors
        if n in (1, 10, 100) or n % 1000 == 0:
            log.exception("interpolation failed (%d times); showing the generated frame", n)

    def _frame_of(self, p: Presented) -> np.ndarray:
        """The pixels of presented frame ``p``: a generated frame, or one interpolated
        between two: computed ahead, else now together with the rest of its pair's
        planned times (on failure: the earlier frame, counted and logged)."""
        frame = p.payload.array[p.frame]
        if p.t <= 0.0 or p.next_payload is None or self.interpolator is None:
            return frame
        try:
            a, b, key = self._pair(p)
            if self.interpolator.has(key, p.t):
                self.stats.interp_ahead += 1
            else:  # not computed ahead: this frame now, and what fits in half a tick
                self._batch(p, self._plan(), 0.5 / max(self.pacer.rate, 1.0))
            out = self.interpolator.frame(a, b, p.t, key)
        except Exception:
            self._interp_failed()
            return frame
        self.stats.interpolated += 1
        return out

    def _publish(self, p: Presented) -> None:
        frame = self._frame_of(p)
        # stamped when it goes out (after any interpolation): what a reader sees
        meta = dataclasses.replace(p.meta, timestamp=time.time())
        late = (self.pacer.clock() - p.due) * 1e3
        st = self.stats
        st.late_ms_sum += late
        st.late_ms_max = max(st.late_ms_max, late)
        st.late_over_2ms += late > 2.0
        h, w = frame.shape[:2]
        if self._open_size != (w, h):
            self._open_size = (w, h)
            for i, sink in enumerate(self.sinks):
                if i in self._dead:
                    continue
                try:
                    sink.open(w, h)
                except Exception:
                    self._dead.add(i)
                    log.exception("output %s failed to open at %dx%d; disabled", sink.name, w, h)
        for i, sink in enumerate(self.sinks):
            if i in self._dead:
                continue
            try:
                sink.send(frame, meta)
            except Exception:
                n = self.stats.sink_errors.get(sink.name, 0) + 1
                self.stats.sink_errors[sink.name] = n
                if n in (1, 10, 100) or n % 1000 == 0:
                    log.exception("output %s failed to send a frame (%d errors)", sink.name, n)
        self.stats.published += 1

    # -- life cycle ----------------------------------------------------------------------
    def close(self, timeout: float = 2.0) -> None:
        """Stop publishing and close the sinks. Frames still queued are not presented."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("frame publisher did not stop within %.1fs (a sink is stuck)", timeout)
        if self._switch:
            self._switch = False
            _release_switch_interval()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("output %s failed to close", sink.name)

    def __enter__(self) -> FramePath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_switch_lock = threading.Lock()
_switch_holders = 0
_switch_before: float | None = None


def _hold_switch_interval(seconds: float) -> None:
    global _switch_holders, _switch_before
    with _switch_lock:
        if _switch_holders == 0:
            _switch_before = sys.getswitchinterval()
        _switch_holders += 1
        if sys.getswitchinterval() > seconds:
            sys.setswitchinterval(seconds)


def _release_switch_interval() -> None:
    global _switch_holders, _switch_before
    with _switch_lock:
        _switch_holders = max(0, _switch_holders - 1)
        if _switch_holders == 0 and _switch_before is not None:
            sys.setswitchinterval(_switch_before)
            _switch_before = None


def _check_block(rgba) -> tuple[tuple[int, int, int, int], bool]:
    """Validate a block; returns (shape, is_cuda). Raises ValueError naming the problem."""
    if isinstance(rgba, np.ndarray):
        dtype_ok, shape, is_cuda = rgba.dtype == np.uint8, tuple(rgba.shape), False
    else:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        if torch is None or not isinstance(rgba, torch.Tensor):
            raise ValueError(f"frames must be a torch tensor or numpy array, got {type(rgba)}")
        dtype_ok, shape, is_cuda = rgba.dtype == torch.uint8, tuple(rgba.shape), rgba.is_cuda
    if not dtype_ok:
        raise ValueError(f"frames must be uint8 RGBA (see to_rgba8), got dtype {rgba.dtype}")
    if len(shape) != 4 or shape[3] != 4 or min(shape) < 1:
        raise ValueError(f"frames must be [T, H, W, 4] with T, H, W >= 1, got shape {shape}")
    return shape, is_cuda  # type: ignore[return-value]
