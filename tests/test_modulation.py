"""The modulation layer: LFO shapes and phase against references written here, base +
modulation clamped (the base never overwritten), values sampled once per block, envelope
peaks against the analytic decay, the shipped presets, and bad input (unknown source or
target, non-numeric target, depth out of range, preset errors with file:line) that
changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.runtime.controls import make_registry
from engine.runtime.modulation import (
    PRESET_DIR,
    SHAPES,
    ModPresetError,
    lfo,
    parse_source,
    read_preset,
)
from engine.runtime.registry import ControlError


def ref_lfo(shape: str, beat: float, rate: float, phase: float) -> float:
    """Independent formulas: phase in cycles, then each textbook shape."""
    x = beat / rate + phase
    if shape == "sine":
        return float(np.sin(2 * np.pi * x))
    if shape == "triangle":  # arcsin(sin) is a triangle with the same zero and peaks
        return float(2 / np.pi * np.arcsin(np.sin(2 * np.pi * x)))
    if shape == "saw":
        return float(2 * (x - np.floor(x)) - 1)
    if shape == "square":
        return 1.0 if (x - np.floor(x)) < 0.5 else -1.0
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["sine", "triangle", "saw", "square"])
def test_lfo_shapes_and_phase_match_reference(shape):
    rng = np.random.default_rng(0)
    for _ in range(400):
        beat = float(rng.uniform(0, 64))
        rate = float(rng.choice([0.5, 1, 4, 16]))
        phase = float(rng.uniform(0, 1))
        x = beat / rate + phase
        if shape == "square" and abs(x * 2 - round(x * 2)) < 1e-9:
            continue  # on an edge either side is right
        assert lfo(shape, beat, rate, phase) == pytest.approx(
            ref_lfo(shape, beat, rate, phase), abs=1e-9
        )
    # phase is in cycles: a quarter cycle moves a sine to a cosine
    assert lfo("sine", 1.0, 4.0, 0.25) == pytest.approx(math.cos(2 * math.pi * 0.25), abs=1e-12)


def test_sample_and_hold_holds_per_cycle_and_repeats():
    vals = [lfo("sh", b / 8, 2.0, 0.0, slot=3) for b in range(8 * 40)]
    cycles = [vals[i : i + 16] for i in range(0, len(vals), 16)]
    assert all(len(set(c)) == 1 for c in cycles)  # constant within each 2-beat cycle
    firsts = [c[0] for c in cycles]
    assert len(set(firsts)) == len(firsts)  # a new value each cycle
    assert all(-1 <= v <= 1 for v in firsts) and min(firsts) < -0.5 and max(firsts) > 0.5
    assert firsts == [lfo("sh", 2.0 * k, 2.0, 0.0, slot=3) for k in range(20)]  # reproducible
    assert firsts != [lfo("sh", 2.0 * k, 2.0, 0.0, slot=4) for k in range(20)]  # per slot


def slot(reg, n: int = 1, **kw) -> None:
    reg.set_many({f"mod/{n}/{k}": v for k, v in kw.items()})


def test_lfo_on_registry_base_plus_modulation_clamped_base_kept():
    reg = make_registry()
    reg.set("tempo/bpm", 120.0)  # one beat = 0.5 s
    slot(reg, 1, source="lfo/sine", target="kv_bias", depth=0.2, rate=4)
    for b in range(16):
        t = b * 0.37
        c = reg.begin_block(b, now=t)
        expect = 0.3 + 0.2 * math.sin(2 * math.pi * (t * 2) / 4)
        assert c["kv_bias"] == pytest.approx(expect, abs=1e-9)
        assert reg.get("kv_bias") == 0.3 and reg.applied("kv_bias") == 0.3  # base untouched
    # clamping: base 1 plus a push stays at the top of the range
    slot(reg, 2, source="lfo/square", target="prompt/1/weight", depth=0.5, rate=4)
    slot(reg, 3, source="lfo/square", target="kv_bias", depth=-5.0, rate=4, phase=0.0)
    c = reg.begin_block(16, now=16 * 0.37 + 10.0)
    sq = ref_lfo("square", (16 * 0.37 + 10.0) * 2, 4, 0.0)
    assert c["prompt/1/weight"] == (1.0 if sq > 0 else 0.5)
    kv = 0.3 + 0.2 * math.sin(2 * math.pi * ((16 * 0.37 + 10.0) * 2) / 4) - 5.0 * sq
    assert c["kv_bias"] == pytest.approx(min(max(kv, 0.01), 1.0))
    # the performer moves the base during modulation: the new base is what is modulated
    reg.set("kv_bias", 0.5)
    slot(reg, 3, source="")
    c = reg.begin_block(17, now=20.3)
    assert c["kv_bias"] == pytest.approx(0.5 + 0.2 * math.sin(2 * math.pi * 40.6 / 4), abs=1e-9)
    # every slot off: exactly the base again, and the block says it changed
    reg.set("mod/clear", 1)
    c = reg.begin_block(18, now=20.5)
    assert c["kv_bias"] == 0.5 and c["prompt/1/weight"] == 1.0
    assert c.changed["kv_bias"] == 0.5


def test_int_targets_round_and_counter_steps_seed():
    reg = make_registry()
    reg.set("seed", 100)
    slot(reg, 1, source="audio/count/high", target="seed", depth=1)
    bank = reg.modulator.bank
    seen = []
    for b, hats in enumerate([0, 1, 3, 3, 7]):
        bank.push(b * 0.1, {"audio/count/high": float(hats)})
        c = reg.begin_block(b, now=b * 0.1)
        seen.append(c["seed"])
        assert isinstance(c["seed"], int)
    assert seen == [100, 101, 103, 103, 107]
    assert reg.get("seed") == 100
    slot(reg, 1, depth=0.4)  # 7 hats * 0.4 = 2.8 -> rounds to 3
    bank.push(1.0, {"audio/count/high": 7.0})
    assert reg.begin_block(5, now=1.0)["seed"] == 103


def test_values_are_sampled_once_per_block():
    """Two slots read the same source with opposite depths: within a block they always
    cancel (one sample for the block); sources arriving after begin_block change the
    next block, never the one already taken; the modulator runs once per block."""
    reg = make_registry()
    slot(reg, 1, source="audio/level", target="prompt/1/weight", depth=-0.5, attack=0, release=0)
    slot(reg, 2, source="audio/level", target="prompt/2/weight", depth=0.5, attack=0, release=0)
    reg.set("prompt/1/weight", 0.5)
    reg.set("prompt/2/weight", 0.5)
    calls = []
    inner = reg.modulator
    reg.modulator = lambda v, now, b: calls.append(b) or inner(v, now, b)
    bank = inner.bank
    rng = np.random.default_rng(1)
    blocks = []
    for b in range(30):
        for k in range(int(rng.integers(0, 5))):
            bank.push(b + k / 10, {"audio/level": float(rng.uniform(0, 1))})
        c = reg.begin_block(b, now=float(b))
        blocks.append(c)
        assert c["prompt/1/weight"] + c["prompt/2/weight"] == pytest.approx(1.0, abs=1e-12)
    assert calls == list(range(30))
    frozen = dict(blocks[-1].values)
    bank.push(99.0, {"audio/level": 1.0})
    assert dict(blocks[-1].values) == frozen
    assert reg.begin_block(30, now=30.0)["prompt/2/weight"] == 1.0


def test_envelope_takes_the_block_peak_and_releases_exponentially():
    reg = make_registry()
    slot(reg, 1, source="audio/onset/low", target="kv_bias", depth=0.5, attack=0, release=0.2)
    bank = reg.modulator.bank
    hop = 0.01

    def hops(t0: float, t1: float, onset_at: float | None = None) -> None:
        for i in range(round((t1 - t0) / hop)):
            t = t0 + i * hop
            hit = onset_at is not None and abs(t - onset_at) < hop / 2
            bank.push(t, {"audio/onset/low": 1.0 if hit else 0.0})

    hops(0.0, 0.75, onset_at=0.30)  # a kick in the middle of the block's span
    assert reg.begin_block(0, now=0.75)["kv_bias"] == pytest.approx(0.8)  # the peak counts
    hops(0.75, 1.5)
    # the next block's peak is its first hop: the envelope 0.46 s after the kick
    expect = 0.3 + 0.5 * math.exp(-(0.75 - 0.30) / 0.2)
    assert reg.begin_block(1, now=1.5)["kv_bias"] == pytest.approx(expect, rel=1e-6)
    # a source that stops (device gone): the slot holds its last value
    held = reg.begin_block(2, now=2.25)["kv_bias"]
    assert held == reg.begin_block(3, now=3.0)["kv_bias"]


def test_midi_cc_random_walk_and_smoothing():
    reg = make_registry()
    slot(reg, 1, source="midi/cc/74", target="vace/scale", depth=1.0, offset=-0.5)
    bank = reg.modulator.bank
    bank.set("midi/cc/74", 1.0)
    assert reg.begin_block(0, now=0.0)["vace/scale"] == pytest.approx(1.5)
    slot(reg, 2, source="random", target="v2v/strength", depth=0.3, rate=1)
    walk = [reg.begin_block(b, now=b * 0.25)["v2v/strength"] for b in range(1, 200)]
    assert all(0.4 - 1e-9 <= w <= 1.0 for w in walk) and len(set(walk)) > 50
    again = make_registry()
    slot(again, 2, source="random", target="v2v/strength", depth=0.3, rate=1)
    assert [again.begin_block(b, now=b * 0.25)["v2v/strength"] for b in range(1, 200)] == walk
    # smoothing: a step of the source approaches geometrically
    reg2 = make_registry()
    slot(reg2, 1, source="midi/cc/1", target="kv_bias", depth=0.5, smoothing=0.5)
    reg2.modulator.bank.set("midi/cc/1", 0.0)
    reg2.begin_block(0, now=0.0)
    reg2.modulator.bank.set("midi/cc/1", 1.0)
    got = [reg2.begin_block(b, now=float(b))["kv_bias"] - 0.3 for b in range(1, 5)]
    assert got == pytest.approx([0.5 * (1 - 0.5**k) for k in range(1, 5)])


def test_listeners_hear_base_changes_and_the_log_records_modulated_values():
    reg = make_registry()
    heard = []
    reg.subscribe(lambda c: heard.append((c.path, c.value)))
    slot(reg, 1, source="lfo/saw", target="kv_bias", depth=0.2, rate=1)
    heard.clear()
    recs = [reg.begin_block(b, now=b * 0.3).to_json() for b in range(6)]
    assert not [h for h in heard if h[0] == "kv_bias"]  # feedback shows the performer's base
    for r in recs:
        assert r["values"]["kv_bias"] != 0.3
    for a, b in zip(recs, recs[1:], strict=False):
        assert b["changed"]["kv_bias"] == b["values"]["kv_bias"] != a["values"]["kv_bias"]


def test_shipped_presets_load_and_do_what_they_say():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"kick-pump", "bass-kv", "hats-seed", "lfo-crossfade"} <= set(names)
    reg = make_registry()
    for n in names:
        reg.set("mod/load", n)
        reg.begin_block(0, now=0.0)
        assert reg.get("mod/1/source") and reg.get("mod/1/target")
    reg.set("mod/load", "lfo-crossfade")
    reg.set("tempo/bpm", 128.0)
    reg.set("prompt/2/text", "fog")
    ws = []
    for b in range(1, 60):
        c = reg.begin_block(b, now=b * 0.6)
        w1, w2 = c["prompt/1/weight"], c["prompt/2/weight"]
        assert w1 + w2 == pytest.approx(1.0, abs=1e-9) and 0 <= w1 <= 1
        ws.append(w1)
    assert max(ws) > 0.95 and min(ws) < 0.05  # a full crossfade over 4 bars
    reg.set("mod/load", "kick-pump")  # loading a preset switches the others' slots off
    assert reg.get("mod/2/source") == "" and reg.get("mod/1/target") == "prompt/1/weight"


def snapshot(reg):
    return {p.path: reg.get(p.path) for p in reg if p.stateful}


@pytest.mark.parametrize(
    "path,value,reason",
    [
        ("mod/1/source", "lfo/wobble", "LFO shapes"),
        ("mod/1/source", "sidechain", "unknown source"),
        ("mod/1/source", "audio/../x", "audio sources"),
        ("mod/1/source", "midi/cc/200", "controller 0..127"),
        ("mod/1/source", "midi/cc/0/7", "channel 1..16"),
        ("mod/1/target", "nope/x", "not a numeric parameter"),
        ("mod/1/target", "prompt/1/text", "not a numeric parameter"),
        ("mod/1/target", "tempo/bpm", "not a numeric parameter"),  # immediate, not per block
        ("mod/1/target", "mod/2/depth", "not a numeric parameter"),  # no self-modulation
        ("mod/1/curve", "wiggly", "not one of"),
        ("mod/1/depth", "lots", "expected a number"),
        ("mod/1/depth", float("nan"), "not a finite number"),
        ("mod/load", "../../etc/passwd", "a preset name"),
        ("mod/load", "missing", "no modulation preset"),
        ("mod/99/source", "lfo/sine", "unknown parameter"),
    ],
)
def test_bad_slot_values_are_refused_and_change_nothing(path, value, reason):
    reg = make_registry()
    slot(reg, 1, source="lfo/sine", target="kv_bias", depth=0.1)
    before = snapshot(reg)
    with pytest.raises(ControlError, match=reason):
        reg.set_many([("mod/1/depth", 0.2), (path, value)])
    assert snapshot(reg) == before


def test_parse_source_normalises():
    assert parse_source(" LFO/Sine ").spec == "lfo/sine"
    assert parse_source("off").kind == "off" and parse_source("").spec == ""
    assert parse_source("midi/cc/01/074").name == "midi/cc/1/74"
    assert parse_source("audio/count/high").counter and not parse_source("audio/low").counter
    assert {parse_source(f"lfo/{s}").name for s in SHAPES} == set(SHAPES)
    for bad in [None, 3, "audio/", "audio/a/b/c", "lfo", "midi/cc/", "x" * 500]:
        with pytest.raises(ValueError):
            parse_source(bad)


def read(tmp_path, text, reg=None):
    reg = reg or make_registry()
    params = {p.path: p for p in reg}
    from engine.runtime.controls import mod_targets

    f = tmp_path / "m.yaml"
    f.write_text(text)
    return read_preset(f, params, lambda: mod_targets(list(params.values())))


def test_preset_errors_name_file_and_line(tmp_path):
    text = """name: broken
