"""NDI output through cyndilib (which bundles the NDI runtime): a source named
``dreamdeck`` that TouchDesigner's NDI In TOP, OBS or Resolume on another machine can pick.

Why a worker thread and ``clock_video=False``: with clocking on, NDI's send call sleeps
to hold the advertised frame rate, and even unclocked it compresses the frame in the
calling thread. Both happen on this sink's own thread; the publisher only copies the
frame into a latest-wins mailbox, so NDI can never slow presentation or generation.

NDI's compression works on pairs of pixels, so odd widths are padded to even by
repeating the last column (nothing of the picture is lost). A size change recreates the
sender (cyndilib cannot resize an open one); receivers reconnect by name.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from engine.runtime.sinks import FrameMeta, SinkError, WorkerSink

__all__ = ["NdiSink", "check_ndi_available", "even_width"]


def check_ndi_available() -> None:
    """Raise SinkError (saying what to do) when NDI output cannot work here."""
    try:
        import cyndilib  # noqa: F401
        from cyndilib.sender import Sender  # noqa: F401
    except Exception as e:  # ImportError, or the bundled library failing to load
        raise SinkError(
            f"NDI output needs cyndilib with its bundled NDI library ({e}); "
            "install it with `pip install cyndilib` (x86-64 Linux/Windows, macOS)"
        ) from e


def even_width(rgba: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rgba`` itself when its width is even, else a copy one column wider whose last
    column repeats the previous one (reusing ``out`` when it fits)."""
    h, w = rgba.shape[:2]
    if w % 2 == 0:
        return rgba
    if out is None or out.shape != (h, w + 1, rgba.shape[2]):
        out = np.empty((h, w + 1, rgba.shape[2]), rgba.dtype)
    out[:, :w] = rgba
    out[:, w] = rgba[:, w - 1]
    return out


class NdiSink(WorkerSink):
    """``NdiSink("dreamdeck")``: the NDI source ``HOSTNAME (dreamdeck)``."""

    def __init__(self, name: str = "dreamdeck", *, fps: float = 30.0):
        super().__init__()
        if not isinstance(name, str) or not name.strip():
            raise SinkError(f"bad NDI source name {name!r}")
        self.source_name = name
        self.name = f"ndi:{name}"
        self.fps = fps  # advertised only (clocking is off): receivers' display hint
        self._sender = None
        self._size: tuple[int, int] | None = None
        self._padded: np.ndarray | None = None

    @property
    def ndi_name(self) -> str | None:
        """The full source name NDI announces (``HOST (name)``), once sending."""
        return None if self._sender is None else self._sender.name

    def _setup(self) -> None:
        check_ndi_available()

    def _make_sender(self, width: int, height: int) -> None:
        from cyndilib.sender import Sender
        from cyndilib.video_frame import VideoSendFrame
        from cyndilib.wrapper.ndi_structs import FourCC

        self._close_sender()
        vf = VideoSendFrame()
        vf.set_resolution(width, height)
        vf.set_fourcc(FourCC.RGBA)
        vf.set_frame_rate(Fraction(self.fps).limit_denominator(1001))
        sender = Sender(self.source_name, clock_video=False, clock_audio=False)
        sender.set_video_frame(vf)
        sender.open()
        self._sender, self._size = sender, (width, height)

    def _emit(self, rgba: np.ndarray, meta: FrameMeta) -> None:
        frame = even_width(rgba, self._padded)
        if frame is not rgba:
            self._padded = frame
        h, w = frame.shape[:2]
        if self._size != (w, h):
            self._make_sender(w, h)
        self._sender.write_video(frame.reshape(-1))

    def _close_sender(self) -> None:
        sender, self._sender, self._size = self._sender, None, None
        if sender is not None:
            sender.close()

    def _teardown(self) -> None:
        self._close_sender()
