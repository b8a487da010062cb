"""`dreamdeck render SHOW --audio TRACK --mod FILE` (tiny model): deterministic (two
renders, identical video), the audio muxed in at the track's rate and length, the
modulated values in the control log so the log replays the same frames without the
track, and a bad track refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from audio_helpers import write_wav

from bridges.timeline import FPS, first_frame
from engine.cli import main
from engine.runtime.control_log import read_control_log

pytestmark = pytest.mark.slow  # five tiny-model renders: about 40 s on two cores

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--no-progress"]
TIMELINE = {
    "version": "2.0",
    "settings": {
        "resolution": {"height": 480, "width": 832},
        "seed": 7,
        "denoisingSteps": [1000, 750],
    },
    "prompts": [
        {"startTime": 0, "endTime": 4.5, "prompts": [{"text": "a koi pond", "weight": 100}]}
    ],
}
KICK = """slots:
  - source: audio/onset/low
    target: kv_bias
    depth: 0.6
    attack: 0
    release: 0.1
  - source: lfo/saw
    target: vace/scale
    rate: 2 bars
    depth: 0.5
"""
RATE = 44100


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def track(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Kicks (low band) in two places only: 1.0 s and 3.3 s."""
    x = np.zeros(int(seconds * RATE))
    n = int(0.08 * RATE)
    kick = np.sin(2 * np.pi * 60 * np.arange(n) / RATE) * np.exp(-np.arange(n) / (0.02 * RATE))
    times = np.array([1.0, 3.3])
    for t in times:
        i = int(t * RATE)
        x[i : i + n] += 0.9 * kick
    return x, times


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio_render")
    show = tmp / "show.json"
    show.write_text(json.dumps(TIMELINE))
    x, kicks = track(4.2)
    wav = write_wav(tmp / "track.wav", x, RATE, channels=2)
    mod = tmp / "kick.yaml"
    mod.write_text(KICK)
    outs = {}
    for name in ("a", "b"):
        outs[name] = tmp / f"{name}.mp4"
        args = [
            "render",
            str(show),
            "-o",
            str(outs[name]),
            *TINY,
            "--audio",
            str(wav),
            "--mod",
            str(mod),
        ]
        assert main(args) == 0
    outs["plain"] = tmp / "plain.mp4"
    assert main(["render", str(show), "-o", str(outs["plain"]), *TINY]) == 0
    outs["replay"] = tmp / "replay.mp4"
    log = outs["a"].with_name("a.controls.jsonl")
    assert main(["render", str(log), "-o", str(outs["replay"]), *TINY]) == 0
    return tmp, outs, wav, x, kicks


def test_two_renders_are_identical_and_the_audio_mattered(renders):
    _, outs, *_ = renders
    a, b, plain = frames_of(outs["a"]), frames_of(outs["b"]), frames_of(outs["plain"])
    assert a.shape == b.shape == plain.shape and a.shape[0] > 40
    assert np.array_equal(a, b)
    assert not np.array_equal(a, plain)


def test_audio_stream_matches_the_track(renders):
    _, outs, _, x, _ = renders
    with av.open(str(outs["a"])) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
        st = c.streams.audio[0]
        assert st.codec_context.sample_rate == RATE and st.codec_context.channels == 2
        decoded = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    # AAC codes whole frames of 1024 samples: the stream ends within one frame of the track
    assert abs(decoded.shape[1] - x.size) < 1024, (decoded.shape, x.size)
    # and it is the track: the kicks are where they were (loudest 10 ms hops)
    env = np.abs(decoded[0, : x.size]).reshape(-1, 441).max(axis=1)
    ref = np.abs(x[: env.size * 441]).reshape(-1, 441).max(axis=1)
    assert np.corrcoef(env, ref)[0, 1] > 0.95


def test_control_log_records_modulated_values_at_the_video_clock(renders):
    _, outs, _, _, kicks = renders
    log = read_control_log(outs["a"].with_name("a.controls.jsonl"))
    kv = [b["values"]["kv_bias"] for b in log.blocks]
    for i, rec in enumerate(log.blocks):
        t0, t1 = first_frame(i) / FPS, first_frame(i + 1) / FPS
        has_kick = any(t0 <= k < t1 for k in kicks)
        if has_kick:  # the block whose own span holds the kick: base 0.3 + 0.6, clamped at 0.9
            assert kv[i] == pytest.approx(0.9, abs=1e-6), (i, kv)
        elif i and not any(first_frame(i - 1) / FPS <= k < t0 for k in kicks):
            assert kv[i] < 0.31, (i, kv)  # no kick in this block or the one before
        # the LFO: a saw over 2 bars (8 beats) at the block's start on the video clock; two
        # kicks are no beat, so the grid is 120 BPM from the track's start
        x = t0 * 2.0 / 8.0
        saw = 2 * (x - np.floor(x)) - 1
        assert rec["values"]["vace/scale"] == pytest.approx(1.0 + 0.5 * saw, abs=1e-9)


def test_control_log_replays_the_same_frames_without_the_track(renders):
    _, outs, *_ = renders
    assert np.array_equal(frames_of(outs["replay"]), frames_of(outs["a"]))
    with av.open(str(outs["replay"])) as c:
        assert not c.streams.audio  # no track given: no audio


def test_bad_track_or_preset_is_refused_and_nothing_written(tmp_path, capsys):
    show = tmp_path / "show.json"
    show.write_text(json.dumps(TIMELINE))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really" * 20)
    out = tmp_path / "out.mp4"
    assert main(["render", str(show), "-o", str(out), *TINY, "--audio", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--audio" in err and "bad.wav: cannot decode audio" in err
    assert not out.exists()
    mod = tmp_path / "m.yaml"
    mod.write_text("slots:\n  - source: lfo/sine\n    target: prompt/1/text\n")
    assert main(["render", str(show), "-o", str(out), *TINY, "--mod", str(mod)]) == 2
    assert f"{mod}:3: " in capsys.readouterr().err and not out.exists()
