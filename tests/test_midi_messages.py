"""The MIDI message layer, driven with mido messages in process against the REAL registry.

Hardware ports cannot exist on a CI machine, so messages are built with mido and handed to
the Router directly; every assertion reads the registry's values.
"""

import math

import mido
import pytest

from bridges.midi.feedback import Feedback
from bridges.midi.maps import parse_map
from bridges.midi.messages import Router, apply_curve, decode_relative, invert_curve
from engine.runtime.controls import make_registry


def cc(n, v, ch=0):
    return mido.Message("control_change", control=n, value=v, channel=ch)


def note(n, vel=127, ch=0):
    return mido.Message("note_on", note=n, velocity=vel, channel=ch)


def tap(r, n):
    r.handle(note(n))
    r.handle(mido.Message("note_off", note=n))


def make(mappings, presets=""):
    reg = make_registry(default_prompt="a forest")
    m = parse_map(f"device: test\n{presets}mappings:\n{mappings}", reg, "t.yaml")
    return reg, Router(reg, m.bindings, m.presets)


def test_cc_absolute_range_and_channel_filter():
    reg, r = make("  - {cc: 7, channel: 2, target: kv_bias, range: [0.1, 0.9]}\n")
    r.handle(cc(7, 127, ch=0))  # wrong channel: ignored
    assert reg.get("kv_bias") == 0.3
    r.handle(cc(7, 127, ch=1))
    assert reg.get("kv_bias") == pytest.approx(0.9)
    r.handle(cc(7, 0, ch=1))
    assert reg.get("kv_bias") == pytest.approx(0.1)


@pytest.mark.parametrize("order", ["msb_first", "lsb_first"])
def test_14bit_pairs_in_either_byte_order(order):
    reg, r = make("  - {cc: [1, 33], target: prompt/2/weight}\n")
    for value in (0, 1, 127, 128, 8191, 8192, 12345, 16383, 200):
        msb, lsb = value >> 7, value & 0x7F
        pair = [cc(1, msb), cc(33, lsb)]
        for m in pair if order == "msb_first" else pair[::-1]:
            r.handle(m)
        # the finest step is 1/16383 of the range: 14-bit resolution is really used
        assert reg.get("prompt/2/weight") == pytest.approx(value / 16383, abs=1e-12)


def test_14bit_lsb_only_updates_keep_the_msb():
    reg, r = make("  - {cc: [2, 34], target: transition/blocks, range: [0, 64]}\n")
    r.handle(cc(2, 64))
    r.handle(cc(34, 0))
    assert reg.get("transition/blocks") == 32
    r.handle(cc(34, 127))  # gear that sends only the LSB while the MSB stays
    assert reg.get("transition/blocks") == round((64 * 128 + 127) / 16383 * 64)


def test_nrpn_sequences_14_and_7_bit_rpn_deselects():
    reg, r = make(
        "  - {nrpn: 0x0102, target: prompt/2/weight}\n"
        "  - {nrpn: [0, 5], bits: 7, target: transition/blocks, range: [0, 10]}\n"
        "  - {cc: 20, target: seed, range: [0, 100]}\n"
    )
    # an int is the 14-bit parameter number: 0x0102 = 258 = MSB 2, LSB 2
    for m in (cc(99, 0x02), cc(98, 0x02), cc(6, 0x40), cc(38, 0x00)):
        r.handle(m)
    assert reg.get("prompt/2/weight") == pytest.approx((0x40 << 7) / 16383)
    r.handle(cc(38, 0x7F))  # LSB refines the same parameter
    assert reg.get("prompt/2/weight") == pytest.approx((0x40 << 7 | 0x7F) / 16383)
    for m in (cc(99, 0), cc(98, 5), cc(6, 127)):
        r.handle(m)
    assert reg.get("transition/blocks") == 10 and reg.get("prompt/2/weight") == pytest.approx(
        (0x40 << 7 | 0x7F) / 16383
    )
    r.handle(cc(101, 0))  # an RPN selected: data entry is not ours any more
    r.handle(cc(100, 0))
    r.handle(cc(6, 0))
    assert reg.get("transition/blocks") == 10
    r.handle(cc(20, 127))  # plain CCs still work in an NRPN map
    assert reg.get("seed") == 100


def test_nrpn_relative_increment_decrement():
    reg, r = make("  - {nrpn: 300, target: transition/blocks, mode: relative, step: 2}\n")
    for m in (cc(99, 300 >> 7), cc(98, 300 & 0x7F), cc(96, 1), cc(96, 1), cc(97, 1)):
        r.handle(m)
    assert reg.get("transition/blocks") == 4 + 2


