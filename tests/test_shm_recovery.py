"""The shared-memory output does not vanish silently (issue 14, part 6): a reader process
that unlinks the segment (Python's `SharedMemory.unlink()`, the usual pitfall), a stray
file or a directory under the ring's name: the sink notices within its check interval,
publishes the ring again, says so (`problem`, `on_problem`), and never writes into a file
that is not its own. Real segments in /dev/shm, a real reader process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.runtime.shm_ring import ShmRingReader, ShmRingSink

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux /dev/shm")

UNLINKER = """
import sys
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(sys.argv[1])  # a reader attaching the usual way...
shm.close()
shm.unlink()  # ...and removing the writer's segment
"""


def _name() -> str:
    return f"ddrc{uuid.uuid4().hex[:10]}"


def _frame(i: int) -> np.ndarray:
    return np.full((16, 24, 4), i % 256, np.uint8)


class Feeder:
    """Sends frames into a sink the way the frame publisher does."""

    def __init__(self, sink: ShmRingSink):
        self.sink, self.i = sink, 0

    def send(self, n: int = 1, pause: float = 0.0) -> None:
        for _ in range(n):
            self.i += 1
            meta = SimpleNamespace(block=self.i // 12, index=self.i, timestamp=time.time())
            self.sink.send(_frame(self.i), meta)
            if pause:
                time.sleep(pause)

    def until(self, cond, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.send(1, 0.01)
            if cond():
                return True
        return False


def _sink(name: str, problems: list[str]) -> ShmRingSink:
    s = ShmRingSink(name, on_problem=problems.append)
    s.check_s = 0.05  # the engine checks once a second; faster here, same path
    return s


def test_a_reader_that_unlinks_the_ring_is_survived(tmp_path):
    name, problems = _name(), []
    sink = _sink(name, problems)
    feed = Feeder(sink)
    feed.send(3)
    early = ShmRingReader(name)  # attached before the unlink
    assert early.read() is not None
    r = subprocess.run([sys.executable, "-c", UNLINKER, name], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not Path(f"/dev/shm/{name}").exists()
    assert feed.until(lambda: Path(f"/dev/shm/{name}").exists()), "the ring was not published"
    assert sink.recreated == 1 and problems and "removed by another process" in problems[0]
    assert "removed" in sink.problem
    # a reader that comes now finds it; the one attached before moves over by itself
    fresh = ShmRingReader(name)
    feed.send(2)
    got = fresh.read()
    assert got is not None and got[0].index == feed.i
    assert feed.until(lambda: (g := early.read()) is not None and g[0].index == feed.i)
    assert (early.read() or (None, _frame(feed.i)))[1].tolist() == _frame(feed.i).tolist()
    # the problem is reported once per loss, not per frame
    feed.send(20, 0.01)
    assert sink.recreated == 1 and len(problems) == 1
    fresh.close()
    early.close()
    sink.close()
    assert not Path(f"/dev/shm/{name}").exists()


def test_the_ring_comes_back_after_every_loss():
    name, problems = _name(), []
    sink = _sink(name, problems)
    feed = Feeder(sink)
    feed.send(2)
    for k in range(1, 4):
        os.unlink(f"/dev/shm/{name}")
        assert feed.until(lambda k=k: sink.recreated == k and Path(f"/dev/shm/{name}").exists())
        with ShmRingReader(name) as r:
            feed.send(1)
            got = r.read()
            assert got is not None and got[0].index == feed.i
    sink.close()


def test_a_stray_file_under_the_name_is_replaced_never_written(tmp_path):
    """A small non-ring file (it used to crash the writer with struct.error) and a large
    one: the ring takes the name back; the file's bytes, kept through a second link, are
    untouched."""
    for size in (10, 4096):
        name, problems = _name(), []
        path = Path(f"/dev/shm/{name}")
        junk = os.urandom(size)
        path.write_bytes(junk)
        keep = Path(f"/dev/shm/{name}-keep")
        os.link(path, keep)
        try:
            sink = _sink(name, problems)
            feed = Feeder(sink)
            feed.send(2)
            with ShmRingReader(name) as r:
                got = r.read()
                assert got is not None and got[0].sequence == 2
            assert keep.read_bytes() == junk
            # and the same while running: the file appears in place of the live ring
            os.unlink(path)
            path.write_bytes(junk)
            assert feed.until(lambda s=sink: s.recreated == 1)
            assert "replaced" in problems[-1]
            assert keep.read_bytes() == junk
            with ShmRingReader(name) as r:
                feed.send(1)
                assert r.read()[0].index == feed.i
            sink.close()
        finally:
            keep.unlink()
            path.unlink(missing_ok=True)


def test_a_directory_under_the_name_is_reported_and_retried():
    name, problems = _name(), []
    path = Path(f"/dev/shm/{name}")
    path.mkdir()
    (path / "something").write_text("a user's file: not ours to delete")
    sink = _sink(name, problems)
    feed = Feeder(sink)
    sink.open(24, 16)  # no exception: the output is not disabled for the run
    feed.send(5, 0.01)
    assert not sink.published and problems and "taken by the directory" in problems[0]
    assert (path / "something").exists()
    (path / "something").unlink()  # the user clears it: an empty directory is removed
    assert feed.until(lambda: sink.published), sink.problem
    assert sink.problem is None
    with ShmRingReader(name) as r:
        feed.send(1)
        assert r.read()[0].index == feed.i
    sink.close()
    assert not path.exists()


def test_the_engine_shows_a_lost_ring_as_its_last_error():
    from engine.runtime.engine import tiny_engine
    from engine.runtime.frame_path import FramePath

    name = _name()
    sink = ShmRingSink(name)
    sink.check_s = 0.05
    eng = tiny_engine(frame_path=FramePath([sink]), status_interval=None)
    eng.start()
    try:
        assert eng.wait_frames(9, timeout=60)
        deadline = time.monotonic() + 60  # the publisher thread opens the ring on its frame
        while not sink.published and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.on_problem is not None and eng.status()["last_error"] is None
        os.unlink(f"/dev/shm/{name}")
        n = eng.frames_out
        assert eng.wait_frames(n + 24, timeout=60)
        assert "shm:" in (eng.status()["last_error"] or "") and sink.recreated >= 1
        assert Path(f"/dev/shm/{name}").exists()
    finally:
        eng.stop()
    assert not Path(f"/dev/shm/{name}").exists()


def test_a_ring_unlinked_before_the_writer_looked_at_its_name_is_lost():
    """A reader can unlink the name between the writer creating the segment and taking its
    identity (the engine's first frame races a reader's start): the writer then holds the
    identity of 'nothing there', which must count as lost, not as 'still ours'."""
    from engine.runtime import shm_ring

    name = _name()
    w = shm_ring.ShmRingWriter(name, 8, 8)
    try:
        assert w.lost() is None
        os.unlink(f"/dev/shm/{name}")
        w._identity = shm_ring._name_identity(name)  # what resize records after the race
        assert w._identity == (-1, -1)
        assert w.lost() == "removed by another process"
    finally:
        w.close()
