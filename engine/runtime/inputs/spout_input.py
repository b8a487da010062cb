"""A Spout sender on the same Windows machine (`spout:NAME`, e.g. TouchDesigner's Syphon
Spout Out TOP), read through SpoutGL (`pip install SpoutGL glfw`; Spout shares GPU
textures between OpenGL/DirectX apps and exists only on Windows). SpoutGL needs an
OpenGL context, so the grab thread makes a hidden glfw window.

Untested in CI (Linux): on other systems constructing it raises InputError saying so.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from engine.runtime.inputs.base import InputError, InputFrame, ThreadedSource


class SpoutInput(ThreadedSource):
    def __init__(self, sender: str):
        if sys.platform != "win32":
            raise InputError(
                f"spout:{sender}: Spout exists only on Windows; on this system use shm:NAME"
                " (same machine) or ndi:NAME (network)"
            )
        super().__init__(f"spout:{sender}")
        self.sender = sender
        self._recv = self._window = None
        self._frame = None

    def _open(self) -> None:
        try:
            import glfw
            import SpoutGL
        except ImportError as e:
            raise InputError(f"Spout input needs the SpoutGL and glfw packages ({e})") from None
        if not glfw.init():
            raise InputError("cannot initialise glfw for the Spout OpenGL context")
        glfw.window_hint(glfw.VISIBLE, False)
        self._window = glfw.create_window(16, 16, "dreamdeck spout", None, None)
        if not self._window:
            raise InputError("cannot create the hidden OpenGL window Spout needs")
        glfw.make_context_current(self._window)
        self._recv = SpoutGL.SpoutReceiver()
        self._recv.setReceiverName(self.sender)
        self._gl_rgba = 0x1908  # GL_RGBA
        self._frame = None

    def _grab(self) -> InputFrame | None:
        r = self._recv
        ok = r.receiveImage(self._frame, self._gl_rgba, False, 0)  # None until sized
        if r.isUpdated():
            w, h = r.getSenderWidth(), r.getSenderHeight()
            self._frame = bytearray(w * h * 4)
            self._size = (w, h)
            return None
        if not ok or self._frame is None or not r.isFrameNew():
            time.sleep(0.002)
            return None
        w, h = self._size
        rgba = np.frombuffer(self._frame, np.uint8).reshape(h, w, 4).copy()
        return InputFrame(rgba, time.time())

    def _release(self) -> None:
        import glfw

        if self._recv is not None:
            self._recv.releaseReceiver()
            self._recv = None
        if self._window is not None:
            glfw.destroy_window(self._window)
            self._window = None
