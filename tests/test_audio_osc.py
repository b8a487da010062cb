"""Audio over OSC (real UDP sockets, a real OSC bridge, a real audio input playing a
click file): meters on /dd/status/audio/*, the input's state, each slot's source value;
`/dd/mod/load` loads a preset or answers /dd/error and changes nothing; our own meters
looped back are ignored, not answered."""

from __future__ import annotations

import socket

import numpy as np
from audio_helpers import clicks, write_wav
from helpers import wait_for
from osc_helpers import Listener

from bridges.audio.live import AudioInput
from bridges.audio.sources import FileSource
from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_message
from engine.runtime.controls import make_registry


def test_meters_state_and_mod_load_over_osc(tmp_path):
    reg = make_registry()
    fb = Listener()
    cfg = OscConfig(port=0, feedback=("127.0.0.1", fb.port), oscquery_port=None, zeroconf=False)
    bridge = OscBridge(reg, cfg).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(address, *args):
        client.sendto(encode_message(address, list(args)), ("127.0.0.1", bridge.port))

    x, _ = clicks(120.0, 4.0, 48000)
    inp = AudioInput(lambda: FileSource(write_wav(tmp_path / "c.wav", x)), reg)
    try:
        send("/dd/mod/load", "kick-pump")
        assert wait_for(lambda: reg.get("mod/1/source") == "audio/onset/low", 3.0)
        reg.begin_block(0)
        before = reg.snapshot()
        send("/dd/mod/load", "../../secrets")
        err = fb.wait(lambda a, args: a == "/dd/error", 3.0)
        assert err[1][0] == "/dd/mod/load" and "a preset name" in err[1][1]
        send("/dd/mod/1/target", "prompt/1/text")
        err = fb.wait(lambda a, args: a == "/dd/error" and args[0] == "/dd/mod/1/target", 3.0)
        assert "not a numeric parameter" in err[1][1]
        assert reg.snapshot() == before and reg.pending_count() == 0
        assert not fb.on("/dd/status/audio/rms")  # no audio yet: no meters
        inp.start()
        fb.wait(
            lambda a, args: (
                a == "/dd/status/audio" and args[0] == f"file:{tmp_path / 'c.wav'}: live"
            ),
            5.0,
        )
        fb.wait(lambda a, args: a == "/dd/status/audio/count" and args[0] >= 2, 5.0)
        for k in (
            "rms",
            "level",
            "low",
            "lowmid",
            "highmid",
            "high",
            "onset/low",
            "beat",
            "count/high",
            "bpm",
        ):
            vals = fb.on(f"/dd/status/audio/{k}")
            assert vals and all(isinstance(v[0], float) for v in vals), k
        levels = np.array([v[0] for v in fb.on("/dd/status/audio/level")])
        assert levels.min() >= 0 and levels.max() <= 1 and levels.max() > 0.3
        # a slot's source value appears once blocks run
        reg.begin_block(1)
        fb.wait(lambda a, args: a == "/dd/status/mod/1", 3.0)
        # our meters looped back to the bridge are ignored: no errors for them
        errors = len(fb.on("/dd/error"))
        send("/dd/status/audio/rms", 0.5)
        send("/dd/status/mod/1", 0.5)
        send("/dd/nope", 1)  # a marker that is answered
        fb.wait(lambda a, args: a == "/dd/error" and args[0] == "/dd/nope", 3.0)
        assert len(fb.on("/dd/error")) == errors + 1
    finally:
        inp.close()
        bridge.close()
        fb.close()
        client.close()
