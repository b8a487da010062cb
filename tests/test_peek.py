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
