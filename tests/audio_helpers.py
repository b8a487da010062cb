"""Audio the tests make themselves: click tracks, band-limited bursts, silence, noise,
written as real WAV files (the stdlib `wave` writer) and as raw PCM."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def clicks(bpm: float, seconds: float, rate: int = 48000, start: float = 0.25, seed: int = 0):
    """Short decaying noise clicks on every beat. Returns (mono float samples, click times)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * rate))
    times = np.arange(start, seconds - 0.1, 60.0 / bpm)
    n = int(0.003 * rate)
    env = np.exp(-np.arange(n) / (n / 4))
    for t in times:
        i = int(round(t * rate))
        x[i : i + n] += 0.8 * rng.standard_normal(n) * env
    return np.clip(x, -1, 1), times


def band_noise(lo: float, hi: float, seconds: float, rate: int = 48000, seed: int = 1):
    """Noise with energy only between lo and hi Hz, raised-cosine ramps of 5 ms (abrupt
    edges would be broadband clicks), peak 0.5."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    spec[(f < lo) | (f > hi)] = 0
    y = np.fft.irfft(spec, n)
    r = int(0.005 * rate)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, r))
    y[:r] *= ramp
    y[-r:] *= ramp[::-1]
    return 0.5 * y / np.abs(y).max()


def write_wav(path: Path, x: np.ndarray, rate: int = 48000, channels: int = 1) -> Path:
    s = (np.clip(x, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        s = np.repeat(s[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(s.tobytes())
    return path


def s16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
