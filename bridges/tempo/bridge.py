"""The tempo bridge: one beat grid led by manual BPM / tap, MIDI clock or Link, the
quantizer installed on the registry, and the beat actions.

Who leads: Link when enabled (a BPM set from OSC/MIDI is proposed to the Link session),
else a running MIDI clock, else ``tempo/bpm`` and tap. The followed tempo is written
back to ``tempo/bpm`` (at most 4 times a second, in 0.1 BPM steps) so OSC feedback and
controllers show it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from bridges.tempo.beats import BeatActions
from bridges.tempo.clock import MidiClock
from bridges.tempo.grid import BeatGrid, make_quantizer
from bridges.tempo.tap import TapTempo
from engine.runtime.registry import Change, Registry

log = logging.getLogger(__name__)


class TempoBridge:
    def __init__(
        self,
        registry: Registry,
        *,
        bpm: float | None = None,
        beats_per_bar: int = 4,
        quantize: str | None = None,
        beat_actions: bool = True,
    ):
        self.registry = registry
        if bpm is not None:
            registry.set("tempo/bpm", bpm)
        if quantize is not None:
            registry.set("quantize", quantize)
        self.grid = BeatGrid(
            registry.get("tempo/bpm"), beats_per_bar=beats_per_bar, clock=registry.clock
        )
        self.tap = TapTempo()
        self.clock: MidiClock | None = None
        self.link = None
        self._echo = threading.local()  # set while we write the followed tempo back
        self._shown = (registry.get("tempo/bpm"), 0.0)  # (value, monotonic time)
        registry.quantizer = make_quantizer(registry, self.grid)
        registry.tempo_grid = self.grid  # LFOs and the audio beat tracker use the same grid
        self._unsubscribe = registry.subscribe(self._on_change)
        self.beats = BeatActions(registry, self.grid) if beat_actions else None
        self._closers: list[Any] = []

    # -- sources ----------------------------------------------------------------------
    def use_midi_clock(self) -> MidiClock:
        """Make a MIDI clock follower; feed it with `feed_midi(msg, t)`."""
        self.clock = MidiClock(self.grid, on_tempo=self._followed)
        return self.clock

    def use_link(self) -> Any:
        from bridges.tempo.link import LinkTempo

        self.link = LinkTempo(self.grid, self.registry.get("tempo/bpm"), on_tempo=self._followed)
        self.link.start()
        self._closers.append(self.link)
        return self.link

    def feed_midi(self, msg: Any, t: float | None = None) -> bool:
        if self.clock is None:
            return False
        return self.clock.feed(msg, self.registry.clock() if t is None else t)

    def start(self) -> TempoBridge:
        if self.beats is not None:
            self.beats.start()
        return self

    # -- registry side ----------------------------------------------------------------
    def _followed(self, bpm: float) -> None:
        """An external source moved the tempo: show it in ``tempo/bpm`` (throttled)."""
        shown, at = self._shown
        now = time.monotonic()
        if abs(bpm - shown) < 0.05 or now - at < 0.25:
            return
        value = round(min(max(bpm, 20.0), 300.0), 1)
        self._shown = (value, now)
        self._echo.active = True
        try:
            self.registry.set("tempo/bpm", value)
        finally:
            self._echo.active = False

    def _clock_leads(self) -> bool:
        return self.clock is not None and self.clock.running and self.clock.bpm is not None

    def _on_change(self, change: Change) -> None:
        if change.path == "tempo/bpm":
            if getattr(self._echo, "active", False):
                return
            if self.link is not None:
                self.link.set_tempo(change.value)
            elif self._clock_leads():
                log.info("MIDI clock leads the tempo; %s BPM ignored", change.value)
            else:
                self.grid.set_tempo(change.value, self.registry.clock())
                self.grid.source = "manual"
        elif change.path == "tempo/tap":
            t = self.registry.clock()
            bpm = self.tap.tap(t)
            if bpm is None:
                return
            if self.link is None and not self._clock_leads():
                self.registry.set("tempo/bpm", round(min(max(bpm, 20.0), 300.0), 2))
                # the tap is a beat: put the nearest beat on it
                self.grid.align(round(self.grid.beat_at(t)), t)
            elif self.link is not None:
                self.link.set_tempo(bpm)

    def close(self) -> None:
        self._unsubscribe()
        if self.registry.quantizer is not None:
            self.registry.quantizer = None
        if getattr(self.registry, "tempo_grid", None) is self.grid:
            self.registry.tempo_grid = None
        if self.beats is not None:
            self.beats.close()
        for c in self._closers:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - shutting down: log and go on
                log.exception("closing %r failed", c)
