"""Video through PyAV: a file played in real time and looped (`file:PATH`), or a camera
where FFmpeg can open one (`camera:DEVICE`, see camera_input.py).

Files are paced by their own timestamps against the wall clock (a 30 fps file yields 30
frames a second whatever the engine does) and start again at the end; each frame is
stamped with the wall time it is presented, so resampling treats a file like a camera.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.runtime.inputs.base import InputError, InputFrame, ThreadedSource


class AvInput(ThreadedSource):
    """A PyAV container decoded on the grab thread. `paced` plays in real time by the
    stream's timestamps (files); `loop` seeks to the start at the end."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        fmt: str | None = None,
        options: dict[str, str] | None = None,
        paced: bool = True,
        loop: bool = True,
    ):
        super().__init__(name)
        self.url, self.fmt, self.options = url, fmt, options or {}
        self.paced, self.loop = paced, loop
        self.loops = 0  # times the file started again
        self._container = None
        self._frames = None
        self._last_due: float | None = None  # wall time the last frame was due
        self._dt = 0.0  # last frame-to-frame interval

    def _open(self) -> None:
        import av

        self._last_due = None
        self._container = av.open(self.url, format=self.fmt, options=self.options)
        if not self._container.streams.video:
            self._container.close()
            self._container = None
            raise InputError(f"{self.url}: no video stream")
        # frame threads: set before the first decode (the codec refuses it once open)
        self._container.streams.video[0].thread_type = "AUTO"
        self._restart()

    def _restart(self) -> None:
        self._frames = self._container.decode(self._container.streams.video[0])
        # A new pass starts one frame after the last one of the previous pass was due, so
        # the last frame keeps its duration across the loop.
        last = self._last_due
        self._anchor = None if last is None else last + self._dt
        self._t0: float | None = None  # wall time of the first frame of this pass
        self._pts0: float | None = None

    def _grab(self) -> InputFrame | None:
        try:
            frame = next(self._frames)
        except StopIteration:
            if not self.loop:
                raise EOFError("end of the video") from None
            self._container.seek(0)
            self.loops += 1
            self._restart()
            return None
        rgba = frame.to_ndarray(format="rgba")
        t = time.time()
        if self.paced and frame.time is not None:
            if self._t0 is None:
                self._t0, self._pts0 = self._anchor or t, float(frame.time)
            due = self._t0 + float(frame.time) - self._pts0
            if self._last_due is not None and due > self._last_due:
                self._dt = due - self._last_due
            self._last_due = due
            if due > t:
                if self._stop.wait(due - t):
                    return None
                t = due
            elif t - due > 0.5:  # fell behind (machine busy): re-anchor, do not rush
                self._t0 = t - (float(frame.time) - self._pts0)
        return InputFrame(np.ascontiguousarray(rgba), t)

    def _release(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class FileInput(AvInput):
    def __init__(self, path: str | Path, *, loop: bool = True):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"video file {str(path)!r} not found")
        super().__init__(f"file:{path}", str(p), paced=True, loop=loop)
