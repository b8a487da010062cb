"""OutputPacer: bursts of generated frames in, a fixed output rate out, every output frame
at its exact time between two generated frames. On a simulated clock (deterministic)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.runtime.pacer import OutputPacer


class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def arrivals(n, fps, jitter=0.03, seed=0, gap=None, first=1.0):
    """(time, block, frames) of a generator making `fps` frames a second in blocks of 12
    (9 in the first); `gap` = {block: extra seconds before it}."""
    rng = random.Random(seed)
    out, t = [], first
    for k in range(n):
        frames = 9 if k == 0 else 12
        t += frames / fps + rng.uniform(-jitter, jitter) + (gap or {}).get(k, 0.0)
        out.append((t, k, frames))
    return out


def drive(pacer, clock, arrs, until):
    """What the publisher thread does: push blocks when they land, pop output ticks when
    due. Returns [(time, Presented)] and counts how often pop_due had nothing new."""
    shown, i, nothing = [], 0, 0
    while True:
        due = pacer.next_due()
        nxt = arrs[i][0] if i < len(arrs) else None
        if nxt is not None and (due is None or nxt <= due):
            clock.t = nxt
            pacer.push(arrs[i][1], arrs[i][2], payload=("block", arrs[i][1]), arrival=nxt)
            i += 1
        elif due is not None and due < until:
            clock.t = due
            p = pacer.pop_due()
            if p is None:
                nothing += 1
            else:
                shown.append((clock.t, p))
        else:
            return shown, nothing


def frame_base(arrs):
    """Global index of frame 0 of each block."""
    base, n = {}, 0
    for _, k, frames in arrs:
        base[k] = n
        n += frames
    return base


def positions(shown, base):
    """Each output frame's position in generated frames (frame index + t)."""
    out = []
    for _, p in shown:
        s = base[p.meta.block] + p.frame
        if p.t > 0:
            nb = p.next_payload[1]
            s_next = base[nb] + p.next_frame
            assert s_next == s + 1, "interpolates between consecutive generated frames"
        out.append(s + p.t)
    return np.array(out)


