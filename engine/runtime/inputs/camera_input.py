"""A camera through PyAV/FFmpeg (`camera:DEVICE`): v4l2 on Linux (`camera:/dev/video0` or
`camera:0`), AVFoundation on macOS (`camera:0` or the camera's name), DirectShow on Windows
(`camera:video=Name`). Frames are stamped when decoded and not paced (the device sets the
rate).

Why the device is checked before anything opens it: `vace/source` arrives over the network,
and FFmpeg's v4l2 reader opens whatever path it is given read-write and sends it device
ioctls. So on Linux only a character device of the video4linux class named `videoN` is
accepted (checked with `os.stat` and sysfs, never by opening it); everything else is
refused with one message that is the same for a missing path, a plain file, another device
or a symlink to any of them, so a refusal does not tell whether a file exists. Only a
checked video4linux node is ever handed to FFmpeg (which opens it read-write, as V4L2
capture requires for its ioctls); no other path is opened at all.
"""

from __future__ import annotations

import os
import re
import stat
import sys

from engine.runtime.inputs.base import InputError
from engine.runtime.inputs.file_input import AvInput

FORMATS = {"linux": "v4l2", "darwin": "avfoundation", "win32": "dshow"}
V4L2_MAJOR = 81  # the video4linux character-device major number (Documentation/devices.txt)
MAX_DEVICE_LEN = 128
_INDEX = re.compile(r"\d{1,3}")
_VIDEO_NODE = re.compile(r"video(\d{1,3})")
# macOS / Windows camera names: what their camera lists show, nothing path- or option-like
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ()_.,#&+\-]{0,127}")


def _refuse(device: str) -> InputError:
    """The one refusal for every bad device: it must not reveal whether a path exists."""
    shown = device[:60] + ("..." if len(device) > 60 else "")
    return InputError(
        f"camera {shown!r} is not a video capture device: use camera:N (an index) or"
        " camera:/dev/videoN on Linux, camera:N or the camera's name on macOS,"
        " camera:video=NAME on Windows"
    )


def resolve_camera(
    device: str,
    *,
    platform: str | None = None,
    dev_dir: str = "/dev",
    sysfs_dir: str = "/sys/class/video4linux",
) -> str:
    """The device string to hand to FFmpeg for `camera:DEVICE`, or InputError.

    Linux: an index N (-> /dev/videoN) or a path (symlinks such as /dev/v4l/by-id/... are
    followed) whose real path is `dev_dir`/videoN, a character device with major 81 whose
    sysfs entry `sysfs_dir`/videoN/dev names the same major:minor. The real path is
    returned (FFmpeg then opens the checked node, not a link that could change).
    `dev_dir` and `sysfs_dir` are parameters so tests can build a device node elsewhere."""
    platform = platform or sys.platform
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_LEN:
        raise _refuse(str(device)[:MAX_DEVICE_LEN])
    if any(ord(c) < 32 or ord(c) == 127 for c in device):
        raise _refuse(device.encode("unicode_escape").decode())
    if platform.startswith("linux"):
        return _linux_node(device, dev_dir, sysfs_dir)
    if platform == "darwin":
        if _INDEX.fullmatch(device) or _NAME.fullmatch(device):
            return device
        raise _refuse(device)
    if platform == "win32":
        name = device[len("video=") :] if device.startswith("video=") else device
        if _NAME.fullmatch(name):
            return f"video={name}"
        raise _refuse(device)
    raise InputError(f"cameras are not supported on {platform}")


def _linux_node(device: str, dev_dir: str, sysfs_dir: str) -> str:
    path = os.path.join(dev_dir, f"video{device}") if _INDEX.fullmatch(device) else device
    if "\0" in path:
        raise _refuse(device)
    try:
        real = os.path.realpath(path, strict=True)  # follows links; OSError when missing
        folder, name = os.path.split(real)
        m = _VIDEO_NODE.fullmatch(name)
        if m is None or folder != os.path.realpath(dev_dir):
            raise _refuse(device)
        st = os.stat(real)  # stat only: a device is never opened to find out what it is
        if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != V4L2_MAJOR:
            raise _refuse(device)
        with open(os.path.join(sysfs_dir, name, "dev"), encoding="ascii") as f:
            listed = f.read(32).strip()
        if listed != f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}":
            raise _refuse(device)
    except (OSError, ValueError, UnicodeError):
        raise _refuse(device) from None
    return real


class CameraInput(AvInput):
    """`device` is checked by `resolve_camera` here (a bad one raises InputError before a
    thread starts) and again before every (re)open, so a node that changed in between is
    not opened."""

    def __init__(
        self,
        device: str,
        *,
        fmt: str | None = None,
        options: dict | None = None,
        platform: str | None = None,
        dev_dir: str = "/dev",
        sysfs_dir: str = "/sys/class/video4linux",
    ):
        self._check = {"platform": platform, "dev_dir": dev_dir, "sysfs_dir": sysfs_dir}
        url = resolve_camera(device, **self._check)
        self.device = device
        fmt = fmt or FORMATS.get(platform or sys.platform)
        super().__init__(f"camera:{device}", url, fmt=fmt, options=options, paced=False, loop=False)

    def _open(self) -> None:
        self.url = resolve_camera(self.device, **self._check)
        super()._open()
