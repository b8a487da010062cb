"""OSC inputs that crashed the handler or flooded the log (issue 14, part 4), over real UDP.

Every rejected message gets a `/dd/error`, whatever failed (the sender's mistake or ours);
a flood of bad datagrams writes a bounded number of log lines, with the rest counted in a
summary.
"""

from __future__ import annotations

import logging
import re
import socket
import time

import pytest
from osc_helpers import BlockLoop, Listener

from bridges.osc.feedback import RateLimitedLog
from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_message
from engine.runtime.controls import standard_params
from engine.runtime.registry import MAX_JSON_DEPTH, Param, Registry


def _boom(value):
    # A parameter whose check fails in a way nobody planned for: stands in for a bug in a
    # validator (a real Param in a real registry, not a mock of the bridge). The default
    # passes, so the registry can be built.
    if value != 0.0:
        raise RuntimeError(f"validator bug on {value!r}")
    return value


class Rig:
    def __init__(self, registry: Registry):
        self.reg = registry
        self.fb = Listener()
        cfg = OscConfig(port=0, feedback_port=self.fb.port, oscquery_port=None, zeroconf=False)
        self.bridge = OscBridge(self.reg, cfg).start()
        self.loop = BlockLoop(self.reg, period=0.01)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    def send(self, data: bytes) -> None:
        self.client.sendto(data, ("127.0.0.1", self.bridge.port))

    def wait_handled(self, n: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while self.bridge.stats.packets < n or len(self.fb.on("/dd/error")) < (
            self.bridge.stats.rejected
        ):
            assert time.monotonic() < end, self.bridge.stats
            time.sleep(0.002)

    def close(self) -> None:
        self.client.close()
        self.loop.close()
        self.bridge.close()
        self.fb.close()


@pytest.fixture
def rig():
    params = list(standard_params())
    params.append(
        Param("debug/boom", "float", 0.0, "a parameter with a buggy check", validate=_boom)
    )
    r = Rig(Registry(params))
    yield r
    r.close()


def _error_for(rig: Rig, address: str, timeout: float = 5.0) -> str:
    _, args = rig.fb.wait(lambda a, args: a == "/dd/error" and args[0] == address, timeout)
    return args[1]


def test_deeply_nested_json_is_answered_and_changes_nothing(rig):
    before = rig.reg.get("prompt/1/text")
    for depth in (MAX_JSON_DEPTH + 1, 5000, 16000):
        rig.send(encode_message("/dd/prompts", ["[" * depth + "]" * depth]))
        assert "nested" in _error_for(rig, "/dd/prompts")
        rig.fb.clear()
    rig.send(encode_message("/dd/prompts", ["[" * 30000]))  # unbalanced as well
    assert "nested" in _error_for(rig, "/dd/prompts")
    rig.send(encode_message("/dd/steps", ["[" * 4000]))  # the other JSON-parsing type
    assert "nested" in _error_for(rig, "/dd/steps")
    assert rig.reg.get("prompt/1/text") == before
    # Nesting that a prompt set really uses still works.
    rig.send(encode_message("/dd/prompts", ['[["a forest", 1.0], ["fog", 0.5]]']))
    rig.fb.wait(lambda a, args: a == "/dd/prompt/2/text" and args == ("fog",), timeout=5)


def test_reversed_range_is_answered(rig):
    rig.send(encode_message("/dd/prompt/[9-1]/weight", [0.5]))
    assert "reversed range '9-1'" in _error_for(rig, "/dd/prompt/[9-1]/weight")


def test_an_internal_failure_is_answered_too(rig):
    """A bug of ours (a validator raising RuntimeError) reaches the sender as /dd/error,
    and the receiver goes on."""
    rig.send(encode_message("/dd/debug/boom", [1.0]))
    assert "internal error (RuntimeError" in _error_for(rig, "/dd/debug/boom")
    rig.send(encode_message("/dd/seed", [31]))
    rig.fb.wait(lambda a, args: a == "/dd/seed" and args == (31,), timeout=5)


BAD = [
    encode_message("/dd/prompts", ["[" * 20000 + "]" * 20000]),
    encode_message("/dd/prompt/[9-1]/weight", [0.5]),
    encode_message("/dd/debug/boom", [1.0]),
    encode_message("/dd/no/such/address", [1]),
    encode_message("/dd/seed", ["not a number"]),
    encode_message("/dd/" + "*" * 40 + "/x", [1.0]),
    b"/dd/\x00\x00\x00\x00garbage",
]


def test_five_thousand_bad_datagrams_write_a_bounded_log(rig):
    """Each of 5,000 bad datagrams is answered; the log gets a bounded number of lines,
    and the summary lines account for every one that was not logged."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    osc_log = logging.getLogger("bridges.osc")
    osc_log.addHandler(handler)
    old_level = osc_log.level
    osc_log.setLevel(logging.WARNING)
    try:
        n = 5000
        for i in range(n):
            rig.send(BAD[i % len(BAD)])
            if i % 200 == 199:
                rig.wait_handled(i + 1)
        rig.wait_handled(n)
        assert rig.bridge.stats.rejected == n
        assert len(rig.fb.on("/dd/error")) == n  # every one answered over UDP
        rig.bridge.feedback.limiter.flush(force=True)
    finally:
        osc_log.removeHandler(handler)
        osc_log.setLevel(old_level)
    text = [r.getMessage() for r in records]
    size = sum(len(t) for t in text) + sum(
        len(logging.Formatter().formatException(r.exc_info)) for r in records if r.exc_info
    )
    assert len(records) < 100, text[:5]
    assert size < 64 * 1024
    limiter = rig.bridge.feedback.limiter
    summarised = sum(int(m.group(1)) for t in text if (m := re.search(r"(\d+) more messages", t)))
    assert summarised == limiter.total_suppressed > 0
    # Each datagram went through the limiter at least once (internal errors twice).
    assert limiter.total_logged + limiter.total_suppressed >= n
    # The engine kept applying good messages at the end.
    rig.send(encode_message("/dd/seed", [4321]))
    rig.fb.wait(lambda a, args: a == "/dd/seed" and args == (4321,), timeout=5)


def test_rate_limited_log_counts_repeats_and_summarises_at_the_window_end():
    """The limiter alone, with a fake clock (time is the input here, not a mock of I/O)."""
    now = [0.0]
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.ratelimit")
    logger.propagate = False
    logger.addHandler(Keep())
    lim = RateLimitedLog(logger, burst=3, window=5.0, clock=lambda: now[0])
    for _ in range(100):
        lim.log("same")
    for i in range(10):
        lim.log(f"distinct {i}")
    assert lines == ["same", "distinct 0", "distinct 1"]
    now[0] = 6.0
    lim.flush()
    assert len(lines) == 4 and "107 more messages" in lines[3] and "100x same" in lines[3]
    lim.log("same")  # a new window: logged again
    assert lines[-1] == "same" and lim.total_suppressed == 107 and lim.total_logged == 4


def test_addresses_are_case_sensitive_with_a_hint(rig):
    """OSC is case-sensitive, and so is dreamdeck (docs/osc.md says so): `/dd/SEED` is an
    unknown address whose error points at the lower-case one; nothing changes."""
    rig.send(encode_message("/dd/SEED", [5]))
    reason = _error_for(rig, "/dd/SEED")
    assert "case-sensitive" in reason and "/dd/seed?" in reason
    rig.send(encode_message("/dd/Prompt/1/Weight", [0.5]))
    assert "/dd/prompt/1/weight?" in _error_for(rig, "/dd/Prompt/1/Weight")
    rig.send(encode_message("/dd/get", ["SEED"]))
    assert "case-sensitive" in _error_for(rig, "/dd/get")
    assert rig.reg.get("seed") == 42
    rig.send(encode_message("/dd/seed", [5]))
    rig.fb.wait(lambda a, args: a == "/dd/seed" and args == (5,), timeout=5)


def test_json_depth_check_agrees_with_the_parsed_depth():
    """Property: random JSON (lists, objects, strings full of brackets and escapes) is
    refused exactly when its real nesting, measured on the parsed value, exceeds the limit."""
    import json
    import random

    from engine.runtime.registry import ControlError, _check_json_depth

    rnd = random.Random(7)

    def build(depth: int):
        if depth == 0:
            return rnd.choice(["[", "]{", '\\"[', "x", 1, None, ""])
        kids = [build(depth - 1)] + [
            build(rnd.randrange(min(depth, 3))) for _ in range(rnd.randrange(3))
        ]
        rnd.shuffle(kids)
        return kids if rnd.random() < 0.5 else {f"k{i}[": k for i, k in enumerate(kids)}

    def real_depth(v) -> int:
        if isinstance(v, list):
            return 1 + max((real_depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((real_depth(x) for x in v.values()), default=0)
        return 0

    for _ in range(400):
        value = build(rnd.randint(0, 24))
        text = json.dumps(value)
        deep = real_depth(value) > MAX_JSON_DEPTH
        try:
            _check_json_depth("prompts", text)
            refused = False
        except ControlError:
            refused = True
        assert refused == deep, (real_depth(value), text[:200])
