"""An NDI source over the network (`ndi:NAME`) through cyndilib (which bundles the NDI
runtime). NAME matches a source's full name ("HOST (Stream)") or the part in brackets
("Stream"). Frames arrive as RGBA (RGBX for sources without alpha) and are stamped with
the local receive time: the sender's clock is another machine's.

NDI reconnects by itself when a source comes back; a source that disappears just stops
delivering, which the fallback (fallback.py) notices by the frames' age.
"""

from __future__ import annotations

import time

import numpy as np

from engine.runtime.inputs.base import InputError, InputFrame, ThreadedSource

FIND_S = 2.0  # how long one open() looks for the source before retrying


def _matches(full: str, want: str) -> bool:
    if full == want:
        return True
    inner = full[full.find("(") + 1 : full.rfind(")")] if "(" in full else full
    return inner == want


class NdiInput(ThreadedSource):
    def __init__(self, source: str):
        if not source:
            raise InputError("ndi: needs a source name, e.g. ndi:MY-PC (TouchDesigner)")
        super().__init__(f"ndi:{source}")
        self.source = source
        self._finder = self._recv = self._vf = None
        self.find_s = FIND_S

    def _open(self) -> None:
        try:
            import cyndilib as ndi
            from cyndilib.receiver import ReceiveFrameType  # not re-exported at the top
        except ImportError as e:
            raise InputError(f"NDI needs cyndilib ({e})") from None
        if self._finder is None:
            self._finder = ndi.Finder()
            self._finder.open()
        deadline = time.monotonic() + self.find_s
        src = None
        while src is None and time.monotonic() < deadline and not self._stop.is_set():
            self._finder.wait_for_sources(0.2)
            for name in self._finder.get_source_names():
                if _matches(name, self.source):
                    src = self._finder.get_source(name)
                    break
        if src is None:
            names = ", ".join(self._finder.get_source_names()) or "none"
            raise InputError(f"no NDI source named {self.source!r} (seen: {names})")
        recv = ndi.Receiver(
            color_format=ndi.RecvColorFormat.RGBX_RGBA,
            bandwidth=ndi.RecvBandwidth.highest,
            recv_name="dreamdeck",
        )
        vf = ndi.VideoRecvFrame()
        recv.set_video_frame(vf)
        recv.set_source(src)
        self._recv, self._vf, self._ft = recv, vf, ReceiveFrameType

    def _grab(self) -> InputFrame | None:
        got = self._recv.receive(self._ft.recv_video, 50)
        if not got & self._ft.recv_video:
            return None
        vf = self._vf
        w, h = vf.get_resolution()
        stride = vf.get_line_stride() or w * 4
        data = np.empty(vf.get_buffer_size(), np.uint8)
        vf.fill_p_data(data)
        rgba = data[: stride * h].reshape(h, stride)[:, : w * 4].reshape(h, w, 4)
        return InputFrame(np.ascontiguousarray(rgba), time.time())

    def _release(self) -> None:
        if self._recv is not None:
            try:
                self._recv.disconnect()
            finally:
                self._recv = self._vf = None

    def close(self) -> None:
        super().close()
        if self._finder is not None:
            self._finder.close()
            self._finder = None
