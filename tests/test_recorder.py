"""The recorder: H.264 fragmented mp4 + control log, read back with PyAV."""

import av
import numpy as np
import pytest
import torch

from engine.runtime.control_log import read_control_log
from engine.runtime.recorder import Recorder, RecorderError

H, W = 64, 96


def smooth_block(n: int, seed: int) -> np.ndarray:
    """Smooth gradients (H.264 keeps them well, so decoded pixels can be compared)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W, 4), np.uint8)
    for i in range(n):
        p = seed * 7 + i
        out[i, ..., 0] = (x / W * 200 + p * 3) % 256
        out[i, ..., 1] = (y / H * 200 + p * 5) % 256
        out[i, ..., 2] = 128 + 60 * np.sin((x + y + p * 4) / 15)
        out[i, ..., 3] = 255
    return out


def record(i: int) -> dict:
    return {"block": i, "time": float(i), "values": {"seed": 1}, "changed": {}, "events": []}


def decode(path):
    with av.open(str(path)) as c:
        return [(f.to_ndarray(format="rgb24"), float(f.time)) for f in c.decode(video=0)]


def test_constant_rate_recording_reads_back(tmp_path):
    out = tmp_path / "show.mp4"
    rec = Recorder(out, width=W, height=H, fps=16, header={"model": "tiny"})
    blocks = [smooth_block(9 if b == 0 else 12, b) for b in range(3)]
    for b, frames in enumerate(blocks):
        assert rec.submit(torch.from_numpy(frames) if b == 1 else frames, record(b), wait=True)
    rec.close()
    rec.close()  # idempotent
    got = decode(out)
    want = np.concatenate(blocks)[..., :3]
    assert len(got) == 33 == rec.frames_written
    assert [t for _, t in got] == pytest.approx([i / 16 for i in range(33)])
    err = np.abs(np.stack([g for g, _ in got]).astype(np.float32) - want).mean()
    assert err < 6, err  # lossy, but the same pictures
    log = read_control_log(tmp_path / "show.controls.jsonl")
    assert log.header["model"] == "tiny" and log.header["width"] == W
    assert [b["block"] for b in log.blocks] == [0, 1, 2] and log.frames == 33
    assert [b["frames"] for b in log.blocks] == [9, 12, 12]


def test_same_frames_give_the_same_bytes(tmp_path):
    paths = []
    for k in range(2):
        p = tmp_path / f"r{k}.mp4"
        rec = Recorder(p, width=W, height=H, fps=16)
        for b in range(2):
            rec.submit(smooth_block(12, b), record(b), wait=True)
        rec.close()
        paths.append(p)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_live_stamps_follow_block_times(tmp_path):
    out = tmp_path / "live.mp4"
    rec = Recorder(out, width=W, height=H, fps=None)
    t0 = 1000.0
    for b, when in enumerate([t0, t0 + 1.0, t0 + 1.5]):  # a slow block, then a fast one
        rec.submit(smooth_block(9 if b == 0 else 12, b), record(b), when=when)
    rec.close()
    times = [t for _, t in decode(out)]
    assert len(times) == 33
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    # block 1's 12 frames span one second, block 2's half a second
    assert times[21] - times[9] == pytest.approx(1.0, abs=0.01)
    assert times[32] - times[21] == pytest.approx(11 * 0.5 / 12, abs=0.01)


def test_live_stamps_after_a_pause_hold_the_last_frame(tmp_path):
    out = tmp_path / "paused.mp4"
    rec = Recorder(out, width=W, height=H, fps=None)
    for b, when in enumerate([100.0, 100.75, 101.5, 131.5, 132.25]):  # paused 29 s
        rec.submit(smooth_block(9 if b == 0 else 12, b), record(b), when=when)
    rec.close()
    times = [t for _, t in decode(out)]
    step = [b - a for a, b in zip(times, times[1:], strict=False)]
    # block 3 (frames 33..44) is not stretched over the pause: it keeps the usual pace,
    # and the pause is one long held frame before it
    assert max(step[33:44]) < 0.2
    assert max(step) == pytest.approx(step[32]) and step[32] > 25


def test_a_full_queue_drops_blocks_but_the_log_stays_complete(tmp_path):
    out = tmp_path / "drop.mp4"
    rec = Recorder(out, width=W, height=H, fps=16, queue_blocks=1)
    frames = smooth_block(12, 0)
    accepted = [rec.submit(frames, record(b)) for b in range(40)]
    assert False in accepted  # submit is far faster than x264: the queue of one overflows
    rec.close()
    log = read_control_log(rec.log_path)
    assert [b["block"] for b in log.blocks] == list(range(40))  # in order, none missing
    assert [b["frames"] > 0 for b in log.blocks] == accepted
    assert rec.blocks_dropped == accepted.count(False)
    assert len(decode(out)) == log.frames == 12 * accepted.count(True)


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(RecorderError, match="even sizes"):
        Recorder(tmp_path / "a.mp4", width=95, height=64)
    with pytest.raises(RecorderError, match=r"\.mp4"):
        Recorder(tmp_path / "a.avi", width=96, height=64)
    with pytest.raises(RecorderError, match="does not exist"):
        Recorder(tmp_path / "nope" / "a.mp4", width=96, height=64)
    assert list(tmp_path.iterdir()) == []
    rec = Recorder(tmp_path / "b.mp4", width=W, height=H)
    rec.submit(np.zeros((12, 32, 32, 4), np.uint8), record(0), wait=True)  # wrong size
    rec.close()
    assert isinstance(rec.error, RecorderError) and "expected [T, 64, 96, 4]" in str(rec.error)


def test_a_process_killed_before_its_first_block_leaves_a_playable_empty_mp4(tmp_path):
    """The header is written when the recorder opens: a process that dies before the
    encoder got to a block (killed, or its shutdown abandoned) still leaves an mp4 that
    opens, with no frames, next to its control log. A real process ended by SIGKILL."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "early.mp4"
    code = (
        "import os, signal, sys\n"
        "from engine.runtime.recorder import Recorder\n"
        f"rec = Recorder({str(out)!r}, width={W}, height={H}, fps=None)\n"
        "print('open', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "open"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.width == W
        assert sum(1 for _ in c.decode(video=0)) == 0
    assert out.with_name("early.controls.jsonl").exists()
