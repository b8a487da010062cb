"""The OSC bridge on the live tiny engine (CPU, random weights), started through its
`dreamdeck run` hook: garbage does not stop the frames, controls land in blocks, status
comes from engine.status()."""

from __future__ import annotations

import argparse
import random
import socket
import time

import pytest
from osc_helpers import Listener

from bridges.osc import run_hook
from bridges.osc.wire import encode_message
from engine.runtime.engine import Engine
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import load_preset

PRESET = load_preset("tiny").replace(height=64, width=64, steps=[1000, 750])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run_hook.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_hook_flags():
    a = _args()
    cfg = run_hook.config_from_args(a)
    assert (cfg.host, cfg.port, cfg.feedback_port, cfg.oscquery_port) == (
        "127.0.0.1",
        9137,
        9139,
        9138,
    )
    a = _args(
        "--osc-feedback", "10.0.0.2:7001", "--osc-allow", "10.0.0.5,10.0.0.6", "--no-oscquery"
    )
    cfg = run_hook.config_from_args(a)
    assert cfg.feedback == ("10.0.0.2", 7001) and cfg.allow == {"10.0.0.5", "10.0.0.6"}
    assert cfg.oscquery_port is None
    assert run_hook.start(_args("--no-osc"), engine=None) is None
    for bad in (["--osc-port", "70000"], ["--osc-feedback", "nohost"], ["--osc-allow", "10.0.0.x"]):
        with pytest.raises(SystemExit):
            _args(*bad)


@pytest.fixture(scope="module")
def live():
    engine = Engine(build_pipeline(PRESET), status_interval=None)
    fb = Listener()
    args = _args(
        "--osc-port",
        "0",
        "--osc-feedback-port",
        str(fb.port),
        "--oscquery-port",
        "0",
        "--no-zeroconf",
    )
    bridge = run_hook.start(args, engine)
    bridge.feedback.status_interval = 0.2
    engine.start()
    assert engine.wait_frames(1, timeout=60), "the tiny engine did not start"
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield engine, bridge, fb, client
    client.close()
    bridge.close()
    engine.stop()
    fb.close()


def test_controls_land_in_engine_blocks_and_status_flows(live):
    engine, bridge, fb, client = live
    client.sendto(encode_message("/dd/seed", [1234.4]), ("127.0.0.1", bridge.port))
    fb.wait(lambda a, args: a == "/dd/seed" and args == (1234,), timeout=30)
    assert engine.registry.last_block["seed"] == 1234  # echoed once a block used it
    fb.wait(lambda a, args: a == "/dd/status/state" and args == ("running",), timeout=5)
    _, args = fb.wait(lambda a, args: a == "/dd/status/block", timeout=5)
    assert args[0] >= 0
    assert engine.error is None


def test_engine_keeps_producing_frames_under_garbage(live):
    engine, bridge, fb, client = live
    rnd = random.Random(7)
    start_frames = engine.frames_out
    start_rejected = bridge.stats.rejected
    start_packets = bridge.stats.packets
    sent = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and sent < 6000:
        for _ in range(200):
            n = rnd.choice([1, 4, 9, 16, 64, 300])
            head = rnd.choice([b"", b"/dd/", b"#bundle\x00", b"/dd/seed\x00\x00\x00\x00,"])
            client.sendto(
                head + bytes(rnd.getrandbits(8) for _ in range(n)), ("127.0.0.1", bridge.port)
            )
            sent += 1
        while bridge.stats.packets < start_packets + sent and time.monotonic() < deadline + 5:
            time.sleep(0.002)
    # The engine never stopped, and generated on while the garbage came in.
    assert engine.wait_frames(engine.frames_out + 1, timeout=30)
    assert engine.frames_out > start_frames
    assert engine.error is None and engine.status()["state"] == "running"
    # Every bad datagram answered (a rare mutant may be valid: none of these are).
    end = time.monotonic() + 5
    while len(fb.on("/dd/error")) < bridge.stats.rejected and time.monotonic() < end:
        time.sleep(0.01)
    assert bridge.stats.rejected - start_rejected == sent
    assert sent >= 1000
