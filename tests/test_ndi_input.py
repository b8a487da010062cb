"""NDI input (`ndi:NAME`): our NDI sender and our NdiInput source in one child process,
with the NDI runtime configured for loopback discovery (as in test_ndi.py): the source
finds the sender by the name in brackets and delivers frames of the sent size and colour."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from ndi_helpers import run_ndi_child

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    try:
        from engine.runtime.ndi_out import NdiSink
        from engine.runtime.sinks import FrameMeta
        sink = NdiSink(sys.argv[1]); sink.open(64, 48)
    except Exception as e:
        print(json.dumps({"skip": f"NDI runtime cannot start here: {e!r}"})); sys.exit(0)
    from engine.runtime.inputs.live import open_source

    img = np.zeros((48, 64, 4), np.uint8); img[..., :] = (30, 160, 220, 255)
    stop = threading.Event()
    def feed():
        i = 0
        while not stop.is_set():
            sink.send(img, FrameMeta(0, i, time.time())); i += 1; time.sleep(0.02)
    threading.Thread(target=feed, daemon=True).start()
    src = open_source("ndi:" + sys.argv[1])
    src.find_s = 10.0
    src.start()
    t0, frames = time.monotonic(), []
    while time.monotonic() - t0 < 20 and len(frames) < 3:
        frames = src.frames(); time.sleep(0.1)
    stop.set()
    res = {"count": len(frames), "status": src.status}
    if frames:
        f = frames[-1]
        res["shape"] = list(f.rgba.shape); res["mean"] = f.rgba[4:-4, 4:-4].reshape(-1, 4).mean(0).tolist()
        res["age"] = time.time() - f.timestamp
    src.close(); sink.close()
    print(json.dumps(res))
    """
)


def test_ndi_source_receives_our_sender(tmp_path):
    name = f"ddin-{os.getpid()}"
    res = run_ndi_child(tmp_path, _CHILD, name)
    assert res["count"] >= 3, res
    assert res["shape"] == [48, 64, 4]
    # NDI compresses (4:2:2): a flat colour comes back within a few levels
    assert max(abs(a - b) for a, b in zip(res["mean"][:3], (30, 160, 220), strict=True)) < 16, res
    assert res["age"] < 5
