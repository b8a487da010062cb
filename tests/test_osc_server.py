"""The OSC bridge over real UDP on loopback, against the real control registry."""

from __future__ import annotations

import inspect
import json
import socket
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from osc_helpers import BlockLoop, Listener

from bridges.osc.addresses import value_to_args
from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_bundle, encode_message
from engine.runtime.controls import make_registry
from engine.runtime.controls import standard_params as make_registry_params
from engine.runtime.registry import ControlError


def _status():
    return {
        "fps": 24.5,
        "block_ms": 480.0,
        "latency_ms": 610.0,
        "block": 7,
        "vram_mb": None,
        "state": "running",
    }


@pytest.fixture
def rig():
    reg = _registry(default_prompt="a forest")
    fb = Listener()
    cfg = OscConfig(
        port=0, feedback_port=fb.port, oscquery_port=None, zeroconf=False, status_interval=0.2
    )
    bridge = OscBridge(reg, cfg, status=_status).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(address, *args):
        client.sendto(encode_message(address, list(args)), ("127.0.0.1", bridge.port))

    def send_raw(data: bytes):
        client.sendto(data, ("127.0.0.1", bridge.port))

    class Rig:
        pass

    r = Rig()
    r.reg, r.fb, r.bridge, r.send, r.send_raw = reg, fb, bridge, send, send_raw
    yield r
    bridge.close()
    fb.close()
    client.close()


def _wait(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.001)


def _handled(r, n):
    """Wait until the bridge has handled n datagrams in total."""
    _wait(lambda: r.bridge.stats.packets >= n)


ASSETS = Path(tempfile.mkdtemp(prefix="dd-osc-assets-"))
(ASSETS / "ref.png").write_bytes(b"not really a png")


def _registry(**kw):
    """The standard registry; with an assets folder where the parameter set takes one."""
    if "assets_dir" in inspect.signature(make_registry_params).parameters:
        kw["assets_dir"] = str(ASSETS)
    return make_registry(**kw)


def _accepts(path, value):
    try:
        _registry().set(path, value)
        return True
    except ControlError:
        return False


def _test_value(p, current):
    """An OSC argument list that changes parameter p, and whether it is a plain value."""
    if p.type == "float":
        lo, hi = p.range or (0.0, 1.0)
        v = lo + 0.25 * (hi - lo)
        v = v if v != current else lo + 0.5 * (hi - lo)
        if not _accepts(p.path, v):  # a validated float (output/fps: 0 or 1..240)
            v = next(c for c in (30.0, 2.0, 0.5) if c != current and _accepts(p.path, c))
        return [v]
    if p.type == "int":
        lo, hi = p.range or (0, 100)
        v = int(lo + 3) if current != int(lo + 3) else int(lo + 2)
        return [float(v) + 0.2]  # a float for an int, as TouchDesigner sends
    if p.type == "bool":
        return [0 if current else 1]
    if p.type == "str":
        if p.choices:
            return [next(c for c in p.choices if c != current)]
        # Validated strings (sources, asset paths): the first candidate the registry takes.
        cands = (f"osc test of {p.path}", "shm:osctest", "ref.png", "@input")
        cands += ("lfo/sine", "kv_bias", "kick-pump")  # modulation slots and presets
        for cand in cands:
            if cand != current and _accepts(p.path, cand):
                return [cand]
        raise AssertionError(f"no test value for {p.path}")
    if p.type == "int_list":
        return [1000, 600, 200]
    if p.type == "json":
        return [json.dumps([["a lighthouse", 0.5], ["fog", 1.0]])]
    if p.type == "trigger":
        return [1.0]
    raise AssertionError(p.type)


def test_every_address_round_trips(rig):
    """Set through OSC -> in the next block's snapshot -> echoed on its address."""
    reg, ref = rig.reg, _registry(default_prompt="a forest")  # ref: the registry alone
    n, block = 0, 0
    fired = []
    reg.subscribe(lambda ch: fired.append(ch.path) if ch.block is None else None)
    for p in list(reg):
        current = reg.get(p.path) if p.stateful else None
        args = _test_value(p, current)
        rig.fb.clear()
        rig.send(p.address, *args)
        n += 1
        _handled(rig, n)
        assert rig.bridge.stats.rejected == 0, (p.address, rig.fb.messages)
        if p.applies == "immediate":
            assert reg.applied(p.path) == bool(args[0]) if p.type == "bool" else True
        block += 1
        moved = set(reg.modulator.last)  # modulated in the last block
        c = reg.begin_block(block)
        expected = ref.set(p.path, args if p.type == "int_list" else args[0]).values
        ref.begin_block(block)
        if p.path == "seed/random":
            expected = {"seed": c["seed"]}
            assert "seed" in c.changed, "a new random seed lands in the next block"
            ref.set("seed", c["seed"])
            ref.begin_block(block)
        if p.type == "trigger" and p.expand is None:
            if p.applies == "immediate":
                assert p.path in fired, p.path  # immediate triggers act at once
            else:
                assert p.path in c.events, p.path
            continue
        for k, v in expected.items():
            assert c[k] == pytest.approx(v), (p.address, k)
        # values a modulation moves (or gives back) are the block's, not the performer's:
        # feedback echoes only the performer's values
        moved |= set(reg.modulator.last)
        changed = {k: v for k, v in c.changed.items() if k not in moved}
        if p.applies == "immediate":
            changed.update({p.path: reg.applied(p.path)})
        assert changed, p.address
        for k, v in changed.items():
            want = tuple(value_to_args(reg.param(k), v))
            rig.fb.wait(
                lambda a, args, k=k, want=want: a == "/dd/" + k and args == pytest.approx(want)
            )
    assert rig.bridge.stats.applied == n


