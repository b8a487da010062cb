"""The live audio input: a thread reading a source, analysing it and writing the features
into the modulation layer's `SourceBank`, so the generation thread never waits for audio.

- Paced: a file or a pipe faster than real time is played at real time (a pipe then
  pushes back), so `cat track.s16 | dreamdeck run --audio -` behaves like a live input.
- A source that fails (a device unplugged, a pipe closed) is reported in the bank's
  status (``/dd/status/audio``) and as the engine's last error; the modulations it fed
  hold their last value (nothing new arrives), and the thread reopens the source once a
  second until it comes back. Stdin at its end stays ended (it cannot come back).
- With ``lead_tempo``, the beat tracker moves the tempo grid (when no Link or MIDI clock
  leads it): a beat puts the grid's nearest beat on it, at the tracked tempo.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bridges.audio.analysis import DEFAULT_BANDS, Analyzer, BeatTracker, Frame
from bridges.audio.sources import AudioSourceError

log = logging.getLogger(__name__)

READ_S = 0.05  # seconds of audio per read: analysed in one batch (cheaper than hop by hop)
RETRY_S = 1.0


class Features:
    """Analysis frames -> the bank's named values (``audio/rms``, ``audio/low``,
    ``audio/onset/low``, ``audio/count/low``, ``audio/beat``, ...), with the counters."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.counts = np.zeros(len(names), np.int64)
        self.count = 0
        self.beats = 0

    def keys(self) -> list[str]:
        k = ["audio/rms", "audio/level", "audio/onset", "audio/beat", "audio/count"]
        k += ["audio/beats", "audio/bpm"]
        for n in self.names:
            k += [f"audio/{n}", f"audio/onset/{n}", f"audio/count/{n}"]
        return k

    def values(self, f: Frame, beat: bool, bpm: float | None) -> dict[str, float]:
        self.counts += f.onsets
        self.count += int(f.onset)
        self.beats += int(beat)
        v = {
            "audio/rms": f.rms,
            "audio/level": f.level,
            "audio/onset": float(f.onset),
            "audio/beat": float(beat),
            "audio/count": float(self.count),
            "audio/beats": float(self.beats),
            "audio/bpm": float(bpm or 0.0),
        }
        for i, n in enumerate(self.names):
            v[f"audio/{n}"] = float(f.bands[i])
            v[f"audio/onset/{n}"] = float(f.onsets[i])
            v[f"audio/count/{n}"] = float(self.counts[i])
        return v


class AudioInput:
    """``AudioInput(open_source, registry).start()``; ``close()``. `open_source` makes a
    new source each time (the first open and every reopen)."""

    def __init__(
        self,
        open_source: Callable[[], Any],
        registry: Any,
        *,
        bands: Sequence[float] = DEFAULT_BANDS,
        lead_tempo: bool = False,
        clock: Callable[[], float] = time.time,
        paced: bool = True,
        on_error: Callable[[str], None] | None = None,
    ):
        self.open_source = open_source
        self.registry = registry
        self.bank = registry.modulator.bank
        self.bands = tuple(bands)
        self.lead_tempo = lead_tempo
        self.clock = clock
        self.paced = paced
        self.on_error = on_error
        self.state = "starting"
        self.frames = 0
        self.beats = 0
        self.tracker: BeatTracker | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_bpm_shown = 0.0
        self._last_error: str | None = None

    # -- status -----------------------------------------------------------------------------
    def _status(self, state: str, error: str | None = None) -> None:
        if error is not None and error == self._last_error:
            log.debug("audio: %s (again)", error)  # a retry failing the same way: said once
        elif error is not None:  # reported before the state shows (readers poll the state)
            self._last_error = error
            log.error("audio: %s", error)
            if self.on_error is not None:
                try:
                    self.on_error(error)
                except Exception:  # noqa: BLE001 - reporting must not stop the input
                    log.exception("audio error report failed")
        if error is None:
            self._last_error = None
        self.state = state
        self.bank.status["audio"] = state

    def start(self) -> AudioInput:
        self._thread = threading.Thread(target=self._run, name="dreamdeck-audio", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                src = self.open_source()
            except AudioSourceError as e:
                self._status(f"waiting: {e}", str(e))
                if self._stop.wait(RETRY_S):
                    return
                continue
            except Exception as e:  # noqa: BLE001 - an unexpected failure: report, retry
                self._status(f"waiting: {e}", f"audio source failed: {e}")
                if self._stop.wait(RETRY_S):
                    return
                continue
            try:
                ended = self._play(src)
            finally:
                try:
                    src.close()
                except Exception:  # noqa: BLE001
                    log.debug("closing the audio source failed", exc_info=True)
            if ended:
                return
            if self._stop.wait(RETRY_S):
                return

    def _play(self, src: Any) -> bool:
        """Read until the source ends (True: do not reopen) or fails (False: reopen)."""
        try:
            analyzer = Analyzer(src.rate, self.bands)
        except ValueError as e:
            self._status(f"error: {e}", f"{src.name}: {e}")
            return False
        features = Features(analyzer.names)
        tracker = self.tracker = BeatTracker(analyzer.fps)
        self._status(f"{src.name}: live")
        n_read = max(1, int(READ_S * src.rate))
        t0 = self.clock()
        done = 0  # samples played since t0
        while not self._stop.is_set():
            try:
                x = src.read(n_read)
            except AudioSourceError as e:
                self._status(f"lost: {e}", str(e))
                return False
            if x is None:
                torn = getattr(src, "torn", 0)
                if torn:
                    self._status(
                        f"{src.name}: ended",
                        f"{src.name}: malformed PCM: the stream ended inside a frame"
                        f" ({torn} stray bytes dropped)",
                    )
                else:
                    self._status(f"{src.name}: ended")
                return src.kind == "stdin" or not getattr(src, "loop", True)  # ended for good
            if x.size == 0:
                continue
            now = self.clock()
            if self.paced:
                ahead = t0 + done / src.rate - now
                if ahead > 0.005:
                    if self._stop.wait(ahead):
                        return True
                elif ahead < -0.5:  # fell behind (a stall, a slow pipe): re-anchor
                    t0 = now - done / src.rate
            done += x.size
            for f in analyzer.feed(x):
                beat = tracker.push(f.envelope)
                t = t0 + f.time
                if beat:
                    self.beats += 1
                    self._lead(tracker, t)
                self.bank.push(t, features.values(f, beat, tracker.bpm if tracker.locked else None))
                self.frames += 1
        return True

    def _lead(self, tracker: BeatTracker, t: float) -> None:
        grid = getattr(self.registry, "tempo_grid", None)
        if not self.lead_tempo or grid is None or tracker.bpm is None:
            return
        if grid.source not in ("manual", "audio"):
            return  # Link or a MIDI clock leads
        bpm = min(max(tracker.bpm, 20.0), 300.0)
        grid.sync(bpm, round(grid.beat_at(t)), t, "audio")
        if abs(bpm - self._last_bpm_shown) >= 0.5:
            self._last_bpm_shown = bpm
            try:  # show it; the tempo bridge then re-syncs the grid at the same tempo
                self.registry.set("tempo/bpm", round(bpm, 1))
                grid.source = "audio"
            except ValueError:
                pass
