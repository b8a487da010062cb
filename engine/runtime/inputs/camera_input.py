"""A camera through PyAV/FFmpeg (`camera:DEVICE`): v4l2 on Linux (`camera:/dev/video0`),
AVFoundation on macOS (`camera:0`), DirectShow on Windows (`camera:video=Name`). Frames
are stamped when decoded and not paced (the device sets the rate)."""

from __future__ import annotations

import sys

from engine.runtime.inputs.file_input import AvInput

FORMATS = {"linux": "v4l2", "darwin": "avfoundation", "win32": "dshow"}


class CameraInput(AvInput):
    def __init__(self, device: str, *, fmt: str | None = None, options: dict | None = None):
        fmt = fmt or FORMATS.get(sys.platform)
        if sys.platform == "win32" and not device.startswith(("video=", "audio=")):
            device = f"video={device}"
        super().__init__(
            f"camera:{device}", device, fmt=fmt, options=options, paced=False, loop=False
        )
