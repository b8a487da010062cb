"""NDI output: a real cyndilib receiver finds our source on this machine and gets frames
of the right (even) size and content. Runs in a subprocess so the NDI runtime is
configured for loopback discovery (NDI_CONFIG_DIR with 127.0.0.1 as an extra IP: mDNS
multicast does not work on every CI network) without touching this process."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ndi_helpers import run_ndi_child

from engine.runtime.ndi_out import even_width
from engine.runtime.sinks import SinkError, make_sinks

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    try:
        from cyndilib.finder import Finder
        from cyndilib.receiver import Receiver, ReceiveFrameType
        from cyndilib.video_frame import VideoRecvFrame
        from cyndilib.wrapper.ndi_recv import RecvBandwidth, RecvColorFormat
        from engine.runtime.ndi_out import NdiSink
        from engine.runtime.sinks import FrameMeta
        sink = NdiSink(sys.argv[1])
        sink.open(63, 40)
    except Exception as e:
        print(json.dumps({"skip": f"NDI runtime cannot start here: {e!r}"})); sys.exit(0)

    H, W = 40, 63  # odd width: the sink pads to 64
    img = np.zeros((H, W, 4), np.uint8)
    img[:20, :32] = (200, 60, 40, 255); img[:20, 32:] = (50, 180, 70, 255)
    img[20:, :32] = (40, 60, 190, 255); img[20:, 32:] = (200, 200, 200, 255)
    stop = threading.Event(); send_times = []
    def feed():
        i = 0
        while not stop.is_set():
            t = time.perf_counter(); sink.send(img, FrameMeta(0, i, time.time()))
            send_times.append(time.perf_counter() - t); i += 1; time.sleep(0.02)
    threading.Thread(target=feed, daemon=True).start()

    finder = Finder(); finder.open()
    src, t0 = None, time.monotonic()
    while src is None and time.monotonic() - t0 < 15:
        finder.wait_for_sources(0.5)
        names = [n for n in finder.get_source_names() if n.endswith("(" + sys.argv[1] + ")")]
        if names: src = finder.get_source(names[0])
    if src is None:
        print(json.dumps({"error": "source not found", "names": finder.get_source_names()}))
        sys.exit(0)
    recv = Receiver(color_format=RecvColorFormat.RGBX_RGBA, bandwidth=RecvBandwidth.highest)
    vf = VideoRecvFrame(); recv.set_video_frame(vf); recv.set_source(src)
    got, t0 = None, time.monotonic()
    while time.monotonic() - t0 < 15:
        if recv.receive(ReceiveFrameType.recv_video, 200) & ReceiveFrameType.recv_video:
            buf = np.empty(vf.get_buffer_size(), np.uint8); vf.fill_p_data(buf)
            if buf.any():
                got = (vf.get_resolution(), buf); break
    stop.set()
    res = {"name": src.name, "ndi_name": sink.ndi_name, "median_send_ms": float(np.median(send_times)) * 1e3}
    if got is not None:
        (w, h), buf = got
        frame = buf.reshape(h, w, 4).astype(int)
        res["size"] = [w, h]
        res["quadrants"] = [frame[2:18, 2:30].mean((0, 1)).tolist(), frame[2:18, 34:62].mean((0, 1)).tolist(),
                            frame[22:38, 2:30].mean((0, 1)).tolist(), frame[22:38, 34:62].mean((0, 1)).tolist()]
        res["pad_column"] = frame[22:38, 63].mean(0).tolist()
    recv.disconnect(); sink.close(); finder.close()
    print(json.dumps(res))
    """
)


def test_receiver_finds_source_and_gets_frames(tmp_path):
    name = f"ddtest-{os.getpid()}"
    res = run_ndi_child(tmp_path, _CHILD, name)
    assert "error" not in res, res
    assert res["name"].endswith(f"({name})") and res["ndi_name"] == res["name"]
    assert res["size"] == [64, 40]  # 63 padded to even
    want = [(200, 60, 40), (50, 180, 70), (40, 60, 190), (200, 200, 200)]
    for got, ref in zip(res["quadrants"], want, strict=True):
        # NDI compresses (SpeedHQ, 4:2:2 YUV): flat colours come back within ~10 levels
        assert np.abs(np.array(got[:3]) - ref).max() < 16, res["quadrants"]
    assert np.abs(np.array(res["pad_column"][:3]) - 200).max() < 10  # repeated last column
    # send only copies into the mailbox (the max is no use here: the receiver's setup in
    # the same process holds the GIL at times)
    assert res["median_send_ms"] < 5


def test_even_width_pads_by_repeating_the_last_column():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    b = even_width(a)
    assert b.shape == (2, 4, 4)
    np.testing.assert_array_equal(b[:, :3], a)
    np.testing.assert_array_equal(b[:, 3], a[:, 2])
    even = np.zeros((2, 4, 4), np.uint8)
    assert even_width(even) is even


def test_missing_cyndilib_is_a_clear_error(monkeypatch):
    # cyndilib is installed here; hide it to check the message a user without it gets.
    monkeypatch.setitem(sys.modules, "cyndilib", None)
    monkeypatch.setitem(sys.modules, "cyndilib.sender", None)
    with pytest.raises(SinkError, match="pip install cyndilib"):
        make_sinks(["shm", "ndi"])