@pytest.mark.parametrize("out_fps", [30.0, 60.0])
def test_10fps_generation_presented_at_30_and_60_fit(out_fps):
    clock = SimClock()
    pacer = OutputPacer(out_fps, speed="fit", clock=clock, wallclock=lambda: 500.0)
    arrs = arrivals(30, fps=10.0)
    shown, nothing = drive(pacer, clock, arrs, until=arrs[-1][0])
    times = np.array([t for t, _ in shown])
    # on the output grid: every tick 1/fps after the previous one, no gaps once the rate
    # is learnt (the first block plays at the initial guess of 16 fps, then holds; the
    # rate settles within a few blocks)
    running = times > arrs[3][0]
    d = np.diff(times[running])
    assert np.allclose(d, 1.0 / out_fps, atol=1e-9)
    assert np.diff(times).min() == pytest.approx(1.0 / out_fps)  # never faster
    # presentation timestamps are the tick times (wall clock), indices count up by one
    metas = [p.meta for _, p in shown]
    assert [m.index for m in metas] == list(range(len(shown)))
    assert all(
        m.timestamp == pytest.approx(500.0 + t) for m, (t, _) in zip(metas, shown, strict=True)
    )
    # no duplicates in fit mode: the position in the generated video strictly increases
    pos = positions(shown, frame_base(arrs))
    assert (np.diff(pos) > 0).all()
    # and it moves at the generation rate: 10 generated frames a second of output
    steady = slice(len(pos) // 4, None)
    rate = np.polyfit(times[steady], pos[steady], 1)[0]
    assert rate == pytest.approx(10.0, rel=0.05)
    # between neighbours: t is the exact fraction of the way between their due times
    assert pacer.dropped == 0 and pacer.holds == nothing
    assert nothing < 3 * out_fps  # holds happened only while the rate was learnt
    assert pacer.presented == len(shown)
    t_run = times[running]
    assert len(t_run) == pytest.approx((t_run[-1] - t_run[0]) * out_fps + 1, abs=1)


def test_t_is_the_exact_fraction_between_source_due_times():
    """With a fixed source rate ("real", 16 fps) the source frames are due on a known
    grid, so each output frame's t is predictable: (tau - T_k) / (T_k+1 - T_k)."""
    clock = SimClock()
    pacer = OutputPacer(60.0, speed="real", clock=clock)
    # 12 frames per 0.75 s = 16 fps; every block after the first lands 0.2 s early
    arrs = [(1.0 + 0.75 * k - (0.2 if k else 0.0), k, 12) for k in range(6)]
    shown, nothing = drive(pacer, clock, arrs, until=5.0)
    assert nothing == 0 and len(shown) > 3.5 * 60
    base = {k: 12 * k for k in range(6)}
    for tau, p in shown:
        s = base[p.meta.block] + p.frame + p.t
        assert s == pytest.approx((tau - 1.0) * 16.0, abs=1e-6)


def test_real_speed_with_slow_generation_holds_and_never_goes_back():
    clock = SimClock()
    pacer = OutputPacer(30.0, speed="real", clock=clock)
    arrs = arrivals(20, fps=10.0)  # slower than the video's 16 fps
    shown, nothing = drive(pacer, clock, arrs, until=arrs[-1][0])
    pos = positions(shown, frame_base(arrs))
    assert (np.diff(pos) > 0).all()  # holds, never repeats or reverses
    assert pacer.holds > 0 and nothing == pacer.holds  # it says it is falling behind
    steady = slice(len(pos) // 4, None)
    t = np.array([x for x, _ in shown])
    # motion plays at 16 fps while frames are there
    d = np.diff(pos[steady]) / np.diff(t[steady])
    assert np.median(d) == pytest.approx(16.0, rel=0.02)


def test_starving_source_holds_then_resumes():
    clock = SimClock()
    pacer = OutputPacer(30.0, clock=clock)
    arrs = arrivals(16, fps=10.0, gap={8: 2.0})  # block 8 comes 2 s late
    shown, nothing = drive(pacer, clock, arrs, until=arrs[-1][0])
    pos = positions(shown, frame_base(arrs))
    assert (np.diff(pos) > 0).all()
    assert pacer.holds >= 30  # about 2 s of ticks with nothing new
    assert nothing == pacer.holds
    times = np.array([t for t, _ in shown])
    assert np.diff(times).max() > 1.5  # the gap shows as a held frame...
    after = times > arrs[8][0]
    assert after.sum() > 60  # ...and presentation resumes once the block lands


def test_push_and_pop_never_wait():
    """A source that never comes back: pop_due keeps answering at once (None), push too."""
    clock = SimClock()
    pacer = OutputPacer(60.0, clock=clock)
    clock.t = 1.0
    pacer.push(0, 9, payload="a")
    got = []
    for k in range(600):
        clock.t = 1.0 + k / 60
        p = pacer.pop_due()
        if p is not None:
            got.append(p)
    assert got and len(got) <= 9 * 6  # only frames of the one block, then holding
    assert pacer.holds > 500


def test_blocks_released_once_and_never_while_needed():
    clock = SimClock()
    released: list = []
    pacer = OutputPacer(60.0, clock=clock, on_release=released.append)
    arrs = arrivals(25, fps=10.0, gap={10: 1.0})
    i, shown = 0, 0
    while i < len(arrs) or pacer.next_due() is not None:
        due = pacer.next_due()
        if i < len(arrs) and (due is None or arrs[i][0] <= due):
            clock.t = arrs[i][0]
            pacer.push(arrs[i][1], arrs[i][2], payload=("block", arrs[i][1]), arrival=clock.t)
            i += 1
            continue
        if due is None or due > arrs[-1][0] + 3:
            break
        clock.t = due
        p = pacer.pop_due()
        if p is not None:
            shown += 1
            assert p.payload not in released
            assert p.next_payload is None or p.next_payload not in released
    pacer.clear()
    assert shown > 100
    assert sorted(b for _, b in released) == list(range(25))  # each exactly once


def test_without_interpolation_nearest_frame_no_repeats():
    clock = SimClock()
    pacer = OutputPacer(30.0, interpolate=False, clock=clock)
    arrs = arrivals(12, fps=10.0)
    shown, _ = drive(pacer, clock, arrs, until=arrs[-1][0])
    assert all(p.t == 0.0 and p.next_payload is None for _, p in shown)
    pos = positions(shown, frame_base(arrs))
    assert (np.diff(pos) > 0).all()  # whole frames, each shown once, in order
    assert np.diff(pos).max() <= 2


@pytest.mark.parametrize("bad", [0, -30, float("nan"), float("inf"), "60"])
def test_bad_rates_are_refused(bad):
    with pytest.raises(ValueError, match="fps"):
        OutputPacer(bad)
    with pytest.raises(ValueError, match="speed"):
        OutputPacer(30.0, speed="fast")


def test_real_speed_says_when_it_falls_behind():
    clock = SimClock()
    pacer = OutputPacer(30.0, speed="real", clock=clock)
    arrs = arrivals(6, fps=8.0)
    drive(pacer, clock, arrs, until=arrs[-1][0])
    assert pacer.falling_behind()  # 8 fps generation cannot show 16 fps motion
    clock.t += 5.0
    assert not pacer.falling_behind()  # nothing held for a while
    fit = OutputPacer(30.0, speed="fit", clock=clock)
    clock.t = 0.0
    arrs = arrivals(20, fps=8.0, jitter=0.0)
    drive(fit, clock, arrs, until=arrs[-1][0])
    assert not fit.falling_behind()  # fit follows the generation rate


def _pair(p):
    return (p.payload, p.frame, p.next_payload, p.next_frame, p.t)


@pytest.mark.parametrize("out_fps, gen_fps", [(30.0, 10.0), (60.0, 10.5), (60.0, 9.0)])
def test_plan_predicts_exactly_the_frames_pop_due_returns(out_fps, gen_fps):
    """Before every tick, plan() lists what the coming ticks will interpolate: the very
    next tick's frame is always in it (same pair, same t, bit for bit), and in steady
    state frames are planned at least one generated frame ahead (what the frame path
    computes while it waits)."""
    clock = SimClock()
    pacer = OutputPacer(out_fps, clock=clock)
    arrs = arrivals(12, gen_fps, jitter=0.05, seed=3)
    i, until = 0, arrs[-1][0]
    planned_at: dict[tuple, float] = {}  # pair+t -> earliest time it was planned
    checked = ahead = 0
    while True:
        due = pacer.next_due()
        nxt = arrs[i][0] if i < len(arrs) else None
        if nxt is not None and (due is None or nxt <= due):
            clock.t = nxt
            pacer.push(arrs[i][1], arrs[i][2], payload=("block", arrs[i][1]), arrival=nxt)
            i += 1
            continue
        if due is None or due >= until:
            break
        clock.t = due
        plan = pacer.plan(max_ticks=24)
        assert all(0.0 < q.t < 1.0 for q in plan)
        assert [q.due for q in plan] == sorted(q.due for q in plan)
        for q in plan:
            planned_at.setdefault(_pair(q), clock.t)
        p = pacer.pop_due()
        if p is None or p.t == 0.0:
            continue
        key = _pair(p)
        assert plan and _pair(plan[0]) == key, "the next tick's frame is the plan's first"
        checked += 1
        if clock.t - planned_at[key] >= 1.0 / gen_fps - 1e-9:
            ahead += 1
    assert checked > 100
    # the first frames of a pair whose next frame arrived late can't be known earlier
    assert ahead >= 0.8 * checked, (ahead, checked)


def test_plan_is_empty_without_interpolation_or_next_frame():
    clock = SimClock()
    pacer = OutputPacer(30.0, clock=clock, interpolate=False)
    pacer.push(0, 4, payload="a", arrival=0.0)
    assert pacer.plan() == []
    pacer = OutputPacer(30.0, clock=clock)
    assert pacer.plan() == []  # nothing pushed
    pacer.push(0, 1, payload="a", arrival=0.0)
    assert pacer.plan() == []  # one frame: nothing to interpolate towards
    state = (pacer._tick, pacer.source._next_due, pacer.presented)
    pacer.push(1, 3, payload="b", arrival=0.0)
    pacer.plan()
    assert (pacer._tick, pacer.source._next_due, pacer.presented) == state  # changes nothing


def test_blocks_arriving_together_are_a_burst_not_a_rate():
    """Two blocks handed over 1 ms apart (queued behind a slow reader) must not make the
    pacer believe generation runs at thousands of fps (it would then show every frame
    at once); later arrivals at the real rate are learnt as before."""
    clock = SimClock()
    pacer = OutputPacer(30.0, clock=clock)
    pacer.push(0, 6, payload="a", arrival=0.0)
    pacer.push(1, 6, payload="b", arrival=0.001)
    assert pacer.source.measured_fps is None
    assert pacer.source_rate < 30  # the first guess (16 fps, corrected), not 6000
    for k, t in enumerate((0.6, 1.2, 1.8, 2.4), start=2):
        pacer.push(k, 6, payload=k, arrival=t)
    assert pacer.source.measured_fps == pytest.approx(10.0, rel=0.25)
