"""Quantised changes land on the right block for each mode (simulated clock, explicit block
times), beat actions fire on bars, and the tempo params drive the grid."""

import math

import mido
import pytest

from bridges.midi.maps import parse_map
from bridges.midi.messages import Router
from bridges.tempo.beats import BeatActions
from bridges.tempo.bridge import TempoBridge
from bridges.tempo.grid import BeatGrid
from engine.runtime.controls import make_registry

T0 = 100.0  # beat 0 falls here
BLOCK = 0.4  # a block begins every 0.4 s: T0, T0 + 0.4, ...
LOOKAHEAD = 0.3


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def rig(bpm=120.0):
    clock = Clock(T0)
    reg = make_registry(default_prompt="a forest")
    reg.clock = clock
    reg.lookahead = LOOKAHEAD
    bridge = TempoBridge(reg, bpm=bpm, beat_actions=False)
    bridge.grid.align(0.0, T0)
    return reg, clock, bridge


def reference_block(t_change, mode, bpm):
    """Independent of the grid code: boundary = next multiple of the mode's length after
    t_change, counted from T0; block = first one beginning at or after boundary - lookahead."""
    beats = {"beat": 1, "bar": 4, "2bar": 8, "4bar": 16}[mode]
    unit = beats * 60.0 / bpm
    boundary = T0 + math.ceil((t_change - T0) / unit - 1e-9) * unit
    return max(math.ceil((boundary - LOOKAHEAD - T0) / BLOCK - 1e-9), 0), boundary


def run_blocks(reg, clock, until_block):
    """Begin blocks at their times; return {path: block index} of the first change seen."""
    landed = {}
    for k in range(until_block + 1):
        clock.t = T0 + k * BLOCK
        c = reg.begin_block(k, now=clock.t)
        for p in c.changed:
            landed.setdefault(p, k)
    return landed


@pytest.mark.parametrize("mode", ["beat", "bar", "2bar", "4bar"])
@pytest.mark.parametrize("bpm,t_change", [(120.0, 100.1), (120.0, 101.93), (97.0, 103.37)])
def test_quantised_change_lands_on_the_right_block(mode, bpm, t_change):
    reg, clock, bridge = rig(bpm)
    reg.set("quantize", mode)
    want, boundary = reference_block(t_change, mode, bpm)
    # the blocks before the change
    start = math.floor((t_change - T0) / BLOCK)
    for k in range(start + 1):
        reg.begin_block(k, now=T0 + k * BLOCK)
    clock.t = t_change
    reg.set("seed", 7, quantized=True)  # as bridges send performer input
    reg.set("kv_bias", 0.9)  # not quantised: next block
    landed = {}
    for k in range(start + 1, want + 2):
        clock.t = T0 + k * BLOCK
        for p in reg.begin_block(k, now=clock.t).changed:
            landed.setdefault(p, k)
    assert landed["kv_bias"] == start + 1
    assert landed["seed"] == max(want, start + 1)
    assert T0 + landed["seed"] * BLOCK >= boundary - LOOKAHEAD - 1e-9
    bridge.close()


def test_quantize_off_and_stopped_clock_mean_next_block():
    reg, clock, bridge = rig()
    clock.t = 100.1
    reg.set("seed", 3, quantized=True)  # quantize defaults to off
    assert reg.begin_block(1, now=100.4).changed == {"seed": 3}
    reg.set("quantize", "bar")
    bridge.grid.running = False  # e.g. MIDI clock stopped: no grid to land on
    reg.set("seed", 4, quantized=True)
    assert reg.begin_block(2, now=100.8).changed == {"seed": 4}
    bridge.close()


