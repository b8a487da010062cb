"""Problems the engine finds on its own (an output that lost its target, an audio input
gone, a failed recording) reach the controller on `/dd/error` once each, over a real UDP
socket, besides `/dd/status/last_error`."""

from __future__ import annotations

import socket

from bridges.osc import addresses
from bridges.osc.feedback import Feedback
from bridges.osc.wire import decode
from engine.runtime.controls import make_registry


def _errors(rx: socket.socket) -> list[tuple]:
    out = []
    rx.settimeout(0.2)
    while True:
        try:
            data = rx.recv(65536)
        except TimeoutError:
            return out
        out += [m.args for m in decode(data) if m.address == addresses.ERROR]


def test_each_new_engine_problem_is_sent_once_on_dd_error():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    state = {"last_error": None}
    fb = Feedback(
        tx, make_registry(), target=("127.0.0.1", rx.getsockname()[1]), status=lambda: state
    )
    try:
        fb.send_status()
        assert _errors(rx) == []  # no problem, nothing sent
        state["last_error"] = "output shm:dreamdeck: the segment was removed; recreated"
        for _ in range(5):  # the status goes out every second: the error only once
            fb.send_status()
        assert _errors(rx) == [("engine", state["last_error"])]
        state["last_error"] = "audio: input device gone"
        fb.send_status()
        fb.send_status(only="/dd/status/last_error")  # a /dd/get answer is not an event
        assert _errors(rx) == [("engine", "audio: input device gone")]
        state["last_error"] = "x" * 10_000  # bounded, whatever the engine wrote
        fb.send_status()
        (err,) = _errors(rx)
        assert err[0] == "engine" and len(err[1]) == 300
    finally:
        rx.close()
        tx.close()
