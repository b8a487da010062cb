"""Frames from another process through a dreamdeck shared-memory ring (`shm:NAME`):
TouchDesigner's Execute DAT (examples/touchdesigner/dreamdeck_shm_writer.py) or any
program writing the ring layout of engine/runtime/shm_ring.py. The ring's own reader does
the work (seqlock, reattach on writer restart and on resolution change); this adds the
grab thread and timestamps."""

from __future__ import annotations

import time

from engine.runtime.inputs.base import InputFrame, ThreadedSource
from engine.runtime.shm_ring import ShmRingReader

POLL_S = 0.002
# Writer timestamps are time.time() on the same machine; one far off (another clock,
# a writer that sends 0) is replaced by the time we read the frame.
MAX_SKEW_S = 2.0


class ShmInput(ThreadedSource):
    def __init__(self, ring: str):
        super().__init__(f"shm:{ring}")
        self.ring = ring
        self.reader: ShmRingReader | None = None

    def _open(self) -> None:
        self.reader = ShmRingReader(self.ring)  # attaches lazily: a missing ring is fine

    def _grab(self) -> InputFrame | None:
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            got = self.reader.read()
            if got is not None:
                info, px = got
                t = time.time()
                ts = info.timestamp if abs(info.timestamp - t) < MAX_SKEW_S else t
                return InputFrame(px, ts)
            time.sleep(POLL_S)
        return None

    def _release(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
