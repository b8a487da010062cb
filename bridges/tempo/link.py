"""Ableton Link through aalink (the optional ``link`` extra: ``pip install aalink``).

aalink needs a running asyncio loop, so Link lives on its own thread with its own loop;
the rest of dreamdeck only sees the `BeatGrid` it keeps in step (polled every 20 ms:
a beat at 180 BPM is 333 ms, so the grid is never more than a few ms behind a tempo
change) and `set_tempo`, which proposes a tempo to the whole Link session.

Link aligns phase modulo its quantum (4 beats here: one bar of 4/4), so bars line up
with Ableton and other peers; 2- and 4-bar phrases count from Link's beat 0.

Start/stop: with Link's start/stop sync on, play and stop in Ableton (or any peer that
shares its transport) gate beat-quantised changes the way MIDI Start/Stop does: while
the session is stopped there is no grid to land on and they go out at the next block.
A session where no peer shares its transport reads as "stopped" forever, so the gate
closes only once the session has been seen playing: until then the grid runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from bridges.tempo.grid import BeatGrid

log = logging.getLogger(__name__)


class LinkUnavailable(RuntimeError):
    pass


def _import_aalink():
    try:
        import aalink
    except ImportError as e:
        raise LinkUnavailable(
            f"Ableton Link needs the aalink package ({e}); install it with "
            "`pip install aalink` (or the `link` extra of dreamdeck)"
        ) from None
    return aalink


class LinkTempo:
    def __init__(
        self,
        grid: BeatGrid,
        bpm: float = 120.0,
        *,
        quantum: float = 4.0,
        poll: float = 0.02,
        on_tempo: Callable[[float], None] | None = None,
    ):
        self._aalink = _import_aalink()
        self.grid = grid
        self.quantum = quantum
        self.poll = poll
        self.on_tempo = on_tempo
        self._bpm0 = bpm
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.peers = 0
        self.tempo: float | None = None
        self.playing: bool | None = None  # the session's transport, once seen playing
        self._thread = threading.Thread(target=self._run, name="dreamdeck-link", daemon=True)

    def start(self, timeout: float = 5.0) -> LinkTempo:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise LinkUnavailable("Ableton Link did not start within 5 s")
        if self._error is not None:
            raise LinkUnavailable(f"Ableton Link failed to start: {self._error}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start() or logged
            self._error = e
            self._ready.set()
            log.exception("Ableton Link stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        link = self._aalink.Link(self._bpm0)
        link.quantum = self.quantum
        link.start_stop_sync_enabled = True
        link.enabled = True
        self._link = link
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._sample(link)
                await asyncio.sleep(self.poll)
        finally:
            link.enabled = False

    def _sample(self, link) -> None:
        # read beat and wall time back to back: the pair is good to well under 1 ms
        now = self.grid.clock()
        beat, bpm, peers = float(link.beat), float(link.tempo), int(link.num_peers)
        if peers != self.peers:
            log.info("Ableton Link: %d peer(s)", peers)
            self.peers = peers
        self.grid.sync(bpm, beat, now, "link")
        playing = bool(link.playing)
        if playing or self.playing is not None:  # the session shares its transport
            if playing != self.playing:
                log.info("Ableton Link: %s", "playing" if playing else "stopped")
            self.playing = playing
        self.grid.running = self.playing is not False
        if self.tempo is None or abs(bpm - self.tempo) > 1e-3:
            self.tempo = bpm
            if self.on_tempo is not None:
                self.on_tempo(bpm)

    def set_tempo(self, bpm: float) -> None:
        """Propose a tempo to the Link session (every peer follows)."""
        loop, link = self._loop, self._link
        if loop is None or link is None:
            return

        def apply() -> None:
            link.tempo = float(bpm)

        loop.call_soon_threadsafe(apply)

    def set_playing(self, playing: bool) -> None:
        """Start or stop the Link session's transport (peers with start/stop sync follow)."""
        loop, link = self._loop, self._link
        if loop is None or link is None:
            return

        def apply() -> None:
            link.playing = bool(playing)

        loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll `pred` until true or `timeout` (used by tests and the CLI to wait for peers)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
