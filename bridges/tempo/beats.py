"""Opt-in beat actions: solo the next prompt slot every N bars, a new seed on the bar.

A small thread looks at the grid every 50 ms; once the next bar is closer than the
lead time (engine lookahead + a margin, so the change is in the registry before the
block that must carry it starts), it schedules the actions with ``when=`` that bar.
`tick(now)` does one look and is what tests drive with a simulated clock.
"""

from __future__ import annotations

import logging
import threading

from bridges.tempo.actions import cycle_path
from bridges.tempo.grid import BeatGrid
from engine.runtime.registry import ControlError, Registry

log = logging.getLogger(__name__)


class BeatActions:
    def __init__(
        self, registry: Registry, grid: BeatGrid, *, margin: float = 0.2, interval: float = 0.05
    ):
        self.registry = registry
        self.grid = grid
        self.margin = margin
        self.interval = interval
        self._last_bar: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: float) -> tuple[float, list[str]] | None:
        """Schedule the actions of the coming bar if it is due. Returns (bar time, paths)."""
        reg = self.registry
        cycle, seed = reg.get("beat/cycle_bars"), reg.get("beat/seed_on_bar")
        if not cycle and not seed:
            return None
        b = self.grid.next_boundary("bar", now)
        if b is None or b - now > self.margin + reg.lookahead:
            return None
        bar = round(self.grid.beat_at(b) / self.grid.beats_per_bar)
        if bar == self._last_bar:
            return None
        self._last_bar = bar
        paths = []
        if seed:
            paths.append("seed/random")
        if cycle and bar % cycle == 0:
            p = cycle_path(reg)
            if p is not None:
                paths.append(p)
        if not paths:
            return None
        try:
            reg.set_many([(p, 1) for p in paths], when=b)
        except ControlError as e:  # e.g. too many scheduled changes: skip this bar
            log.warning("beat action skipped: %s", e)
            return None
        return b, paths

    def start(self) -> BeatActions:
        self._thread = threading.Thread(target=self._run, name="dreamdeck-beats", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick(self.registry.clock())
            except Exception:  # noqa: BLE001 - a beat action must not kill the thread
                log.exception("beat actions failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
