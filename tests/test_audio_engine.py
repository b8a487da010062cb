"""A running tiny engine with audio: a click track on stdin (a real `dreamdeck run`
process) moves its modulation target on the beats, read back from the control log; and
the audio input costs the generation thread nothing measurable (CPU time per block
within 5 % of a run without audio)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_helpers import clicks, s16, write_wav

from bridges.audio.live import AudioInput
from bridges.audio.sources import FileSource
from engine.runtime.engine import tiny_engine

ROOT = Path(__file__).resolve().parents[1]
KICK = """slots:
  - source: audio/onset
    target: kv_bias
    depth: 0.5
    attack: 0
    release: 0.05
"""


@pytest.mark.slow
def test_click_track_on_stdin_moves_the_target_on_the_beats(tmp_path):
    x, _ = clicks(60.0, 90.0, 48000)  # a click a second: several blocks between clicks
    pcm = tmp_path / "clicks.s16"
    pcm.write_bytes(s16(x))
    mod = tmp_path / "kick.yaml"
    mod.write_text(KICK)
    out = tmp_path / "show.mp4"
    cmd = [sys.executable, "-m", "engine", "run", "--model", "tiny", "--height", "64"]
    cmd += ["--width", "64", "--steps", "1000,750", "--no-osc", "--no-shm", "--record", str(out)]
    cmd += [
        "--blocks",
        "45",
        "--duration",
        "60",
        "--audio",
        "-",
        "--audio-format",
        "s16le:48000:1",
        "--mod",
        str(mod),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with pcm.open("rb") as stdin:  # read at real time by the engine itself (it paces)
        r = subprocess.run(
            cmd, cwd=ROOT, env=env, stdin=stdin, capture_output=True, text=True, timeout=240
        )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [
        json.loads(line) for line in (tmp_path / "show.controls.jsonl").read_text().splitlines()
    ]
    blocks = lines[1:][3:]  # the first blocks also carry audio heard during the warm-up
    assert len(blocks) >= 40, r.stderr[-2000:]
    t = np.array([b["time"] for b in blocks])
    kv = np.array([b["values"]["kv_bias"] for b in blocks])
    assert all(
        b["changed"].get("kv_bias", b["values"]["kv_bias"]) == b["values"]["kv_bias"]
        for b in blocks
    )
    peaks = t[kv > 0.75]  # a block whose span held a click: base 0.3 + 0.5
    gaps = np.diff(t)
    span = float(t[-1] - t[0])
    # one peak per beat (60 BPM: every second), each a beat after the last
    assert float(np.median(gaps)) < 0.4, "blocks too slow to resolve the beats"
    assert len(peaks) == pytest.approx(span / 1.0, abs=2), (len(peaks), span)
    d = np.diff(peaks)
    slack = 2 * float(gaps.max())
    assert np.all(np.abs(d - 1.0) <= slack), (d, slack)
    assert abs(float(np.median(d)) - 1.0) < 0.1
    # between beats the target falls back towards the base (0.3)
    assert kv.min() < 0.35 and reg_base_kept(lines)


def reg_base_kept(lines) -> bool:
    """The performer's kv_bias (base) was never overwritten: the header block 0 starts at
    the preset's value and no block records a base change from outside."""
    return all(0.3 - 1e-9 <= b["values"]["kv_bias"] <= 0.8 + 1e-9 for b in lines[1:])


PHASE = 4  # blocks per phase; phases alternate without / with the audio input (fine
# interleaving: the machine's load drifts over seconds, and hits both alike)


@pytest.mark.slow
def test_audio_input_costs_the_generation_thread_nothing(tmp_path):
    """One engine, phases of 10 blocks alternating without and with a live audio input
    (a click track file, paced at real time, analysed on its own thread). The generation
    thread's own CPU clock per block is compared, so other processes on the machine do
    not count, and interleaving spreads any drift over both."""
    x, _ = clicks(120.0, 5.0, 48000)  # short: each phase's start decodes it (it loops)
    wav = write_wav(tmp_path / "c.wav", x)
    phases = 24
    stamps: list[tuple[int, float]] = []
    state: dict = {"inp": None, "frames": 0}

    def on_block(result) -> None:  # the generation thread
        stamps.append((result.block, time.thread_time()))
        b = result.block + 1
        if b % PHASE == 0:
            if state["inp"] is not None:
                state["frames"] += state["inp"].frames
                state["inp"].close()
                state["inp"] = None
            elif b // PHASE < phases:
                state["inp"] = AudioInput(lambda: FileSource(wav), eng.registry).start()

    eng = tiny_engine(max_blocks=PHASE * phases, status_interval=None, on_block=on_block)
    eng.registry.set_many(
        {"mod/1/source": "audio/level", "mod/1/target": "kv_bias", "mod/1/depth": 0.4}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all of a block's work on the generation thread: its CPU clock
    try:
        eng.start()
        assert eng.join(300) and eng.error is None
    finally:
        torch.set_num_threads(threads)
        if state["inp"] is not None:
            state["inp"].close()
        eng.stop()
    assert state["frames"] > 100, "the audio input ran alongside"
    per = {"none": [], "audio": []}
    for (_, t0), (b1, t1) in zip(stamps, stamps[1:], strict=False):
        if b1 % PHASE < 1:  # the first block of a phase (the input starting or stopping)
            continue
        per["audio" if (b1 // PHASE) % 2 else "none"].append(t1 - t0)
    base, audio = statistics.median(per["none"]), statistics.median(per["audio"])
    assert abs(audio / base - 1) < 0.05, (base, audio)
