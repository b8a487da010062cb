"""Interop with a third-party OSC implementation: liblo's `oscsend` sets values, `oscdump`
receives the feedback (Debian's liblo-tools; .ci/run installs it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest
from osc_helpers import BlockLoop

from bridges.osc.server import OscBridge, OscConfig
from engine.runtime.controls import make_registry

pytestmark = pytest.mark.skipif(
    not (shutil.which("oscsend") and shutil.which("oscdump")),
    reason="liblo-tools (oscsend, oscdump) not installed: apt-get install liblo-tools",
)


def _free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Dump:
    """oscdump in a subprocess; lines collected by a thread."""

    def __init__(self, port: int):
        self.proc = subprocess.Popen(
            ["oscdump", "-L", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            # "<timetag> /address types args..." -> drop the timetag
            self.lines.append(line.split(" ", 1)[1].strip() if " " in line else line.strip())

    def wait(self, text: str, timeout: float = 3.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if line.startswith(text):
                    return line
            time.sleep(0.01)
        raise AssertionError(f"oscdump never printed {text!r}; got {self.lines[-10:]}")

    def close(self):
        self.proc.terminate()
        self.proc.wait(2)


def _oscsend(port: int, address: str, types: str = "", *args: str) -> None:
    subprocess.run(
        ["oscsend", "127.0.0.1", str(port), address, types, *args], check=True, timeout=5
    )


def test_oscsend_sets_values_and_oscdump_gets_feedback():
    reg = make_registry(default_prompt="a forest")
    fb_port = _free_udp_port()
    dump = Dump(fb_port)
    time.sleep(0.2)  # oscdump binds its port
    bridge = OscBridge(
        reg, OscConfig(port=0, feedback_port=fb_port, oscquery_port=None, zeroconf=False)
    ).start()
    loop = BlockLoop(reg, period=0.01)
    try:
        _oscsend(bridge.port, "/dd/seed", "f", "12.7")  # float for an int
        _oscsend(bridge.port, "/dd/prompt/1/text", "s", "neon rain")
        _oscsend(bridge.port, "/dd/steps", "iii", "1000", "600", "200")
        _oscsend(bridge.port, "/dd/prompt/2/weight", "f", "3.0")  # clamped
        _oscsend(bridge.port, "/dd/pause", "T")
        _oscsend(bridge.port, "/dd/nope", "i", "1")
        dump.wait("/dd/seed i 13")
        dump.wait('/dd/prompt/1/text s "neon rain"')
        dump.wait("/dd/steps iii 1000 600 200")
        dump.wait('/dd/warning ss "/dd/prompt/2/weight"')
        dump.wait("/dd/prompt/2/weight f 1.0")
        dump.wait("/dd/pause i 1")
        assert "unknown parameter" in dump.wait('/dd/error ss "/dd/nope"')
        _oscsend(bridge.port, "/dd/get", "s", "/dd/kv_bias")
        dump.wait("/dd/kv_bias f 0.3")
    finally:
        loop.close()
        bridge.close()
        dump.close()
    assert reg.get("seed") == 13 and reg.get("prompt/1/text") == "neon rain"