def test_floats_for_ints_clamping_warns_and_lists(rig):
    reg = rig.reg
    rig.send("/dd/seed", 12.6)
    rig.send("/dd/prompt/2/weight", 1.7)  # out of range: clamped, warned, not dropped
    rig.send("/dd/steps", "[1000, 750]")
    _handled(rig, 3)
    c = reg.begin_block(1)
    assert c["seed"] == 13 and c["prompt/2/weight"] == 1.0 and c["steps"] == [1000, 750]
    addr, args = rig.fb.wait(lambda a, args: a == "/dd/warning")
    assert args[0] == "/dd/prompt/2/weight" and "clamped" in args[1]
    rig.fb.wait(lambda a, args: a == "/dd/steps" and args == (1000, 750))
    rig.send("/dd/steps", 1000, 500, 250)  # several int args
    rig.send("/dd/prompt/3/text", "a", "quiet", "lake")  # TD's DAT may split on spaces
    rig.send("/dd/pause", True)  # T/F
    _handled(rig, 6)
    c = reg.begin_block(2)
    assert c["steps"] == [1000, 500, 250] and c["prompt/3/text"] == "a quiet lake"
    assert reg.applied("pause") is True
    rig.fb.wait(lambda a, args: a == "/dd/pause" and args == (1,))


def test_triggers_fire_on_nonzero_only(rig):
    reg = rig.reg
    rig.send("/dd/reset", 0.0)  # TD's pulse release: nothing, and no error
    _handled(rig, 1)
    assert reg.begin_block(1).events == ()
    for arg in ([], [1], [0.5], [True]):
        rig.send("/dd/reset", *arg)
    _handled(rig, 5)
    assert reg.begin_block(2).events == ("reset",)
    assert rig.bridge.stats.rejected == 0
    # An impulse ('I', OSC 1.1) fires too.
    rig.send_raw(b"/dd/reset\x00\x00\x00,I\x00\x00")
    _handled(rig, 6)
    assert reg.begin_block(3).events == ("reset",)


def test_prompt_slots_are_one_based_and_solo(rig):
    reg = rig.reg
    rig.send("/dd/prompt/2/text", "neon city")
    rig.send("/dd/prompt/2/solo", 1)
    _handled(rig, 2)
    c = reg.begin_block(1)
    assert c["prompt/2/text"] == "neon city" and c["prompt/2/weight"] == 1.0
    assert c["prompt/1/weight"] == 0.0
    rig.send("/dd/prompt/0/text", "x")  # 0 is not a slot: 1-based
    rig.send("/dd/prompt", "a desert")
    _handled(rig, 4)
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
    assert args[0] == "/dd/prompt/0/text" and "unknown" in args[1]
    c = reg.begin_block(2)
    assert (
        c["prompt/1/text"] == "a desert"
        and c["prompt/1/weight"] == 1.0
        and c["prompt/2/weight"] == 0.0
    )


def test_bundle_lands_in_one_block_and_bad_bundle_changes_nothing(rig):
    reg = rig.reg
    loop = BlockLoop(reg, period=0.002)
    try:
        for i in range(20):
            data = encode_bundle(
                [
                    ("/dd/seed", [100 + i]),
                    ("/dd/kv_bias", [0.5 + i / 100]),
                    ("/dd/prompt/4/text", [f"b{i}"]),
                ]
            )
            rig.send_raw(data)
            time.sleep(0.001)
        _handled(rig, 20)
        time.sleep(0.02)
    finally:
        loop.close()
    seen = set()
    for c in loop.blocks:
        keys = {"seed", "kv_bias", "prompt/4/text"} & set(c.changed)
        if keys:
            # All three parts of a bundle arrive together, never split over blocks.
            assert keys == {"seed", "kv_bias", "prompt/4/text"}, c.changed
            i = c.changed["seed"] - 100
            assert c.changed["prompt/4/text"] == f"b{i}"
            assert c.changed["kv_bias"] == pytest.approx(0.5 + i / 100)
            seen.add(i)
    assert 19 in seen
    before = reg.snapshot()
    n = rig.bridge.stats.packets
    rig.send_raw(encode_bundle([("/dd/seed", [5]), ("/dd/kv_bias", ["lots"])]))
    _handled(rig, n + 1)
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
    assert args[0] == "/dd/kv_bias" and "not applied" in args[1]
    assert reg.begin_block(99).changed == {} and reg.snapshot() == before


