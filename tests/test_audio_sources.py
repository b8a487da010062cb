"""Audio sources: raw PCM (formats, torn frames, malformed data), files through PyAV, and
the PortAudio device path, including a device that vanishes and comes back.

No sound card exists on CI machines, so the one thing mocked here is PortAudio itself:
a stand-in `sounddevice` module whose InputStream calls the callback from a thread with
generated audio, and which can be "unplugged". Everything above it (DeviceSource, the
live input thread, the analysis, the bank, the registry) is the real code."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import types

import numpy as np
import pytest
from audio_helpers import clicks, write_wav
from helpers import wait_for

from bridges.audio.live import AudioInput
from bridges.audio.sources import (
    AudioSourceError,
    DeviceSource,
    FileSource,
    PcmFormat,
    StdinSource,
    decode_file,
    find_device,
    parse_pcm_format,
)
from engine.cli import main
from engine.runtime.controls import make_registry


def test_pcm_format_parsing():
    assert parse_pcm_format("f32le:44100:1") == PcmFormat("f32le", 44100, 1)
    assert parse_pcm_format("S16LE") == PcmFormat("s16le", 48000, 2)
    for bad, why in [
        ("", "expected FORMAT"),
        ("mp3", "is not one of"),
        ("s16le:fast", "integers"),
        ("s16le:100", "outside 4000..384000"),
        ("s16le:48000:0", "channels 0"),
        ("s16le:48000:65", "channels 65"),
        ("s16le:1:2:3", "expected FORMAT"),
    ]:
        with pytest.raises(AudioSourceError, match=why):
            parse_pcm_format(bad)


def test_stdin_pcm_formats_against_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1000, 2))
    ref = x.mean(axis=1)
    cases = {
        "s16le": ((x * 32767).astype("<i2"), 1 / 32767),
        "s32le": ((x * 2147483647).astype("<i4"), 1e-6),
        "f32le": (x.astype("<f4"), 1e-6),
        "u8": ((x * 127 + 128).astype("u1"), 1 / 64),
    }
    for fmt, (raw, tol) in cases.items():
        src = StdinSource(PcmFormat(fmt, 48000, 2), io.BytesIO(raw.tobytes()))
        chunks = []
        while (c := src.read(300)) is not None:
            chunks.append(c)
        got = np.concatenate(chunks)
        assert got.shape == (1000,) and np.abs(got - ref).max() < tol, fmt
    # a torn last frame is dropped and counted
    raw = (x[:10] * 32767).astype("<i2").tobytes() + b"\x01\x02\x03"
    src = StdinSource(PcmFormat("s16le", 48000, 2), io.BytesIO(raw))
    assert src.read(100).shape == (10,) and src.read(100) is None and src.torn == 3


@pytest.mark.parametrize(
    "data,why",
    [
        (np.array([0.1, np.nan, 0.2, 0.3], "<f4").tobytes(), "NaN or infinity"),
        (np.array([0.1, np.inf, 0.2, 0.3], "<f4").tobytes(), "NaN or infinity"),
        # s16 noise read as f32: random exponents, far beyond full scale (or NaN)
        (np.random.default_rng(1).integers(-32768, 32767, 256).astype("<i2").tobytes(), "f32le"),
    ],
)
def test_malformed_pcm_is_named_and_the_input_reports_it(data, why):
    src = StdinSource(PcmFormat("f32le", 48000, 1), io.BytesIO(data))
    with pytest.raises(AudioSourceError, match=why):
        src.read(64)
    # through the live input: reported (status, error callback), the registry untouched
    reg = make_registry()
    before = reg.snapshot()
    errors: list[str] = []
    inp = AudioInput(
        lambda: StdinSource(PcmFormat("f32le", 48000, 1), io.BytesIO(data)),
        reg,
        paced=False,
        on_error=errors.append,
    ).start()
    try:
        assert wait_for(lambda: errors, 5.0)
        assert why in errors[0] and reg.modulator.bank.status["audio"].startswith("lost")
    finally:
        inp.close()
    assert reg.snapshot() == before


def test_stdin_end_of_stream_and_torn_frame_reported():
    x, _ = clicks(120, 1.0, 48000)
    raw = (x * 32767).astype("<i2").tobytes() + b"\x07"
    reg = make_registry()
    errors: list[str] = []
    inp = AudioInput(
        lambda: StdinSource(PcmFormat("s16le", 48000, 1), io.BytesIO(raw)),
        reg,
        paced=False,
        on_error=errors.append,
    ).start()
    try:
        assert wait_for(lambda: reg.modulator.bank.status.get("audio") == "stdin: ended", 5.0)
        assert errors and "malformed PCM" in errors[0] and "1 stray bytes" in errors[0]
        assert inp.frames == pytest.approx(x.size / 480, abs=2)
        assert reg.modulator.bank.latest()["audio/count"] >= 1  # the click was heard
    finally:
        inp.close()


def test_files_decode_and_bad_files_are_named(tmp_path):
    x, _ = clicks(120, 1.0, 44100)
    path = write_wav(tmp_path / "t.wav", x, 44100, channels=2)
    y, rate, ch = decode_file(path)
    assert rate == 44100 and ch == 2 and y.shape == (2, x.size)
    assert np.abs(y[0] - x).max() < 1e-4 and np.array_equal(y[0], y[1])
    src = FileSource(path, loop=False)
    n = 0
    while (c := src.read(1000)) is not None:
        n += c.size
    assert n == x.size
    looped = FileSource(path, loop=True)
    got = np.concatenate([looped.read(10000) for _ in range(12)])
    assert got.size > 2 * x.size and np.array_equal(got, np.tile(y.mean(axis=0), 3)[: got.size])
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    (tmp_path / "text.mp3").write_text("not audio")
    for name in ("bad.wav", "text.mp3", "missing.wav"):
        with pytest.raises(AudioSourceError, match=name.replace(".", r"\.")):
            FileSource(tmp_path / name)


# -- PortAudio, mocked (no sound card on CI) ------------------------------------------------
class FakePortAudio:
    """Stands in for the `sounddevice` module: two inputs and an output; streams call the
    callback from a thread with a 120 BPM click track, in 10 ms blocks, in real time."""

    def __init__(self):
        self.plugged = True
        self.streams: list[FakeStream] = []
        self.mod = types.ModuleType("sounddevice")
        self.mod.query_devices = self.query_devices
        self.mod.query_hostapis = lambda: [{"name": "FakeAPI"}]
        self.mod.InputStream = lambda **kw: FakeStream(self, **kw)

    def query_devices(self):
        devs = [
            {
                "name": "Speakers",
                "max_input_channels": 0,
                "default_samplerate": 48000.0,
                "hostapi": 0,
            }
        ]
        if self.plugged:
            devs.append(
                {
                    "name": "Fake Mic",
                    "max_input_channels": 2,
                    "default_samplerate": 48000.0,
                    "hostapi": 0,
                }
            )
        devs.append(
            {
                "name": "Line In",
                "max_input_channels": 1,
                "default_samplerate": 44100.0,
                "hostapi": 0,
            }
        )
        return devs

    def unplug(self):
        self.plugged = False
        for s in self.streams:
            s.vanish()


class FakeStream:
    def __init__(
        self, pa, device, channels, samplerate, blocksize, dtype, callback, finished_callback
    ):
        self.pa, self.cb, self.fin = pa, callback, finished_callback
        self.channels, self.rate, self.block = channels, int(samplerate), blocksize
        if device != 1 or not pa.plugged:
            raise RuntimeError(f"PortAudio: device {device} unavailable")
        self.x, _ = clicks(120, 30.0, self.rate)
        self._stop = threading.Event()
        pa.streams.append(self)

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        i = 0
        while not self._stop.wait(self.block / self.rate):
            chunk = np.repeat(self.x[i : i + self.block, None], self.channels, axis=1)
            i = (i + self.block) % (self.x.size - self.block)
            self.cb(chunk.astype(np.float32), self.block, None, None)

    def vanish(self):
        self._stop.set()
        self.fin()

    def stop(self):
        self._stop.set()

    def close(self):
        self._stop.set()


@pytest.fixture
def portaudio(monkeypatch):
    pa = FakePortAudio()
    monkeypatch.setitem(sys.modules, "sounddevice", pa.mod)
    return pa


def test_devices_listed_and_found(portaudio, capsys):
    assert main(["audio", "devices", "--json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in devs] == ["Fake Mic", "Line In"]  # inputs only
    assert devs[0] == {
        "index": 1,
        "name": "Fake Mic",
        "channels": 2,
        "rate": 48000.0,
        "hostapi": "FakeAPI",
    }
    assert find_device("mic")["index"] == 1 and find_device("2")["name"] == "Line In"
    with pytest.raises(
        AudioSourceError,
        match=r"no audio input device 'Drum Machine' \(inputs: 1: Fake Mic, 2: Line In\)",
    ):
        find_device("Drum Machine")
    with pytest.raises(AudioSourceError, match="not a valid pattern"):
        find_device("[")
    with pytest.raises(AudioSourceError, match="Line In: cannot open"):
        DeviceSource("Line In")  # the (fake) PortAudio refuses it


def test_no_portaudio_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails
    assert main(["audio", "devices"]) == 1
    assert "need sounddevice" in capsys.readouterr().err


def test_device_vanishes_holds_and_comes_back(portaudio):
    reg = make_registry()
    reg.set_many({"mod/1/source": "audio/level", "mod/1/target": "kv_bias", "mod/1/depth": 0.5})
    errors: list[str] = []
    inp = AudioInput(lambda: DeviceSource("Fake Mic"), reg, on_error=errors.append).start()
    bank = reg.modulator.bank
    try:
        assert wait_for(lambda: bank.status.get("audio") == "device:Fake Mic: live", 5.0)
        assert wait_for(lambda: bank.latest().get("audio/count", 0) >= 2, 10.0)  # clicks heard
        time.sleep(0.3)
        live = reg.begin_block(0)["kv_bias"]
        assert live > 0.3
        portaudio.unplug()
        assert wait_for(lambda: any("device gone" in e for e in errors), 5.0)
        assert wait_for(lambda: bank.status["audio"].startswith("waiting"), 5.0)
        assert "no audio input device 'Fake Mic'" in bank.status["audio"]
        bank.drain()
        held = reg.begin_block(1)["kv_bias"]
        time.sleep(0.2)
        assert reg.begin_block(2)["kv_bias"] == held  # the modulation holds its last value
        pushed = bank.pushed
        portaudio.plugged = True
        assert wait_for(lambda: bank.status.get("audio") == "device:Fake Mic: live", 5.0)
        assert wait_for(lambda: bank.pushed > pushed + 20, 5.0)  # values flow again
    finally:
        inp.close()
    assert reg.get("kv_bias") == 0.3


def test_beat_tracker_leads_the_tempo_grid_unless_link_or_clock_does(tmp_path):
    from bridges.tempo.bridge import TempoBridge

    x, times = clicks(100.0, 14.0, 48000)
    wav = write_wav(tmp_path / "c100.wav", x)
    for leader in ("manual", "link"):
        reg = make_registry()
        tempo = TempoBridge(reg, bpm=120.0)
        tempo.grid.source = leader
        inp = AudioInput(lambda: FileSource(wav, loop=False), reg, lead_tempo=True, paced=False)
        inp.start()
        try:
            assert wait_for(lambda inp=inp: inp.state.endswith("ended"), 20.0)
        finally:
            inp.close()
            tempo.close()
        if leader == "link":  # someone else leads: the grid is left alone
            assert tempo.grid.bpm == 120.0 and reg.get("tempo/bpm") == 120.0
            continue
        assert inp.beats > 10
        assert tempo.grid.source == "audio"
        assert tempo.grid.bpm == pytest.approx(100.0, abs=1.0)
        assert reg.get("tempo/bpm") == pytest.approx(100.0, abs=1.0)
