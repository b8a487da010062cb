"""Spout output. Real Spout (SpoutGL: DirectX/OpenGL interop) cannot exist on Linux, so
these tests inject a fake ``SpoutGL`` module that records calls and, like OpenGL, refuses
to be used from any thread but the one that created its context. What is tested is ours:
one dedicated thread owning the context, frames and sizes passed through, latest-wins
decoupling, clean release, and the clear error off Windows."""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from engine.runtime.sinks import FrameMeta, SinkError, make_sinks
from engine.runtime.spout_out import GL_RGBA, SpoutSink


def fake_spoutgl(create_ok=True, send_delay=0.0):
    log = types.SimpleNamespace(calls=[], frames=[], gl_thread=None)

    class SpoutSender:
        def _gl(self, what):
            log.calls.append((what, threading.get_ident()))
            if what != "createOpenGL" and log.gl_thread != threading.get_ident():
                raise RuntimeError(f"{what}: no current GL context on this thread")

        def createOpenGL(self):
            self._gl("createOpenGL")
            log.gl_thread = threading.get_ident()
            return create_ok

        def closeOpenGL(self):
            self._gl("closeOpenGL")

        def setSenderName(self, name):
            self._gl("setSenderName")
            log.name = name
            return True

        def sendImage(self, buf, width, height, fmt, invert, fbo):
            self._gl("sendImage")
            time.sleep(send_delay)
            log.frames.append((bytes(buf), width, height, fmt, invert))
            return True

        def releaseSender(self):
            self._gl("releaseSender")

    return types.SimpleNamespace(SpoutSender=SpoutSender), log


@pytest.fixture
def windows(monkeypatch):
    """Pretend to be on Windows with a fake SpoutGL installed."""

    def install(**kw):
        mod, log = fake_spoutgl(**kw)
        monkeypatch.setattr(sys, "platform", "win32")
        monkeypatch.setitem(sys.modules, "SpoutGL", mod)
        return log

    return install


def test_frames_go_out_on_one_gl_thread(windows):
    log = windows()
    sink = make_sinks(["spout"])[0]
    assert isinstance(sink, SpoutSink) and sink.name == "spout:dreamdeck"
    rng = np.random.default_rng(0)
    sent = [rng.integers(0, 256, (6, 10, 4), np.uint8) for _ in range(4)]
    sent += [rng.integers(0, 256, (8, 12, 4), np.uint8) for _ in range(2)]  # resize
    sink.open(10, 6)
    for i, f in enumerate(sent):
        sink.send(f, FrameMeta(0, i, 0.0))
        t0 = time.monotonic()
        while sink.sent <= i and time.monotonic() - t0 < 5:  # one at a time: none dropped
            time.sleep(0.002)
    sink.close()
    assert log.name == "dreamdeck"
    assert [(w, h) for _, w, h, _, _ in log.frames] == [(f.shape[1], f.shape[0]) for f in sent]
    assert all(px == f.tobytes() for (px, *_), f in zip(log.frames, sent, strict=True))
    assert all(fmt == GL_RGBA and inv is False for *_, fmt, inv in log.frames)
    threads = {t for _, t in log.calls}
    assert threads == {log.gl_thread} and log.gl_thread != threading.get_ident()
    assert [c for c, _ in log.calls][-2:] == ["releaseSender", "closeOpenGL"]


def test_slow_spout_never_blocks_send(windows):
    log = windows(send_delay=0.2)
    sink = SpoutSink("stage")
    sink.open(4, 2)
    frame = np.zeros((2, 4, 4), np.uint8)
    times = []
    for i in range(20):
        frame[0, 0, 0] = i
        t0 = time.perf_counter()
        sink.send(frame, FrameMeta(0, i, 0.0))
        times.append(time.perf_counter() - t0)
    time.sleep(0.5)
    sink.close()
    assert max(times) < 0.05
    assert sink.dropped > 0  # latest wins while Spout is busy
    assert log.frames[-1][0][0] == 19  # and the newest frame did go out


def test_context_failure_is_a_clear_error_and_releases(windows):
    log = windows(create_ok=False)
    sink = SpoutSink()
    with pytest.raises(SinkError, match="hidden OpenGL context"):
        sink.open(4, 2)
    sink.close()
    assert "releaseSender" not in [c for c, _ in log.calls]  # nothing was created


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows error")
def test_spout_off_windows_is_a_clear_error():
    with pytest.raises(SinkError, match="only on Windows.*--shm.*--ndi"):
        make_sinks(["shm:ddspout", "spout"])
    with pytest.raises(SinkError, match="unknown output 'syphon'"):
        make_sinks(["syphon"])
    with pytest.raises(SinkError, match="given twice"):
        make_sinks(["shm", "shm:dreamdeck"])
