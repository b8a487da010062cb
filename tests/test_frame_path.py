"""Frame path: blocks in from the generation thread, frames out to sinks, and a slow
or dead sink never slowing submit_block."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from helpers import wait_for

from engine.runtime.frame_path import FramePath
from engine.runtime.pacer import Pacer


def block(k: int, t: int = 12, h: int = 6, w: int = 10) -> torch.Tensor:
    """Frame f of block k: every pixel encodes (k, f, y, x, c)."""
    f, y, x, c = torch.meshgrid(
        torch.arange(t), torch.arange(h), torch.arange(w), torch.arange(4), indexing="ij"
    )
    return ((k * 31 + f * 13 + y * 7 + x * 3 + c) % 256).to(torch.uint8)


class Recorder:
    def __init__(self, name="rec"):
        self.name = name
        self.opened, self.frames, self.closed = [], [], False
        self.lock = threading.Lock()

    def open(self, w, h):
        self.opened.append((w, h))

    def send(self, rgba, meta):
        with self.lock:
            self.frames.append((meta, rgba.copy()))

    def close(self):
        self.closed = True


def test_frames_arrive_in_order_with_right_pixels_and_resize():
    rec = Recorder()
    fp = FramePath([rec], Pacer(math.inf))
    sizes = [(6, 10)] * 3 + [(8, 14)] * 2
    for k, (h, w) in enumerate(sizes):
        t = 9 if k == 0 else 12
        src = block(k, t, h, w)
        fp.submit_block(src.numpy() if k == 2 else src, k)  # numpy input accepted too
        assert wait_for(
            lambda n=sum(9 if i == 0 else 12 for i in range(k + 1)): len(rec.frames) == n,
            timeout=5.0,
        )
    fp.close()
    assert rec.closed and rec.opened == [(10, 6), (14, 8)]
    i = 0
    for k, (h, w) in enumerate(sizes):
        src = block(k, 9 if k == 0 else 12, h, w).numpy()
        for f in range(len(src)):
            meta, px = rec.frames[i]
            assert (meta.block, meta.index) == (k, i)
            np.testing.assert_array_equal(px, src[f])
            i += 1
    assert fp.stats.published == i and fp.stats.dropped_blocks == 0


def test_stalled_sink_does_not_slow_submit():
    """A sink stuck inside send (a frozen consumer) stalls only the publisher thread."""
    release = threading.Event()

    class Stuck:
        name = "stuck"

        def open(self, w, h):
            pass

        def send(self, rgba, meta):
            release.wait()

        def close(self):
            pass

    rec = Recorder()
    fp = FramePath([Stuck(), rec], Pacer(math.inf))
    src = block(0, 12, 64, 64)
    fp.submit_block(src, 0)  # warm-up: allocates the pool
    assert wait_for(lambda: fp.stats.published == 0 and fp.pacer.presented == 1, timeout=5.0)
    times = []
    for k in range(1, 60):
        t0 = time.perf_counter()
        fp.submit_block(src, k)
        times.append(time.perf_counter() - t0)
    assert fp._allocated <= fp.buffers  # bounded memory
    assert max(times) < 0.05 and np.median(times) < 0.005
    assert fp.stats.dropped_blocks >= 50  # latest wins while nobody consumes
    t0 = time.perf_counter()
    fp.close(timeout=0.3)
    assert time.perf_counter() - t0 < 2.0  # close does not hang on the stuck sink
    release.set()


def test_failing_sinks_do_not_stop_the_others():
    class Broken:
        name = "broken"

        def open(self, w, h):
            raise OSError("no such device")

        def send(self, rgba, meta):
            raise AssertionError("never sent to: open failed")

        def close(self):
            pass

    class Flaky(Recorder):
        def send(self, rgba, meta):
            if meta.index % 2:
                raise RuntimeError("flaky")
            super().send(rgba, meta)

    rec, flaky = Recorder(), Flaky("flaky")
    fp = FramePath([Broken(), flaky, rec], Pacer(math.inf))
    fp.submit_block(block(0, 4), 0)
    assert wait_for(lambda: len(rec.frames) == 4, timeout=5.0)
    fp.close()
    assert [m.index for m, _ in flaky.frames] == [0, 2]
    assert fp.stats.sink_errors == {"flaky": 2}


def test_bad_blocks_are_rejected_and_change_nothing():
    fp = FramePath([Recorder()], Pacer(math.inf))
    bad = [
        (torch.zeros(2, 4, 4, 4), "uint8"),
        (torch.zeros(4, 4, 4, dtype=torch.uint8), r"\[T, H, W, 4\]"),
        (torch.zeros(2, 4, 4, 3, dtype=torch.uint8), r"\[T, H, W, 4\]"),
        (np.zeros((0, 4, 4, 4), np.uint8), r"\[T, H, W, 4\]"),
        ([1, 2, 3], "torch tensor or numpy"),
    ]
    for x, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fp.submit_block(x, 0)
    assert fp.stats.submitted == 0 and fp._allocated == 0
    fp.close()
    with pytest.raises(RuntimeError, match="closed"):
        fp.submit_block(block(0, 2), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned side-stream path)")
def test_cuda_blocks_copy_on_side_stream():
    rec = Recorder()
    fp = FramePath([rec], Pacer(math.inf))
    src = block(3, 12, 48, 64).cuda()
    fp.submit_block(src, 2)  # warm-up: pinned pool allocation, side stream creation
    assert wait_for(lambda: len(rec.frames) == 12, timeout=30)
    # Produce the block on the current stream behind pending kernels: the copy must wait
    # for them on the GPU, submit_block must not.
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        big = big @ big
    t0 = time.perf_counter()
    fp.submit_block(src * 1, 3)  # a fresh tensor the caller drops at once
    submit_s = time.perf_counter() - t0
    assert wait_for(lambda: len(rec.frames) == 24, timeout=30)
    fp.close()
    assert fp._pool_key == (48, 64, True)  # pinned host buffers
    for f, (meta, px) in enumerate(rec.frames[12:]):
        assert meta.block == 3
        np.testing.assert_array_equal(px, src[f].cpu().numpy())
    assert submit_s < 0.01  # enqueued, not waited for


def test_frame_path_into_shared_memory(tmp_path):
    """The pieces as `dreamdeck run --shm` wires them: paced frames land in the ring."""
    from engine.runtime.shm_ring import ShmRingReader
    from engine.runtime.sinks import make_sinks

    name = f"ddfp{id(tmp_path) % 100000}"
    fp = FramePath(make_sinks([f"shm:{name}"]), Pacer(200.0))
    with ShmRingReader(name) as reader:
        seen = []
        for k in range(3):
            fp.submit_block(block(k, 4), k)
            t0 = time.monotonic()
            while not (seen and seen[-1][0].index == 4 * k + 3) and time.monotonic() - t0 < 5:
                got = reader.read()
                if got is not None:
                    seen.append((got[0], got[1].copy()))
                else:
                    time.sleep(0.0005)
        fp.close()
    # 200 fps leaves the reader 5 ms a frame: it may miss one under load, never misorder
    assert len(seen) >= 10
    for info, px in seen:
        np.testing.assert_array_equal(px, block(info.block, 4).numpy()[info.index % 4])
    assert [i.index for i, _ in seen] == sorted(i.index for i, _ in seen)


def test_the_short_gil_switch_interval_is_held_while_a_frame_path_is_open():
    """The switch interval is the whole process's: frame paths hold the short one while
    any is open and give the earlier one back when the last closes (it once stayed for
    the rest of the process, and other threads' timing with it)."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        a = FramePath([], Pacer(fps=60.0), switch_interval=0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        b = FramePath([], Pacer(fps=60.0), switch_interval=0.0005)
        a.close()
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # b still open
        a.close()  # twice: counted once
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        b.close()
        assert sys.getswitchinterval() == pytest.approx(0.005)
        c = FramePath([], Pacer(fps=60.0), switch_interval=None)  # opted out: untouched
        assert sys.getswitchinterval() == pytest.approx(0.005)
        c.close()
    finally:
        sys.setswitchinterval(before)
