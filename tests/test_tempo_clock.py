"""Tempo sources: MIDI clock (BPM, phase, start/stop/continue/song position), tap tempo,
Ableton Link between two aalink peers on this machine."""

import random

import mido
import pytest

from bridges.tempo.clock import PPQN, MidiClock
from bridges.tempo.grid import BeatGrid
from bridges.tempo.tap import TapTempo

CLOCK = mido.Message("clock")


def pulses(clock, bpm, n, t0, jitter=0.0, seed=0):
    """Feed n pulses at `bpm` from t0 with uniform jitter; returns the ideal time of the last."""
    rng = random.Random(seed)
    dt = 60.0 / (bpm * PPQN)
    for i in range(n):
        clock.feed(CLOCK, t0 + i * dt + rng.uniform(-jitter, jitter))
    return t0 + (n - 1) * dt


@pytest.mark.parametrize("bpm", [72.0, 120.0, 128.0, 174.0])
def test_clock_bpm_within_half_a_bpm_under_jitter(bpm):
    c = MidiClock()
    c.feed(mido.Message("start"), 0.0)
    last = pulses(c, bpm, 96, 10.0, jitter=0.002)  # +-2 ms: a busy USB bus
    assert c.bpm == pytest.approx(bpm, abs=0.5)
    # phase: 96 pulses after Start, the last one is beat 95/24; half a beat later...
    dt = 60.0 / bpm
    assert c.beat_at(last + dt / 2) == pytest.approx(95 / 24 + 0.5, abs=0.03)


def test_clock_follows_a_tempo_change():
    c = MidiClock()
    c.feed(mido.Message("start"), 0.0)
    t = pulses(c, 100.0, 48, 1.0)
    pulses(c, 140.0, 60, t + 60 / (140 * PPQN))
    assert c.bpm == pytest.approx(140.0, abs=0.5)


def test_start_stop_continue_song_position_drive_the_grid():
    grid = BeatGrid(90.0)
    c = MidiClock(grid)
    c.feed(mido.Message("start"), 0.0)
    assert grid.running
    last = pulses(c, 120.0, 48, 5.0)  # two beats
    assert grid.source == "clock" and grid.bpm == pytest.approx(120.0, abs=0.01)
    assert grid.beat_at(last) == pytest.approx(47 / 24, abs=1e-6)
    c.feed(mido.Message("stop"), last + 0.01)
    assert not grid.running and grid.next_boundary("beat", last + 0.02) is None
    dt = 60.0 / (120.0 * PPQN)
    held = pulses(c, 120.0, 24, last + dt)  # clock keeps running while stopped
    assert c.beat_at(held) == pytest.approx(48 / 24, abs=0.01)  # ...the position holds
    c.feed(mido.Message("songpos", pos=16), held + dt / 3)  # 16 sixteenths = beat 4
    c.feed(mido.Message("continue"), held + dt / 2)
    t = held + dt
    c.feed(CLOCK, t)  # the first pulse after Continue is the song position
    assert grid.running and c.beat_at(t) == pytest.approx(4.0, abs=0.01)
    c.feed(mido.Message("start"), t + dt / 2)  # Start rewinds to beat 0
    c.feed(CLOCK, t + dt)
    assert c.beat_at(t + dt) == pytest.approx(0.0, abs=0.01)


def test_clock_ignores_other_messages_and_forgets_after_a_gap():
    c = MidiClock()
    assert not c.feed(mido.Message("note_on"), 0.0)
    pulses(c, 120.0, 24, 1.0)
    assert c.bpm == pytest.approx(120.0, abs=0.01)
    pulses(c, 60.0, 8, 10.0)  # 9 s of silence: the old pulses do not bend the new tempo
    assert c.bpm == pytest.approx(60.0, abs=0.01)


def test_tap_tempo():
    tap = TapTempo()
    assert tap.tap(0.0) is None
    for t in (0.5, 1.0, 1.51, 1.99):
        bpm = tap.tap(t)
    assert bpm == pytest.approx(60 * 4 / 1.99)
    assert tap.tap(10.0) is None  # a pause starts a new series
    assert tap.tap(10.4) == pytest.approx(150.0)


def test_link_peers_agree_on_tempo():
    pytest.importorskip("aalink", reason="aalink (the `link` extra) is not installed")
    from bridges.tempo.link import LinkTempo, wait_for

    a_grid, b_grid = BeatGrid(120.0), BeatGrid(120.0)
    a = LinkTempo(a_grid, 120.0)
    b = LinkTempo(b_grid, 95.0)
    try:
        try:
            a.start()
            b.start()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"Ableton Link cannot run here: {e}")
        if not wait_for(lambda: a.peers >= 1 and b.peers >= 1, 5.0):
            pytest.skip("Link peers did not find each other (no multicast on loopback here)")
        a.set_tempo(133.0)
        # each peer's grid follows at its own next sample: wait for both (CI once read a's
        # grid one sample before it caught up)
        both = lambda: abs(b_grid.bpm - 133.0) < 0.01 and abs(a_grid.bpm - 133.0) < 0.01  # noqa: E731
        assert wait_for(both, 3.0), (a_grid.bpm, b_grid.bpm)
        assert b_grid.source == "link" and a_grid.source == "link"
        # both grids put the bar at the same time (Link aligns phase modulo the quantum)
        now = a_grid.clock()
        ta, tb = a_grid.next_boundary("bar", now), b_grid.next_boundary("bar", now)
        assert abs(ta - tb) < 0.01
    finally:
        a.close()
        b.close()


def test_link_start_stop_gates_quantised_changes_like_midi_start_stop():
    """Two real Link peers with start/stop sync: until the session is seen playing the grid
    runs (a session without shared transport must not lose quantisation); then stop in one
    peer stops the other's grid (no boundary: changes go out at the next block), play
    starts it again."""
    pytest.importorskip("aalink", reason="aalink (the `link` extra) is not installed")
    from bridges.tempo.link import LinkTempo, wait_for

    a_grid, b_grid = BeatGrid(120.0), BeatGrid(120.0)
    a, b = LinkTempo(a_grid, 120.0), LinkTempo(b_grid, 120.0)
    try:
        try:
            a.start()
            b.start()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"Ableton Link cannot run here: {e}")
        if not wait_for(lambda: a.peers >= 1 and b.peers >= 1, 5.0):
            pytest.skip("Link peers did not find each other (no multicast on loopback here)")
        assert b.playing is None and b_grid.running  # no transport seen: not gated
        assert b_grid.next_boundary("bar") is not None
        a.set_playing(True)
        assert wait_for(lambda: b.playing is True, 3.0)
        assert b_grid.running and b_grid.next_boundary("beat") is not None
        a.set_playing(False)
        assert wait_for(lambda: b.playing is False and not b_grid.running, 3.0)
        assert b_grid.next_boundary("bar") is None  # like MIDI Stop: no grid to land on
        a.set_playing(True)
        assert wait_for(lambda: b_grid.running, 3.0)
    finally:
        a.close()
        b.close()
