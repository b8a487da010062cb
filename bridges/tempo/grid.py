"""The beat grid: where beats and bars fall in wall-clock time, and the quantizer.

One `BeatGrid` holds the tempo and the phase as a line: beat ``b0`` falls at time ``t0``
and beats go by at ``bpm``. Whoever leads the tempo (manual BPM, tap, MIDI clock, Link)
moves that line; everything that needs a boundary (quantised changes, beat actions)
reads it. Times are on the registry's clock (``time.time()`` unless a test injects one),
so a boundary can be handed straight to ``registry.set(..., when=)``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from engine.runtime.registry import Registry

#: Quantise modes and their length in bars (``beat`` is one beat, whatever the metre).
MODE_BARS = {"bar": 1, "2bar": 2, "4bar": 4}
MODES = ("off", "beat", *MODE_BARS)
_EPS = 1e-9  # a time exactly on a boundary is that boundary, not the next one


class BeatGrid:
    """Thread-safe tempo and phase. ``running`` is False while a MIDI clock is stopped:
    then there is no grid to land on, and quantised changes go out at the next block."""

    def __init__(
        self,
        bpm: float = 120.0,
        *,
        beats_per_bar: int = 4,
        clock: Callable[[], float] = time.time,
    ):
        if not 20.0 <= bpm <= 300.0:
            raise ValueError(f"tempo {bpm} BPM is outside 20..300")
        if beats_per_bar < 1:
            raise ValueError(f"beats_per_bar must be at least 1, got {beats_per_bar}")
        self._lock = threading.Lock()
        self.clock = clock
        self.beats_per_bar = beats_per_bar
        self._bpm = float(bpm)
        self._t0 = clock()
        self._b0 = 0.0
        self.running = True
        self.source = "manual"  # manual | clock | link: who moved the grid last

    @property
    def bpm(self) -> float:
        return self._bpm

    def beat_at(self, now: float | None = None) -> float:
        """Beat position (0 = the first downbeat) at time `now`."""
        now = self.clock() if now is None else now
        with self._lock:
            return self._b0 + (now - self._t0) * self._bpm / 60.0

    def time_of(self, beat: float) -> float:
        with self._lock:
            return self._t0 + (beat - self._b0) * 60.0 / self._bpm

    def set_tempo(self, bpm: float, now: float | None = None) -> None:
        """Change tempo keeping the phase continuous: the beat position at `now` stays put."""
        if not (math.isfinite(bpm) and 20.0 <= bpm <= 300.0):
            raise ValueError(f"tempo {bpm} BPM is outside 20..300")
        now = self.clock() if now is None else now
        with self._lock:
            self._b0 += (now - self._t0) * self._bpm / 60.0
            self._t0 = now
            self._bpm = float(bpm)

    def sync(self, bpm: float, beat: float, at: float, source: str) -> None:
        """An external source says: beat `beat` falls at time `at`, at `bpm`."""
        if not (math.isfinite(bpm) and bpm > 0):
            raise ValueError(f"bad tempo {bpm!r}")
        with self._lock:
            self._bpm, self._b0, self._t0 = float(bpm), float(beat), float(at)
            self.source = source

    def align(self, beat: float, at: float) -> None:
        """Put beat `beat` at time `at`, same tempo (tap tempo puts a beat on the tap)."""
        with self._lock:
            self._b0, self._t0 = float(beat), float(at)

    def next_boundary(self, mode: str, now: float | None = None) -> float | None:
        """The first `mode` boundary at or after `now` (a time), or None when `mode` is
        off or the grid is stopped. Bars count from beat 0, so 2bar/4bar phrases line up
        with the leader's downbeat."""
        if mode not in MODES:
            raise ValueError(f"quantize mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "off" or not self.running:
            return None
        unit = 1 if mode == "beat" else MODE_BARS[mode] * self.beats_per_bar
        now = self.clock() if now is None else now
        b = self.beat_at(now)
        k = math.ceil(b / unit - _EPS) * unit
        return max(self.time_of(k), now)

    def bar_index(self, at: float) -> int:
        """The bar a time falls in (a time on a downbeat belongs to the bar it starts)."""
        return math.floor(self.beat_at(at) / self.beats_per_bar + _EPS)


def make_quantizer(registry: Registry, grid: BeatGrid) -> Callable[[], float | None]:
    """The function installed as ``registry.quantizer``: next boundary for the registry's
    ``quantize`` mode on the registry's clock, None when off or without a running grid."""

    def quantizer() -> float | None:
        return grid.next_boundary(registry.get("quantize"), registry.clock())

    return quantizer
