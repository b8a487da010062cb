"""Shared-memory ring: writer (engine/runtime/shm_ring.py) against readers in other
processes, including the TouchDesigner reader's core (an independent implementation of
docs/shared-memory.md), so the two agree on the format byte for byte."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.shm_ring import (
    FLAG_CLOSED,
    FLAG_SUPERSEDED,
    RingError,
    ShmRingReader,
    ShmRingSink,
    ShmRingWriter,
)
from engine.runtime.sinks import FrameMeta

ROOT = Path(__file__).resolve().parents[1]
TD_READER = ROOT / "examples" / "touchdesigner" / "dreamdeck_shm_top.py"
_count = [0]


@pytest.fixture
def ring_name():
    _count[0] += 1
    name = f"ddt{os.getpid()}_{_count[0]}"
    yield name
    if os.name != "nt":  # a test that failed half-way must not leave segments behind
        import _posixshmem

        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            pass


def pattern(seq: int, h: int, w: int) -> np.ndarray:
    """A frame whose every byte depends on its sequence, position and channel."""
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(4), indexing="ij")
    return ((x * 3 + y * 7 + c * 5 + seq * 11) % 256).astype(np.uint8)


def test_roundtrip_and_newest_slot(ring_name):
    with ShmRingWriter(ring_name, 16, 8, slots=3) as w, ShmRingReader(ring_name) as r:
        assert r.read() is None  # nothing written yet
        for s in range(1, 6):
            assert w.write(pattern(s, 8, 16), block=s // 2, index=100 + s, timestamp=s) == s
        info, px = r.read()  # five written, ring of three: the newest wins
        assert (info.sequence, info.block, info.index, info.timestamp) == (5, 2, 105, 5.0)
        assert (info.width, info.height, info.generation) == (16, 8, 1)
        np.testing.assert_array_equal(px, pattern(5, 8, 16))
        assert r.read() is None  # nothing new
        w.write(pattern(6, 8, 16))
        info, px = r.read(flip=True)
        np.testing.assert_array_equal(px, pattern(6, 8, 16)[::-1])


def test_torn_slot_is_skipped(ring_name):
    """A slot whose seq_begin moved on (writer mid-write) is never returned."""
    with ShmRingWriter(ring_name, 4, 2, slots=3) as w, ShmRingReader(ring_name) as r:
        for s in (1, 2):
            w.write(pattern(s, 2, 4))
        # Fake the writer having started frame 4 into slot 2's place... i.e. the slot of
        # sequence 2 (index 2 % 3) now has seq_begin 5 but still seq_end 2.
        base = 128 + 2 * w._stride
        struct.pack_into("<Q", w._seg.buf, base, 5)
        info, px = r.read()
        assert info.sequence == 1
        np.testing.assert_array_equal(px, pattern(1, 2, 4))


def test_bad_frames_change_nothing(ring_name):
    with ShmRingWriter(ring_name, 4, 2) as w:
        w.write(pattern(1, 2, 4))
        for bad, what in [
            (np.zeros((2, 4, 4), np.float32), "uint8"),
            (np.zeros((2, 4, 3), np.uint8), "4 channels"),
            (np.zeros((8, 4), np.uint8), "uint8 \\[H, W, 4\\]"),
            ([[1, 2]], "list"),
        ]:
            with pytest.raises(ValueError, match=what):
                w.write(bad)
        assert (w.sequence, w.generation, w.width, w.height) == (1, 1, 4, 2)
        with ShmRingReader(ring_name) as r:
            assert r.read()[0].sequence == 1
    with pytest.raises(ValueError, match="name"):
        ShmRingWriter("a/b", 4, 2)
    with pytest.raises(ValueError, match="slots"):
        ShmRingWriter(ring_name, 4, 2, slots=1)


def test_version_mismatch_is_a_clear_error(ring_name):
    with ShmRingWriter(ring_name, 4, 2) as w:
        struct.pack_into("<H", w._seg.buf, 4, 99)
        with pytest.raises(RingError, match="version 99"):
            ShmRingReader(ring_name).read()


def test_writer_restart_and_stale_takeover(ring_name):
    r = ShmRingReader(ring_name)
    w = ShmRingWriter(ring_name, 4, 2)
    w.write(pattern(1, 2, 4))
    assert r.read()[0].generation == 1
    # A writer that went away without closing (crash): a new one takes the name over,
    # continues the generation count and tells the old segment's readers to move.
    old_buf = w._seg.buf
    w2 = ShmRingWriter(ring_name, 6, 2)
    assert struct.unpack_from("<I", old_buf, 44)[0] & FLAG_SUPERSEDED
    w2.write(pattern(7, 2, 6), block=3)
    info, px = r.read()
    assert (info.generation, info.width, info.block) == (2, 6, 3)
    np.testing.assert_array_equal(px, pattern(7, 2, 6))
    del old_buf
    w._pixels = []  # the crashed writer's own mapping goes away with its process
    w._seg.close()
    w2.close()
    assert struct.unpack_from("<I", r._seg.buf, 44)[0] & FLAG_CLOSED
    assert r.read() is None  # closed, nothing new: the caller keeps its last frame
    w3 = ShmRingWriter(ring_name, 4, 4)
    w3.write(pattern(9, 4, 4))
    assert r.read()[0].height == 4  # a restarted engine is picked up again
    w3.close()
    r.close()


def test_sink_writes_meta(ring_name):
    sink = ShmRingSink(ring_name, slots=4)
    sink.open(8, 4)
    sink.send(pattern(1, 4, 8), FrameMeta(block=7, index=42, timestamp=123.5))
    with ShmRingReader(ring_name) as r:
        info, px = r.read()
    assert (info.block, info.index, info.timestamp) == (7, 42, 123.5)
    assert sink.name == f"shm:{ring_name}"
    sink.close()


_TD_READER_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    import numpy as np
    spec = importlib.util.spec_from_file_location("td", sys.argv[1])
    td = importlib.util.module_from_spec(spec); spec.loader.exec_module(td)
    assert "torch" not in sys.modules and "engine" not in sys.modules
    name, want, nsizes = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    r = td.RingReader(name)
    seen, t0, sizes = [], time.monotonic(), set()
    print("ready", flush=True)
    while time.monotonic() - t0 < 20 and (len(sizes) < nsizes or len(seen) < want):
        got = r.read(flip=True)
        if got is None:
            time.sleep(0.0005); continue
        info, px = got
        h, w = info["height"], info["width"]
        y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(4), indexing="ij")
        ref = ((x * 3 + y * 7 + c * 5 + info["sequence"] * 11) % 256).astype(np.uint8)
        info["ok"] = bool(np.array_equal(px, ref[::-1]))
        seen.append(info); sizes.add((w, h))
    print(json.dumps(seen), flush=True)
    """
)


