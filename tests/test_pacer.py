"""Pacer: bursts of frames in, a steady stream out. Mostly on a simulated clock (the
schedule is deterministic), plus one real-time run through the frame path."""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest

from engine.runtime.frame_path import FramePath
from engine.runtime.pacer import Pacer


class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def arrivals(n, fps=16.0, jitter=0.05, seed=0, late=None, first=1.0):
    """Block arrival times of a generator making 12 frames per block (9 in the first)."""
    rng = random.Random(seed)
    out, t = [], first
    for k in range(n):
        frames = 9 if k == 0 else 12
        t += frames / fps + rng.uniform(-jitter, jitter)
        t += (late or {}).get(k, 0.0)
        out.append((t, k, frames))
    return out


def simulate(pacer: Pacer, clock: SimClock, arrs, until=None):
    """Drive the pacer as the publisher thread would; returns presented (time, block, frame)."""
    shown, i = [], 0
    while True:
        due = pacer.next_due()
        nxt = arrs[i][0] if i < len(arrs) else None
        if nxt is not None and (due is None or nxt <= due):
            clock.t = nxt
            pacer.push(arrs[i][1], arrs[i][2], payload=arrs[i][1], arrival=nxt)
            i += 1
        elif due is not None and (until is None or due < until):
            clock.t = due
            p = pacer.pop_due()
            shown.append((clock.t, p.meta.block, p.frame, p.meta))
        else:
            return shown


def test_bursty_arrivals_are_presented_steadily():
    clock = SimClock()
    pacer = Pacer(clock=clock, wallclock=lambda: 1000.0)
    shown = simulate(pacer, clock, arrivals(40, fps=16.0, jitter=0.05))
    # every frame once, in order
    assert [(b, f) for _, b, f, _ in shown] == [(0, f) for f in range(9)] + [
        (b, f) for b in range(1, 40) for f in range(12)
    ]
    t = np.array([s[0] for s in shown])
    d = np.diff(t)[12 * 5 :]  # after a few blocks of rate learning
    assert abs(d.mean() - 1 / 16) < 0.03 / 16
    assert d.std() < 0.03 * d.mean()  # arrivals jitter by ±50 ms = ±80% of a frame
    assert np.abs(d / d.mean() - 1).max() < 0.1
    assert pacer.holds <= 1 and pacer.dropped == 0  # at most one, at startup
    assert abs(pacer.measured_fps - 16.0) < 0.5
    # meta: block, frame counter, wall-clock timestamp of presentation
    metas = [m for *_, m in shown]
    assert [m.index for m in metas] == list(range(len(shown)))
    assert all(
        m.timestamp == pytest.approx(1000.0 + s[0]) for m, s in zip(metas, shown, strict=True)
    )


def test_late_block_holds_the_last_frame_then_resumes():
    clock = SimClock()
    pacer = Pacer(clock=clock)
    arrs = arrivals(20, fps=16.0, jitter=0.0, late={10: 0.6})
    shown = simulate(pacer, clock, arrs)
    i = next(k for k, s in enumerate(shown) if s[1] == 10)
    before, after = shown[i - 1], shown[i]
    assert (before[1], before[2]) == (9, 11)  # the last frame before the gap...
    arrival10 = arrs[10][0]
    assert after[0] == pytest.approx(arrival10)  # ...is held until block 10 lands
    assert after[2] == 0  # and nothing of block 10 is skipped
    on_time = Pacer(clock=SimClock())
    simulate(on_time, on_time.clock, arrivals(20, fps=16.0, jitter=0.0))
    assert pacer.holds == on_time.holds + 1 and pacer.dropped == 0
    d = np.diff([s[0] for s in shown[i + 24 :]])  # steady again afterwards
    assert np.abs(d / np.median(d) - 1).max() < 0.1


def test_fixed_rate_and_slow_consumer_drops_oldest():
    clock = SimClock()
    pacer = Pacer(8.0, clock=clock)  # presenting slower than 16 fps generation
    shown = simulate(pacer, clock, arrivals(30, fps=16.0, jitter=0.0))
    d = np.diff([s[0] for s in shown])
    assert np.allclose(d[d > 0], 1 / 8)  # exactly the fixed rate
    assert pacer.dropped > 0
    assert pacer.backlog() <= 2 * 12  # bounded: at most max_blocks queued
    blocks = [s[1] for s in shown]
    assert blocks == sorted(blocks) and blocks[-1] == 29  # latest wins, in order


def test_rate_follows_generation_speed_change():
    clock = SimClock()
    pacer = Pacer(clock=clock)
    a = arrivals(20, fps=12.0, jitter=0.0)
    t0 = a[-1][0]
    a += [(t0 + (k + 1) * 12 / 24.0, 20 + k, 12) for k in range(25)]
    shown = simulate(pacer, clock, a)
    assert abs(pacer.measured_fps - 24.0) < 0.5
    d = np.diff([s[0] for s in shown[-60:]])
    assert abs(np.median(d) - 1 / 24) < 0.05 / 24
    # A sudden 2x speed-up may skip a few frames while the EMA catches up, no more.
    assert pacer.dropped <= 6


def test_unpaced_presents_immediately():
    clock = SimClock()
    pacer = Pacer(math.inf, clock=clock)
    clock.t = 5.0
    pacer.push(0, 3, payload="a")
    got = [pacer.pop_due() for _ in range(4)]
    assert [g.frame for g in got[:3]] == [0, 1, 2] and got[3] is None


def test_bad_arguments():
    for kw in ({"fps": 0}, {"fps": -1}, {"initial_fps": 0}, {"smoothing": 0}, {"max_blocks": 0}):
        with pytest.raises(ValueError):
            Pacer(**kw)
    with pytest.raises(ValueError, match="at least one frame"):
        Pacer().push(0, 0)


class _TimeSink:
    name = "times"

    def __init__(self):
        self.times, self.frames = [], []

    def open(self, w, h):
        pass

    def send(self, rgba, meta):
        self.times.append(time.perf_counter())
        self.frames.append((meta.block, int(rgba[0, 0, 0])))

    def close(self):
        pass


def test_real_time_jitter_is_bounded():
    """Blocks of 12 frames every 0.3 s (40 fps) from a generation thread: the sink sees
    frames ~25 ms apart, not bursts."""
    sink = _TimeSink()
    fp = FramePath([sink], Pacer(initial_fps=40.0))

    def generate():
        t = time.perf_counter()
        for k in range(9):
            x = np.zeros((12, 4, 4, 4), np.uint8)
            x[:, 0, 0, 0] = np.arange(12)
            fp.submit_block(x, k)
            t += 0.3
            time.sleep(max(0.0, t - time.perf_counter()))

    g = threading.Thread(target=generate)
    g.start()
    g.join()
    time.sleep(0.35)
    fp.close()
    assert sink.frames[:12] == [(0, f) for f in range(12)]
    d = np.diff(sink.times[36:])  # after three blocks of rate learning
    assert len(d) >= 60
    med = np.median(d)
    assert abs(med - 0.025) < 0.003
    dev = np.abs(d - med)
    assert np.percentile(dev, 90) < 0.004  # a burst would show 0 ms and 300 ms gaps
    assert dev.max() < 0.02
