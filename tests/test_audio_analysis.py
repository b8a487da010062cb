"""Audio analysis on generated tracks: `dreamdeck audio analyze` finds the tempo (±1 BPM)
and the clicks (≥95 % within one hop), bursts land in their band, silence and noise have
no beat; the live beat tracker follows a click track; streaming in any chunk sizes
equals one pass; bad files and settings get clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from audio_helpers import band_noise, clicks, write_wav

from bridges.audio.analysis import (
    AnalysisError,
    Analyzer,
    BeatTracker,
    analyze,
    check_bands,
    hop_for,
)
from engine.cli import main

RATE = 48000


def analyze_cli(capsys, path, *extra) -> dict:
    assert main(["audio", "analyze", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("bpm,rate", [(120.0, 48000), (174.0, 44100)])
def test_click_track_tempo_and_clicks(tmp_path, capsys, bpm, rate):
    x, times = clicks(bpm, 16.0, rate)
    path = write_wav(tmp_path / f"c{bpm:g}.wav", x, rate, channels=2)
    out = analyze_cli(capsys, path)
    assert out["rate"] == rate and out["channels"] == 2
    assert abs(out["duration"] - x.size / rate) < 1e-3
    hop = out["hop_s"]
    assert hop <= 0.012
    assert out["tempo"] == pytest.approx(bpm, abs=1.0)
    onsets = np.array(out["onsets"])
    found = [np.min(np.abs(onsets - t)) <= hop + 1e-9 for t in times]
    assert np.mean(found) >= 0.95, f"{np.mean(found):.0%} of clicks found within a hop"
    assert len(onsets) <= len(times) + 1  # no false onsets between clicks
    # beats: one per click (within one hop), none invented inside the track
    beats = np.array([b for b in out["beats"] if b <= times[-1] + hop])
    assert len(beats) == pytest.approx(len(times), abs=1)
    near = [np.min(np.abs(times - b)) <= hop + 1e-9 for b in beats]
    assert np.mean(near) >= 0.95


BANDS = [("low", 50, 120), ("lowmid", 250, 600), ("highmid", 1200, 3000), ("high", 6000, 12000)]


def test_bursts_land_in_their_band(tmp_path, capsys):
    """Four bursts, one per band, 0.4 s apart: each raises its own band, and the first
    onset of each burst is reported in its band."""
    parts, starts = [np.zeros(RATE // 2)], []
    for i, (_, lo, hi) in enumerate(BANDS):
        starts.append(sum(p.size for p in parts) / RATE)
        parts += [band_noise(lo, hi, 0.3, RATE, seed=i), np.zeros(int(0.4 * RATE))]
    x = np.concatenate(parts)
    out = analyze_cli(capsys, write_wav(tmp_path / "bursts.wav", x))
    summary, frames = analyze(x, RATE)
    t = np.array([f.time for f in frames])
    levels = np.array([f.bands for f in frames])
    names = [b["name"] for b in out["bands"]]
    assert names == [b[0] for b in BANDS]
    for i, (name, _, _) in enumerate(BANDS):
        inside = (t > starts[i] + 0.05) & (t < starts[i] + 0.25)
        mean = levels[inside].mean(axis=0)
        assert int(np.argmax(mean)) == i, (name, mean)
        assert mean[i] > 0.5 and np.delete(mean, i).max() < 0.2, (name, mean)
        first = min(
            (o, k)
            for k, b in enumerate(names)
            for o in out["band_onsets"][b]
            if o >= starts[i] - 0.02
        )
        assert first[1] == i and abs(first[0] - starts[i]) <= 0.02, (name, first)


def test_silence_and_noise_have_no_beat(tmp_path, capsys):
    out = analyze_cli(capsys, write_wav(tmp_path / "silence.wav", np.zeros(RATE * 8)))
    assert out["tempo"] is None and out["beats"] == [] and out["onsets"] == []
    assert all(b["max"] == 0 for b in out["bands"]) and out["rms"]["max_level"] == 0
    noise = 0.3 * np.random.default_rng(3).standard_normal(RATE * 8)
    out = analyze_cli(capsys, write_wav(tmp_path / "noise.wav", noise))
    assert out["tempo"] is None and out["beats"] == []
    assert len(out["onsets"]) <= 4  # steady noise is not a stream of attacks
    # white noise: equal energy per Hz, so the wider (higher) bands hold more
    means = [b["mean"] for b in out["bands"]]
    assert means == sorted(means) and means[0] > 0.3


def test_streaming_in_any_chunks_equals_one_pass():
    x, _ = clicks(128, 4.0, RATE)
    one = Analyzer(RATE).feed(x)
    rng = np.random.default_rng(5)
    a, chunked, i = Analyzer(RATE), [], 0
    while i < x.size:
        n = int(rng.integers(0, 3000))
        chunked += a.feed(x[i : i + n])
        i += n
    assert len(one) == len(chunked) == x.size // a.hop - 1
    for f, g in zip(one, chunked, strict=True):
        assert f.time == g.time and f.onset == g.onset
        np.testing.assert_array_equal(f.bands, g.bands)
        np.testing.assert_array_equal(f.onsets, g.onsets)


@pytest.mark.parametrize("bpm", [120.0, 174.0])
def test_live_beat_tracker_follows_clicks(bpm):
    """The causal tracker, fed hop by hop: after a few seconds its tempo is within 1 BPM
    and its beats fall on the clicks (within a hop)."""
    x, times = clicks(bpm, 16.0, RATE)
    a = Analyzer(RATE)
    bt = BeatTracker(a.fps)
    beats = []
    for i in range(0, x.size, 960):
        for f in a.feed(x[i : i + 960]):
            if bt.push(f.envelope):
                beats.append(f.time)
    assert bt.locked and bt.bpm == pytest.approx(bpm, abs=1.0)
    late = np.array([b for b in beats if 6.0 < b < times[-1]])
    expected = np.sum((times > 6.0) & (times < times[-1]))
    assert len(late) == pytest.approx(expected, abs=1)
    assert all(np.min(np.abs(times - b)) <= 1.5 * a.hop / RATE for b in late)


def test_live_beat_tracker_stays_unlocked_on_noise_and_silence():
    a = Analyzer(RATE)
    bt = BeatTracker(a.fps)
    x = np.concatenate(
        [np.zeros(RATE * 4), 0.3 * np.random.default_rng(2).standard_normal(RATE * 6)]
    )
    beats = sum(bt.push(f.envelope) for f in a.feed(x))
    assert beats == 0 and not bt.locked


def test_bad_input_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + b"\x00garbage" * 50)
    assert main(["audio", "analyze", str(bad), "--json"]) == 2
    assert "bad.wav: cannot decode audio" in capsys.readouterr().err
    assert main(["audio", "analyze", str(tmp_path / "none.wav")]) == 2
    assert "none.wav: no such file" in capsys.readouterr().err
    good = write_wav(tmp_path / "g.wav", np.zeros(RATE))
    assert main(["audio", "analyze", str(good), "--bands", "30,20,800,4000"]) == 2
    assert "edges must increase" in capsys.readouterr().err
    assert main(["audio", "analyze", str(good), "--bands", "30,x"]) == 2
    with pytest.raises(AnalysisError, match="not below Nyquist"):
        check_bands([30, 150, 800, 30000], 48000)
    with pytest.raises(AnalysisError, match="4 to 16"):
        check_bands([30, 150], 48000)
    for rate in (0, 100, 10**7, 44100.5):
        with pytest.raises(AnalysisError, match="sample rate"):
            hop_for(rate)
    # NaN / inf samples are not allowed to poison the analysis state
    a = Analyzer(RATE)
    frames = a.feed(np.full(RATE // 10, np.nan))
    frames += a.feed(np.zeros(RATE // 10))
    assert all(np.isfinite(f.envelope) and np.all(np.isfinite(f.bands)) for f in frames)
