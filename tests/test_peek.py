"""``dreamdeck peek`` in a subprocess reads what a writer in this process publishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.shm_ring import ShmRingWriter

ROOT = Path(__file__).resolve().parents[1]


def _peek(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "peek", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        **kw,
    )


def test_peek_prints_new_frames_as_json():
    name = f"ddpeek{os.getpid()}"
    frames = {}
    with ShmRingWriter(name, 20, 10, slots=4) as w:
        proc = _peek("--shm", name, "--count", "5", "--timeout", "20")
        seq, t_end = 0, time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < t_end:
            seq += 1
            px = np.random.default_rng(seq).integers(0, 256, (10, 20, 4), dtype=np.uint8)
            frames[seq] = zlib.crc32(px)
            w.write(px, block=seq // 3, index=1000 + seq)
            time.sleep(0.01)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert len(lines) == 5
    seqs = [x["sequence"] for x in lines]
    assert seqs == sorted(set(seqs))
    for x in lines:
        assert (x["width"], x["height"], x["generation"]) == (20, 10, 1)
        assert x["block"] == x["sequence"] // 3 and x["index"] == 1000 + x["sequence"]
        assert x["crc32"] == frames[x["sequence"]]  # the exact pixels written


def test_peek_without_a_ring_fails_clearly():
    proc = _peek("--shm", f"ddnone{os.getpid()}", "--count", "1", "--timeout", "0.3")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == ""
    assert "no ring" in err and "0 of 1" in err
    proc = _peek("--shm", "bad/name", "--count", "1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "bad shared-memory name" in err


def test_peek_stats_reports_the_rings_own_frame_times():
    """A writer stamps frames 20 ms and 30 ms apart in turn (explicit timestamps, written
    at about that pace): whatever frames the reader catches, the intervals between
    consecutive ones have mean 25 ms and standard deviation 5 ms. Pixels repeat in pairs,
    so about half the frames are distinct."""
    name = f"ddstat{os.getpid()}"
    with ShmRingWriter(name, 16, 8, slots=4) as w:
        proc = _peek("--shm", name, "--stats", "1.5", "--json", "--timeout", "20")
        seq, stamp, t_end = 0, 1000.0, time.monotonic() + 40
        while proc.poll() is None and time.monotonic() < t_end:
            seq += 1
            stamp += 0.020 if seq % 2 else 0.030
            px = np.full((8, 16, 4), (seq // 2) % 251, dtype=np.uint8)
            w.write(px, block=seq, timestamp=stamp)
            time.sleep(0.020 if seq % 2 else 0.030)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    st = json.loads(out.strip().splitlines()[-1])
    assert st["timing"].startswith("ring timestamps")
    assert st["frames"] >= 20 and st["intervals"] >= 10, st
    assert st["frames"] + st["missed"] >= 55  # 1.5 s of frames 25 ms apart
    assert abs(st["mean_ms"] - 25.0) < 1.0 and abs(st["std_ms"] - 5.0) < 0.5, st
    assert st["max_gap_ms"] == pytest.approx(30.0, abs=1e-6)
    assert st["min_ms"] == pytest.approx(20.0, abs=1e-6)
    assert st["off_by_2ms"] == st["intervals"]  # every interval is 5 ms off the mean
    assert st["distinct"] <= st["frames"] // 2 + 2


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_peek_stats_refuses_a_bad_duration(bad):
    proc = _peek("--shm", f"ddnone{os.getpid()}", "--stats", bad, "--timeout", "0.3")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "--stats" in err and out == ""


def test_frame_stats_leaves_out_intervals_across_missed_frames():
    from engine.cli.peek import frame_stats

    samples = [(1, 0.0, 0.0, 1), (2, 0.010, 0.01, 2), (5, 0.100, 0.1, 2), (6, 0.110, 0.11, 3)]
    st = frame_stats(samples)
    assert st["missed"] == 2 and st["intervals"] == 2 and st["distinct"] == 3
    assert st["mean_ms"] == pytest.approx(10.0) and st["std_ms"] == pytest.approx(0.0, abs=1e-9)
    assert frame_stats(samples[:1])["intervals"] == 0