def test_td_reader_in_another_process_sees_frames_in_order_across_resize(ring_name):
    w = ShmRingWriter(ring_name, 32, 16, slots=3)
    child = subprocess.Popen(
        [sys.executable, "-c", _TD_READER_CHILD, str(TD_READER), ring_name, "20", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        seq = 0
        for h, wd in ((16, 32), (24, 48)):
            t_end = time.monotonic() + 0.5
            while time.monotonic() < t_end:
                seq += 1
                w.write(pattern(seq, h, wd), block=seq // 12)
                time.sleep(0.004)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        w.close()
    seen = json.loads(out.strip().splitlines()[-1])
    assert len(seen) >= 20
    assert all(f["ok"] for f in seen), "pixels differ from what was written"
    seqs = [f["sequence"] for f in seen]
    assert seqs == sorted(set(seqs)), "frames out of order or repeated"
    gens = [(f["generation"], f["width"], f["height"]) for f in seen]
    assert gens[0] == (1, 32, 16) and gens[-1] == (2, 48, 24)
    assert gens == sorted(gens)  # never back to the old generation


_KILLED_READER_CHILD = textwrap.dedent(
    """
    import sys
    from engine.runtime.shm_ring import ShmRingReader
    r = ShmRingReader(sys.argv[1])
    print("ready", flush=True)
    while True:
        r.last_sequence = 0  # re-read the newest slot forever: always mid-copy
        r.read()
    """
)


def test_reader_killed_mid_read_and_reader_exit_leave_writer_intact(ring_name):
    w = ShmRingWriter(ring_name, 512, 512, slots=3)  # 1 MiB frames: reads take a while
    w.write(pattern(1, 512, 512))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_READER_CHILD, ring_name], stdout=subprocess.PIPE, env=env
    )
    assert killed.stdout.readline().strip() == b"ready"
    for s in range(2, 40):
        w.write(pattern(s, 512, 512))
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
    killed.wait(10)
    # A reader that exits normally (resource tracker, atexit) must not unlink it either.
    subprocess.run(
        [sys.executable, "-c", _TD_READER_CHILD, str(TD_READER), ring_name, "1", "1"],
        env=env,
        timeout=30,
        capture_output=True,
    )
    time.sleep(0.2)  # give any resource tracker time to (wrongly) clean up
    t0 = time.perf_counter()
    seq = w.write(pattern(40, 512, 512))
    assert time.perf_counter() - t0 < 0.5
    with ShmRingReader(ring_name) as r:
        info, px = r.read()
    assert info.sequence == seq == 40 and info.generation == 1
    np.testing.assert_array_equal(px, pattern(40, 512, 512))
    w.close()