@pytest.mark.parametrize(
    "encoding,up,down",
    [("twos", [1, 3], [127, 125]), ("offset", [65, 67], [63, 61]), ("signbit", [1, 3], [65, 67])],
)
def test_relative_encoders(encoding, up, down):
    reg, r = make(f"  - {{cc: 16, target: seed, mode: relative, encoding: {encoding}}}\n")
    assert [decode_relative(v, encoding) for v in up + down] == [1, 3, -1, -3]
    for v in up:
        r.handle(cc(16, v))
    assert reg.get("seed") == 42 + 4  # int target: one step per tick by default
    for v in down:
        r.handle(cc(16, v))
    assert reg.get("seed") == 42
    reg.set("seed", 0)  # relative reads the current value: no takeover needed
    r.handle(cc(16, down[0]))
    assert reg.get("seed") == 0  # clamped at the range end


def test_relative_float_steps_and_clamps():
    reg, r = make("  - {cc: 16, target: kv_bias, mode: relative, step: 0.1}\n")
    for _ in range(3):
        r.handle(cc(16, 1))
    assert reg.get("kv_bias") == pytest.approx(0.6)
    for _ in range(20):
        r.handle(cc(16, 1))
    assert reg.get("kv_bias") == 1.0


def test_pickup_engages_only_after_crossing_the_current_value():
    reg, r = make("  - {cc: 0, target: prompt/2/weight, takeover: pickup}\n")
    reg.set("prompt/2/weight", 0.5)
    for v in (0, 20, 40, 60):  # 60/127 = 0.47: still below 0.5
        r.handle(cc(0, v))
        assert reg.get("prompt/2/weight") == 0.5
    r.handle(cc(0, 70))  # crossed 0.5: picked up, follows from here
    assert reg.get("prompt/2/weight") == pytest.approx(70 / 127)
    r.handle(cc(0, 10))
    assert reg.get("prompt/2/weight") == pytest.approx(10 / 127)
    # OSC (or a timeline) moves the value: the fader lets go until it crosses again
    reg.set("prompt/2/weight", 0.9)
    r.handle(cc(0, 12))
    assert reg.get("prompt/2/weight") == 0.9
    r.handle(cc(0, 127))
    assert reg.get("prompt/2/weight") == 1.0


def test_pickup_from_above_and_when_already_matching():
    reg, r = make("  - {cc: 0, target: prompt/1/weight, takeover: pickup}\n")  # value 1.0
    r.handle(cc(0, 127))  # first message already at the value: engaged at once
    r.handle(cc(0, 50))
    assert reg.get("prompt/1/weight") == pytest.approx(50 / 127)


def test_pickup_survives_quantised_changes_not_yet_landed():
    reg, r = make("  - {cc: 0, target: prompt/2/weight, takeover: pickup}\n")
    r.handle(cc(0, 0))  # engaged (value 0.0)
    reg.quantizer = lambda: reg.clock() + 100.0  # a bar far away: changes wait
    r.handle(cc(0, 64))
    assert reg.get("prompt/2/weight") == 0.0  # scheduled, not staged
    r.handle(cc(0, 80))
    assert reg.pending_count() == 1 + 2  # still ours: both moves were taken (scheduled)


def test_scale_takeover_converges_without_a_jump():
    reg, r = make("  - {cc: 0, target: prompt/2/weight, takeover: scale}\n")
    reg.set("prompt/2/weight", 0.8)
    r.handle(cc(0, 0))  # knob at the bottom, value high: no jump
    assert reg.get("prompt/2/weight") == 0.8
    prev = 0.8
    for v in range(8, 128, 8):  # moving up: value rises toward 1 with the knob
        r.handle(cc(0, v))
        now = reg.get("prompt/2/weight")
        assert now >= prev and now - prev < 0.1
        prev = now
    r.handle(cc(0, 127))
    assert reg.get("prompt/2/weight") == 1.0
    r.handle(cc(0, 30))  # converged: follows directly
    assert reg.get("prompt/2/weight") == pytest.approx(30 / 127)


def test_notes_trigger_toggle_momentary_set():
    reg, r = make(
        "  - {note: 36, target: prompt/3/solo}\n"
        "  - {note: 37, target: pause}\n"
        "  - {note: 38, target: beat/seed_on_bar, mode: momentary}\n"
        "  - {note: 39, target: steps/preset, value: fast}\n"
        "  - {cc: 64, target: pause, mode: toggle}\n"
    )
    reg.set("prompt/3/text", "fog")
    r.handle(note(36))
    r.handle(note(36, 0))  # release does nothing
    c = reg.begin_block(0)
    assert c["prompt/3/weight"] == 1.0 and c["prompt/1/weight"] == 0.0
    r.handle(note(37))
    assert reg.get("pause") is True
    r.handle(mido.Message("note_off", note=37))
    assert reg.get("pause") is True  # toggles on press only
    r.handle(note(37))
    assert reg.get("pause") is False
    r.handle(note(38))
    assert reg.get("beat/seed_on_bar") is True
    r.handle(note(38, 0))
    assert reg.get("beat/seed_on_bar") is False
    r.handle(note(39))
    assert reg.begin_block(1)["steps"] == [1000, 750]
    r.handle(cc(64, 127))  # a CC button: the press edge toggles, held values do not
    r.handle(cc(64, 127))
    r.handle(cc(64, 0))
    assert reg.get("pause") is True