def test_future_timetag_schedules_without_blocking(rig):
    reg = rig.reg
    when = time.time() + 0.3
    rig.send_raw(encode_bundle([("/dd/seed", [777])], when))
    rig.send("/dd/kv_bias", 0.9)  # the receiver is not blocked by the scheduled bundle
    _handled(rig, 2)
    c = reg.begin_block(1)
    assert c["kv_bias"] == pytest.approx(0.9) and c["seed"] == 42
    _wait(lambda: time.time() >= when + 0.01)
    c = reg.begin_block(2)
    assert c["seed"] == 777
    rig.send_raw(encode_bundle([("/dd/seed", [1])], time.time() + 10 * 3600))
    _handled(rig, 3)
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
    assert args[0] == "/dd/seed" and "ahead" in args[1]


def test_get_answers_on_the_address(rig):
    reg = rig.reg
    rig.send("/dd/get", "/dd/prompt/1/text")
    rig.fb.wait(lambda a, args: a == "/dd/prompt/1/text" and args == ("a forest",))
    rig.send("/dd/get", "steps")
    rig.fb.wait(lambda a, args: a == "/dd/steps" and args == tuple(reg.get("steps")))
    rig.send("/dd/get", "/dd/status/fps")
    rig.fb.wait(lambda a, args: a == "/dd/status/fps" and args[0] == pytest.approx(24.5))
    # The answer goes to the asker's host on the port it names.
    other = Listener()
    try:
        rig.send("/dd/get", "/dd/seed", other.port)
        other.wait(lambda a, args: a == "/dd/seed" and args == (42,))
    finally:
        other.close()
    rig.send("/dd/get", "/dd/nothing")
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
    assert args[0] == "/dd/get" and "/dd/nothing" in args[1]


def test_status_is_sent_periodically(rig):
    rig.send("/dd/seed", 1)  # feedback goes to the last sender's host
    for address, value in [
        ("/dd/status/fps", 24.5),
        ("/dd/status/latency", 610.0),
        ("/dd/status/block", 7),
        ("/dd/status/state", "running"),
    ]:
        rig.fb.wait(
            lambda a, args, address=address, value=value: (
                a == address and args[0] == pytest.approx(value)
            )
        )
    assert not rig.fb.on("/dd/status/vram")  # None on CPU: not sent


def test_errors_name_the_address_and_reason(rig):
    cases = [
        (("/dd/seed", "abc"), "/dd/seed", "number"),
        (("/dd/steps", 1000, 1000), "/dd/steps", "decreasing"),
        (("/dd/nope", 1), "/dd/nope", "unknown"),
        (("/other", 1), "/other", "/dd/"),
        (("/dd/seed",), "/dd/seed", "missing"),
        (("/dd/seed", 1, 2), "/dd/seed", "one value"),
        (("/dd/prompts", "[]"), "/dd/prompts", "non-empty"),
        (("/dd/prompt/1/text", "x" * 5000), "/dd/prompt/1/text", "5000"),
    ]
    for msg, address, word in cases:
        rig.fb.clear()
        rig.send(*msg)
        _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
        assert args[0] == address and word in args[1], (msg, args)
    rig.send_raw(b"garbage!")
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error" and args[0] == "?")
    assert rig.reg.begin_block(1).changed == {}


def test_oversized_datagrams_and_too_many_args_are_refused(rig):
    rig.bridge.config.max_datagram = 2048
    rig.send("/dd/prompt/1/text", "y" * 3000)
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error")
    assert args[0] == "?" and "more than 2048" in args[1]
    rig.send("/dd/steps", *range(1000, 900, -1))  # 100 args
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error" and args[0] == "/dd/steps")
    assert "more than 64 arguments" in args[1]


def test_allowlist_refuses_strangers_silently():
    reg = make_registry()
    cfg = OscConfig(port=0, oscquery_port=None, zeroconf=False, allow=frozenset({"10.0.0.5"}))
    bridge = OscBridge(reg, cfg)
    bridge.start()
    try:
        # Loopback is always the machine itself, and allowed.
        bridge.handle_datagram(encode_message("/dd/seed", [5]), ("127.0.0.1", 5000))
        bridge.handle_datagram(encode_message("/dd/seed", [6]), ("10.0.0.9", 5000))
        bridge.handle_datagram(encode_message("/dd/kv_bias", [0.7]), ("10.0.0.5", 5000))
        assert bridge.stats.refused == 1
        c = reg.begin_block(1)
        assert c["seed"] == 5 and c["kv_bias"] == pytest.approx(0.7)
    finally:
        bridge.close()