def test_midi_change_is_quantised_but_tempo_params_are_not():
    reg, clock, bridge = rig()
    reg.set("quantize", "bar")
    m = parse_map(
        "device: x\nmappings:\n  - {cc: 1, target: prompt/2/weight}\n"
        "  - {cc: 2, target: tempo/bpm, range: [60, 180]}\n",
        reg,
    )
    r = Router(reg, m.bindings)
    clock.t = 100.1
    r.handle(mido.Message("control_change", control=1, value=127))
    r.handle(mido.Message("control_change", control=2, value=127))
    assert reg.get("tempo/bpm") == 180.0 and bridge.grid.bpm == 180.0  # immediate
    landed = run_blocks(reg, clock, 6)
    # the weight was scheduled for the bar as it stood when it came (120 BPM: 102.0)
    assert landed["prompt/2/weight"] == reference_block(100.1, "bar", 120.0)[0] == 5
    assert "tempo/bpm" not in landed  # applied at once, never waited for a block
    bridge.close()


def test_tempo_param_moves_the_grid_with_phase_kept():
    reg, clock, bridge = rig()
    clock.t = 101.0  # beat 2 at 120 BPM
    reg.set("tempo/bpm", 60.0)
    assert bridge.grid.beat_at(101.0) == pytest.approx(2.0)
    assert bridge.grid.next_boundary("bar", 101.0) == pytest.approx(103.0)
    bridge.close()


def test_tap_tempo_through_the_registry_sets_bpm_and_phase():
    reg, clock, bridge = rig()
    for t in (200.0, 200.4, 200.8, 201.2):  # 150 BPM
        clock.t = t
        reg.set("tempo/tap", 1)
    assert reg.get("tempo/bpm") == pytest.approx(150.0)
    assert bridge.grid.bpm == pytest.approx(150.0)
    assert bridge.grid.beat_at(201.2) == pytest.approx(round(bridge.grid.beat_at(201.2)))
    assert bridge.grid.next_boundary("beat", 201.25) == pytest.approx(201.6)
    bridge.close()


def test_midi_clock_leads_and_shows_its_tempo():
    reg, clock, bridge = rig()
    mc = bridge.use_midi_clock()
    bridge.feed_midi(mido.Message("start"), 300.0)
    dt = 60 / (100 * 24)
    for i in range(48):
        bridge.feed_midi(mido.Message("clock"), 300.0 + i * dt)
    assert mc.bpm == pytest.approx(100.0) and bridge.grid.source == "clock"
    assert reg.get("tempo/bpm") == pytest.approx(100.0, abs=0.1)  # shown back
    reg.set("tempo/bpm", 140.0)  # ignored while the clock leads
    assert bridge.grid.bpm == pytest.approx(100.0)
    bridge.close()


def test_beat_actions_schedule_on_the_bar():
    clock = Clock(T0)
    reg = make_registry(default_prompt="a")
    reg.clock = clock
    reg.lookahead = LOOKAHEAD
    reg.set_many({"prompt/2/text": "b", "prompt/3/text": "c"})
    reg.begin_block(0, now=T0)
    grid = BeatGrid(120.0, clock=clock)  # bar = 2 s
    grid.align(0.0, T0)
    beats = BeatActions(reg, grid, margin=0.1)
    assert beats.tick(100.5) is None  # nothing switched on
    reg.set_many({"beat/cycle_bars": 2, "beat/seed_on_bar": True})
    assert beats.tick(101.0) is None  # next bar (102) still too far
    when, paths = beats.tick(101.65)  # within lookahead + margin of bar 1
    assert when == pytest.approx(102.0) and paths == ["seed/random"]  # bar 1: odd, no cycle
    assert beats.tick(101.7) is None  # once per bar
    landed = run_blocks(reg, clock, 6)  # blocks at 100.0 .. 102.4
    assert landed["seed"] == 5  # 102.0 - 0.3 = 101.7 -> block at 102.0
    when, paths = beats.tick(103.65)  # bar 2: even -> cycle to slot 2 as well
    assert when == pytest.approx(104.0) and paths == ["seed/random", "prompt/2/solo"]
    clock.t = 104.0
    c = reg.begin_block(10, now=104.0)
    assert c["prompt/2/weight"] == 1.0 and c["prompt/1/weight"] == 0.0
