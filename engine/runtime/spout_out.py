"""Spout output (Windows): a sender named ``dreamdeck`` that TouchDesigner's Syphon Spout
In TOP (or Resolume, OBS with the Spout plugin) receives as a GPU texture.

SpoutGL needs a current OpenGL context, and a GL context is bound to one thread. So this
sink owns a dedicated thread which creates a hidden context (Spout's ``CreateOpenGL``: an
invisible window, no drawing), creates the sender, does every ``sendImage`` and releases
both at the end. The publisher thread only copies frames into a latest-wins mailbox, so
a GPU or driver stall here never reaches generation.

Install with the ``spout`` extra (SpoutGL, PyOpenGL). On other systems asking for Spout
is a clear :class:`SinkError` naming the alternatives.
"""

from __future__ import annotations

import sys

import numpy as np

from engine.runtime.sinks import FrameMeta, SinkError, WorkerSink

__all__ = ["SpoutSink", "check_spout_available"]

GL_RGBA = 0x1908  # the OpenGL enum; avoids importing PyOpenGL just for a constant


def check_spout_available() -> None:
    """Raise SinkError (saying what to use instead) when Spout cannot work here."""
    if sys.platform != "win32":
        raise SinkError(
            f"Spout output exists only on Windows (this is {sys.platform}); "
            "use --shm (same machine) or --ndi (network) instead"
        )
    try:
        import SpoutGL  # noqa: F401
    except Exception as e:
        raise SinkError(
            f"Spout output needs SpoutGL ({e}); install it with `pip install dreamdeck[spout]`"
        ) from e


class SpoutSink(WorkerSink):
    """``SpoutSink("dreamdeck")``. ``invert`` flips the image vertically in Spout (frames
    arrive top row first, which Spout receivers show upright without it)."""

    def __init__(self, name: str = "dreamdeck", *, invert: bool = False):
        super().__init__()
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise SinkError(f"bad Spout sender name {name!r}")
        self.sender_name = name
        self.name = f"spout:{name}"
        self.invert = invert
        self._sender = None
        self._gl = False

    def _setup(self) -> None:
        check_spout_available()
        import SpoutGL

        sender = SpoutGL.SpoutSender()
        # The hidden GL context is created on, and current to, this thread only.
        if not sender.createOpenGL():
            raise SinkError("Spout could not create a hidden OpenGL context (no GPU driver?)")
        self._gl = True
        sender.setSenderName(self.sender_name)
        self._sender = sender

    def _emit(self, rgba: np.ndarray, meta: FrameMeta) -> None:
        h, w = rgba.shape[:2]
        # Spout resizes its shared texture itself when the size changes.
        if not self._sender.sendImage(rgba, w, h, GL_RGBA, self.invert, 0):
            raise RuntimeError(f"Spout sendImage failed at {w}x{h}")

    def _teardown(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.releaseSender()
            if self._gl:
                sender.closeOpenGL()