slots:
  - source: lfo/sine
    target: kv_bias
    depth: 5
  - source: lfo/sine
    target: prompt/1/text
  - source: wobble
    target: kv_bias
    flavour: mint
  - target: seed
  - source: lfo/saw
    target: kv_bias
    rate: 3 fortnights
    smoothing: 2
"""
    with pytest.raises(ModPresetError) as e:
        read(tmp_path, text)
    f = str(tmp_path / "m.yaml")
    probs = e.value.problems
    expect = [
        (5, "more than the whole range of kv_bias"),
        (7, "not a numeric parameter"),
        (8, "unknown source"),
        (10, "unknown key 'flavour'"),
        (11, "source: is required"),
        (14, "rate: expected a number of beats"),
        (15, "outside 0..0.99"),
    ]
    for line, text_ in expect:
        assert any(p.startswith(f"{f}:{line}: ") and text_ in p for p in probs), (line, probs)
    assert len(probs) == len(expect)
    for bad, where in [
        ("slots: [\n  - {source: lfo/sine\n", ":2: YAML error"),
        ("slots: 3\n", ":1: slots: must be a non-empty list"),
        ("- 1\n- 2\n", ":1: a modulation preset is a mapping"),
        ("slots:\n  - {source: lfo/sine, target: kv_bias, slot: 17}\n", ":2: slot: 1..16"),
        ("a: &a [*a]\n", "YAML error"),
        ("slots:\n" + "  - {source: lfo/sine, target: kv_bias}\n" * 17, "17 slots, at most 16"),
    ]:
        with pytest.raises(ModPresetError, match=where):
            read(tmp_path, bad)
    # rates in bars and fractions
    out = read(
        tmp_path,
        "slots:\n  - {source: lfo/saw, target: kv_bias, rate: 2 bars}\n"
        "  - {source: lfo/saw, target: seed, rate: 1/2 beat, slot: 9}\n",
    )
    assert out["mod/1/rate"] == 8.0 and out["mod/9/rate"] == 0.5 and out["mod/2/source"] == ""


def test_mod_load_over_osc_path_reports_preset_errors_and_changes_nothing(tmp_path, monkeypatch):
    import engine.runtime.modulation as m

    (tmp_path / "bad.yaml").write_text(
        "slots:\n  - source: lfo/sine\n    target: kv_bias\n    depth: -9\n"
    )
    monkeypatch.setattr(m, "PRESET_DIR", tmp_path)
    reg = make_registry()
    before = snapshot(reg)
    with pytest.raises(ControlError, match=r"bad\.yaml:4: depth -9 is more than the whole range"):
        reg.set("/dd/mod/load", "bad")
    assert snapshot(reg) == before and reg.pending_count() == 0