def test_actions_cycle_and_preset():
    reg, r = make(
        "  - {note: 1, action: cycle}\n  - {note: 2, action: cycle, step: -1}\n"
        "  - {note: 3, action: preset, preset: calm}\n",
        presets="presets:\n  calm: {seed: 7, transition/method: linear, quantize: off}\n",
    )
    reg.set_many({"prompt/2/text": "a", "prompt/4/text": "b"})
    tap(r, 1)
    assert reg.begin_block(0)["prompt/2/weight"] == 1.0
    tap(r, 1)  # slot 3 is empty: skipped
    c = reg.begin_block(1)
    assert c["prompt/4/weight"] == 1.0 and c["prompt/2/weight"] == 0.0
    tap(r, 1)  # wraps to slot 1
    assert reg.begin_block(2)["prompt/1/weight"] == 1.0
    tap(r, 2)  # backwards from 1: slot 4
    assert reg.begin_block(3)["prompt/4/weight"] == 1.0
    tap(r, 3)
    c = reg.begin_block(4)
    assert c["seed"] == 7 and c["transition/method"] == "linear" and c["quantize"] == "off"


@pytest.mark.parametrize("curve", ["linear", "exp", "log", "scurve"])
def test_curves_are_monotonic_fix_ends_and_invert(curve):
    k = {"linear": 1.0, "exp": 4.0, "log": 4.0, "scurve": 2.0}[curve]
    xs = [i / 100 for i in range(101)]
    ys = [apply_curve(curve, x, k) for x in xs]
    assert ys[0] == pytest.approx(0.0, abs=1e-12) and ys[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(ys, ys[1:], strict=False))
    assert all(
        invert_curve(curve, y, k) == pytest.approx(x, abs=1e-9) for x, y in zip(xs, ys, strict=True)
    )


def test_curve_shapes_the_value():
    reg, r = make("  - {cc: 3, target: prompt/2/weight, curve: exp}\n")
    r.handle(cc(3, 64))
    x = 64 / 127
    assert reg.get("prompt/2/weight") == pytest.approx(math.expm1(4 * x) / math.expm1(4))
    assert reg.get("prompt/2/weight") < 0.3  # exp: half travel is much less than half value


def test_choices_by_fader_and_bad_values_never_raise():
    reg, r = make(
        "  - {cc: 9, target: transition/method}\n"
        "  - {cc: 10, target: tempo/bpm, range: [20, 300]}\n"
    )
    r.handle(cc(9, 0))
    assert reg.get("transition/method") == "linear"
    r.handle(cc(9, 127))
    assert reg.get("transition/method") == "slerp"
    r.handle(cc(10, 127))
    assert reg.get("tempo/bpm") == 300.0  # immediate param: applied now, not at a block


def test_feedback_messages_and_queue():
    reg, r = make(
        "  - {note: 0, target: prompt/1/solo, feedback: prompt/1/weight, led: [0, 21], led_channel: 7}\n"
        "  - {cc: [1, 33], target: prompt/2/weight, feedback: true}\n"
        "  - {note: 5, target: quantize, value: bar, feedback: true}\n"
        "  - {cc: 7, target: transition/blocks, range: [0, 64], feedback: true}\n"
    )
    sent = []
    fb = Feedback(r, sent.append)
    fb.refresh()
    fb.flush()
    by = {(m.type, getattr(m, "note", getattr(m, "control", None))): m for m in sent}
    assert by[("note_on", 0)].velocity == 21 and by[("note_on", 0)].channel == 6
    assert by[("note_on", 5)].velocity == 0
    sent.clear()
    reg.set("prompt/2/weight", 0.75)  # from OSC: shown on the 14-bit control
    reg.set("quantize", "bar")
    reg.begin_block(0)
    fb.flush()
    v14 = round(0.75 * 16383)
    assert [(m.control, m.value) for m in sent if m.type == "control_change"] == [
        (1, v14 >> 7),
        (33, v14 & 0x7F),
    ]
    assert any(m.type == "note_on" and m.note == 5 and m.velocity == 127 for m in sent)
    sent.clear()
    r.handle(cc(7, 64))  # our own move is not echoed (motor faders would fight)
    reg.begin_block(1)
    assert fb.flush() == 0
    reg.set("transition/blocks", 16)
    reg.begin_block(2)
    fb.flush()
    assert [(m.control, m.value) for m in sent] == [(7, round(16 / 64 * 127))]
    fb.close()
