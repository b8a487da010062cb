"""MIDI maps, learn, ports: shipped maps pass `midi check`, errors carry file:line, learn's
output parses back to the same mapping, ports reconnect.

Hardware ports cannot exist here: the reconnect test injects the port list and opener
(the only stand-ins), and the end-to-end test uses a real ALSA virtual port when
/dev/snd/seq exists (skipped with the reason otherwise).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import mido
import pytest

from bridges.midi.bridge import MidiBridge
from bridges.midi.learn import Learner, device_regex, finish, write_mapping
from bridges.midi.maps import PRESET_DIR, MapError, load_map, parse_map
from bridges.midi.messages import Router
from bridges.midi.ports import PortWatcher
from engine.runtime.controls import make_registry

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(PRESET_DIR.glob("*.yaml"))


def cc(n, v, ch=0):
    return mido.Message("control_change", control=n, value=v, channel=ch)


@pytest.fixture
def reg():
    return make_registry(default_prompt="a forest")


def test_every_shipped_map_passes_midi_check():
    names = {p.stem for p in SHIPPED}
    assert {"apc_mini_mk2", "nanokontrol2", "launch_control_xl", "midimix"} <= names
    r = subprocess.run(
        [sys.executable, "-m", "engine", "midi", "check", *map(str, SHIPPED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok:") == len(SHIPPED)


def test_midi_check_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "device: x\nmappings:\n  - {cc: 1, target: seed}\n  - {cc: 2, target: nope/path}\n"
        "  - {note: 3, target: pause, mode: relative}\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("device: x\nmappings:\n  - {cc: 1, target: seed\n  - {cc: 2}\n")
    r = subprocess.run(
        [sys.executable, "-m", "engine", "midi", "check", str(bad), str(broken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"{bad}:4: unknown target 'nope/path'" in r.stderr
    assert f"{bad}:5: a note cannot be relative" in r.stderr
    assert f"{broken}:4: YAML error" in r.stderr


@pytest.mark.parametrize(
    "text,line,needle",
    [
        ("device: x\nmappings:\n  - {cc: 1, target: seed}\n  - {cc: 1, tagret: seed}\n", 4, "unknown key 'tagret'"),
        ("device: x\nmappings:\n  - cc: 1\n    target: kv_bias\n    range: [0, 5]\n", 5, "outside kv_bias's range"),
        ("device: x\nmappings:\n  - {cc: [1, 33], target: seed}\n  - {cc: 33, target: kv_bias}\n", 4, "half of the 14-bit pair"),
        ("device: x\nmappings:\n  - {note: 1, action: preset, preset: nope}\n", 3, "unknown preset 'nope'"),
        ("device: x\npresets:\n  a: {seed: lots}\nmappings: []\n", 3, "preset 'a': seed: expected a number"),
        ("device: '[x'\nmappings: []\n", 1, "bad regex"),
        ("device: x\nmappings:\n  - {cc: 1, target: reset, mode: absolute}\n", 3, "reset is a trigger"),
        ("device: x\nmappings:\n  - {cc: 1, target: prompt/1/solo, feedback: true}\n", 3, "feedback: true needs"),
        ("device: x\nchannel: 17\nmappings: []\n", 2, "channel must be 1..16"),
        ("device: x\nmappings:\n  - {cc: 1, target: seed}\n  - {cc: 1, target: seed, cc: 2}\n", 4, "duplicate key"),
    ],
)  # fmt: skip
def test_map_errors_name_the_line(reg, text, line, needle):
    with pytest.raises(MapError) as e:
        parse_map(text, reg, "m.yaml")
    assert any(p.startswith(f"m.yaml:{line}:") and needle in p for p in e.value.problems), (
        e.value.problems
    )


def test_all_errors_are_reported_together(reg):
    with pytest.raises(MapError) as e:
        parse_map(
            "device: x\nmappings:\n  - {cc: 200, target: seed}\n  - {cc: 1, target: nope}\n",
            reg,
            "m.yaml",
        )
    assert [p.split(":")[1] for p in e.value.problems] == ["3", "4"]


def feed_gesture(learner, msgs, t0=0.0, dt=0.01):
    for i, m in enumerate(msgs):
        learner.feed(m, t0 + i * dt)
    assert learner.done(t0 + len(msgs) * dt + 1.0)
    return learner.classify()


GESTURES = [
    ("fader", [cc(7, v) for v in range(10, 90, 5)], "prompt/2/weight", {"cc": 7}),
    ("14-bit fader", sum(([cc(1, v), cc(33, 5 * v % 128)] for v in range(10, 40, 3)), []), "kv_bias", {"cc": [1, 33]}),
    ("twos encoder", [cc(16, v) for v in (1, 1, 2, 1, 127, 127)], "seed", {"mode": "relative", "encoding": "twos"}),
    ("offset encoder", [cc(17, v) for v in (65, 65, 66, 65)], "transition/blocks", {"encoding": "offset"}),
    ("nrpn", [cc(99, 1), cc(98, 2), cc(6, 10), cc(38, 3), cc(6, 11), cc(38, 9)], "kv_bias", {"nrpn": 130}),
    ("pad", [mido.Message("note_on", note=36, velocity=90), mido.Message("note_off", note=36)], "prompt/3/solo", {"note": 36}),
    ("button cc", [cc(41, 127), cc(41, 0)], "pause", {"mode": "toggle"}),
]  # fmt: skip


@pytest.mark.parametrize("name,msgs,target,expect", GESTURES, ids=[g[0] for g in GESTURES])
def test_learn_classifies_and_round_trips(reg, tmp_path, name, msgs, target, expect):
    spec = feed_gesture(Learner(), msgs)
    mapping = finish(spec, target, reg)
    for k, v in expect.items():
        assert mapping[k] == v, (name, mapping)
    out = tmp_path / "learned.yaml"
    write_mapping(out, mapping, device_regex("Some Controller:Some Controller MIDI 1 20:0"))
    m = load_map(out, reg)
    assert m.matches("Some Controller:Some Controller MIDI 1 24:0")  # ALSA numbers change
    direct = parse_map(f"device: x\nmappings:\n  - {mapping!r}\n".replace("'", '"'), reg)
    got, want = m.bindings[0], direct.bindings[0]
    assert got.__dict__ | {"source": ""} == want.__dict__ | {"source": ""}
    # and the learned mapping drives the registry the same way the gesture did
    Router(reg, m.bindings).handle(msgs[0])


def test_learn_appends_keeping_comments_and_refuses_flow_lists(reg, tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("# my controller\ndevice: x   # the port\nmappings:\n  - {cc: 1, target: seed}\n")
    write_mapping(f, {"cc": 2, "target": "kv_bias"}, "x")
    text = f.read_text()
    assert text.startswith("# my controller\ndevice: x   # the port\n")
    assert [b.number for b in load_map(f, reg).bindings] == [1, 2]
    g = tmp_path / "flow.yaml"
    g.write_text("device: x\nmappings: [{cc: 1, target: seed}]\n")
    with pytest.raises(MapError, match="flow"):
        write_mapping(g, {"cc": 2, "target": "kv_bias"}, "x")
    h = tmp_path / "late.yaml"
    h.write_text("device: x\nmappings:\n  - {cc: 1, target: seed}\npresets: {}\n")
    with pytest.raises(MapError, match="last section"):
        write_mapping(h, {"cc": 2, "target": "kv_bias"}, "x")


class FakePort:
    """Stands in for a hardware port (cannot exist on CI)."""

    def __init__(self, name, callback=None):
        self.name, self.callback, self.closed, self.sent = name, callback, False, []

    def close(self):
        self.closed = True

    def send(self, msg):
        self.sent.append(msg)


def test_port_watcher_regex_several_ports_and_reconnect():
    present = ["nanoKONTROL2:nanoKONTROL2 MIDI 1 20:0", "Midi Through:Port-0 14:0"]
    opened = []

    def opener(name, callback=None):
        opened.append(FakePort(name, callback))
        return opened[-1]

    got = []
    w = PortWatcher(
        ["nanoKONTROL2", "APC"],
        names=lambda: list(present),
        opener=opener,
        on_message=lambda n, m, t: got.append((n, m.value)),
    )
    assert w.scan() == (["nanoKONTROL2:nanoKONTROL2 MIDI 1 20:0"], [])
    present.append("APC mini mk2:APC mini mk2 Contr 24:0")
    assert w.scan()[0] == ["APC mini mk2:APC mini mk2 Contr 24:0"]  # several at once
    nano = opened[0]
    present.remove(nano.name)  # unplugged
    assert w.scan() == ([], [nano.name]) and nano.closed
    present.append(nano.name)  # plugged back
    assert w.scan() == ([nano.name], [])
    opened[-1].callback(cc(1, 99))
    assert got == [(nano.name, 99)]


def test_bridge_routes_and_refreshes_leds_on_reconnect(reg):
    m = parse_map(
        "device: pad\nmappings:\n  - {note: 1, target: pause, feedback: true}\n"
        "  - {cc: 7, target: prompt/2/weight}\n",
        reg,
    )
    ports = {}

    def opener(name, callback=None):
        ports[(name, callback is None)] = FakePort(name, callback)
        return ports[(name, callback is None)]

    present = ["pad 1"]
    bridge = MidiBridge(
        reg, [m], names=lambda: list(present), output_names=lambda: list(present), opener=opener
    )
    for w in bridge.inputs + bridge.outputs:
        w.scan()
    ports[("pad 1", False)].callback(cc(7, 127))
    assert reg.get("prompt/2/weight") == 1.0
    bridge.feedbacks[0].flush()  # the output opened: LEDs show the state at once
    assert [(x.note, x.velocity) for x in ports[("pad 1", True)].sent] == [(1, 0)]
    ports[("pad 1", False)].callback(mido.Message("note_on", note=1, velocity=100))
    bridge.feedbacks[0].flush()
    assert ports[("pad 1", True)].sent[-1].velocity == 127
    bridge.close()


@pytest.mark.skipif(
    not os.path.exists("/dev/snd/seq"),
    reason="no ALSA sequencer (/dev/snd/seq) on this machine: virtual MIDI ports cannot exist",
)
def test_end_to_end_through_a_virtual_port(reg):
    m = parse_map("device: dd-test-out\nmappings:\n  - {cc: 7, target: prompt/2/weight}\n", reg)
    out = mido.open_output("dd-test-out", virtual=True)
    bridge = MidiBridge(reg, [m], poll=0.1).start()
    try:
        deadline = time.time() + 5
        while not bridge.inputs[0].ports and time.time() < deadline:
            time.sleep(0.05)
        out.send(cc(7, 127))
        while reg.get("prompt/2/weight") != 1.0 and time.time() < deadline:
            time.sleep(0.01)
        assert reg.get("prompt/2/weight") == 1.0
    finally:
        bridge.close()
        out.close()