def test_feedback_echoes_changes_from_elsewhere_to_fixed_target():
    """A fixed --osc-feedback target gets the whole state at start, then every applied
    change, whoever made it (MIDI, a timeline: here the registry directly)."""
    reg = make_registry()
    fb = Listener()
    cfg = OscConfig(port=0, feedback=("127.0.0.1", fb.port), oscquery_port=None, zeroconf=False)
    with OscBridge(reg, cfg).start():
        fb.wait(lambda a, args: a == "/dd/transition/method" and args == ("slerp",))
        reg.set("kv_bias", 0.2)
        reg.begin_block(1)
        fb.wait(lambda a, args: a == "/dd/kv_bias" and args[0] == pytest.approx(0.2))
    fb.close()


def test_flood_last_value_within_one_block_memory_flat(rig):
    """3,000 fader moves paced at up to 1 kHz (a count, not a duration: a loaded machine's
    sender may be slower, the load on the engine is the same): nothing piles up, the last
    value lands in the block after the last message, memory stays flat."""
    reg = rig.reg
    # 16 blocks kept: the loop's own buffer must fill before the first snapshot (each
    # block's controls hold every parameter), so only the engine's growth is measured
    loop = BlockLoop(reg, period=0.02, keep=16)
    _wait(lambda: len(loop.blocks) >= 16)
    try:
        start = time.monotonic()
        i = 0
        tracemalloc.start()
        snap0 = None
        while i < 3000:
            i += 1
            rig.send("/dd/prompt/1/weight", (i % 1000) / 1000)
            rig.send("/dd/seed", i)
            if i == 500:
                snap0 = tracemalloc.take_snapshot()
            time.sleep(max(0.0, start + i / 1000 - time.monotonic()))
        last = i
        _handled(rig, 2 * last)
        handled_at = len(loop.blocks) and loop.blocks[-1].block
        snap1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        _wait(lambda: loop.blocks[-1].block >= handled_at + 2)
    finally:
        loop.close()
    assert rig.bridge.stats.rejected == 0
    blocks = list(loop.blocks)
    first = next(c for c in blocks if c.values["seed"] == last)
    assert first.block <= handled_at + 1  # within one block of the last message
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    top = [str(s) for s in snap1.compare_to(snap0, "lineno")[:8]]
    assert grown < 512 * 1024, f"memory grew by {grown} bytes during the flood: {top}"
    assert reg.pending_count() == 0
    rig.fb.wait(lambda a, args: a == "/dd/seed" and args == (last,))


def test_ignore_timetags_applies_on_arrival():
    reg = make_registry()
    cfg = OscConfig(port=0, oscquery_port=None, zeroconf=False, timetags=False)
    with OscBridge(reg, cfg).start() as bridge:
        bridge.handle_datagram(
            encode_bundle([("/dd/seed", [3])], time.time() + 60), ("127.0.0.1", 1)
        )
        assert reg.begin_block(1)["seed"] == 3


def test_address_patterns_set_every_match_in_one_block(rig):
    """OSC 1.0 address patterns: `*` and `?` within one level, `[..]` classes, `{a,b}`."""
    reg = rig.reg
    rig.send("/dd/prompt/*/weight", 0.5)
    _handled(rig, 1)
    c = reg.begin_block(1)
    assert all(c[f"prompt/{n}/weight"] == 0.5 for n in range(1, 9))
    rig.send("/dd/prompt/{1,3}/weight", 1.0)
    rig.send("/dd/prompt/[!1-7]/weight", 0.0)
    rig.send("/dd/prompt/[4-5]/text", "fog")
    _handled(rig, 4)
    c = reg.begin_block(2)
    assert [c[f"prompt/{n}/weight"] for n in range(1, 9)] == [1, 0.5, 1, 0.5, 0.5, 0.5, 0.5, 0]
    assert c["prompt/4/text"] == c["prompt/5/text"] == "fog" and c["prompt/6/text"] == ""
    rig.fb.clear()
    for bad, word in (
        ("/dd/nothing/*", "matches no parameter"),
        ("/dd/prompt/[1-3/weight", "unclosed"),
        ("/dd/*", ""),  # matches params of other types: "a float" is wrong for some
    ):
        rig.send(bad, 0.25)
        _, args = rig.fb.wait(lambda a, args, bad=bad: a == "/dd/error" and args[0] == bad)
        assert word in args[1]
    assert reg.begin_block(3).changed == {}  # a bad pattern applies nothing
