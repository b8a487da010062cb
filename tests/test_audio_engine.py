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
    x, _ = clicks(120.0, 60.0, 48000)
    pcm = tmp_path / "clicks.s16"
    pcm.write_bytes(s16(x))
    mod = tmp_path / "kick.yaml"
    mod.write_text(KICK)
    out = tmp_path / "show.mp4"
    cmd = [sys.executable, "-m", "engine", "run", "--model", "tiny", "--height", "64"]
    cmd += ["--width", "64", "--steps", "1000,750", "--no-osc", "--no-shm", "--record", str(out)]
    cmd += ["--duration", "6", "--audio", "-", "--audio-format", "s16le:48000:1", "--mod", str(mod)]
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
    assert len(blocks) >= 20, r.stderr[-2000:]
    t = np.array([b["time"] for b in blocks])
    kv = np.array([b["values"]["kv_bias"] for b in blocks])
    assert all(
        b["changed"].get("kv_bias", b["values"]["kv_bias"]) == b["values"]["kv_bias"]
        for b in blocks
    )
    peaks = t[kv > 0.75]  # a block whose span held a click: base 0.3 + 0.5
    gaps = np.diff(t)
    span = float(t[-1] - t[0])
    # one peak per beat (120 BPM: every 0.5 s), each a beat after the last
    assert len(peaks) == pytest.approx(span / 0.5, abs=2), (len(peaks), span)
    d = np.diff(peaks)
    slack = 2 * float(gaps.max())
    assert np.all(np.abs(d - 0.5) <= slack), (d, slack)
    assert abs(float(np.median(d)) - 0.5) < 0.05
    # between beats the target falls back towards the base (0.3)
    assert kv.min() < 0.35 and reg_base_kept(lines)


def reg_base_kept(lines) -> bool:
    """The performer's kv_bias (base) was never overwritten: the header block 0 starts at
    the preset's value and no block records a base change from outside."""
    return all(0.3 - 1e-9 <= b["values"]["kv_bias"] <= 0.8 + 1e-9 for b in lines[1:])


def cpu_per_block(wav: Path | None, blocks: int = 24) -> float:
    """Median CPU time of the generation thread per block (its own thread clock: robust
    to other processes on the machine), optionally with the audio input running."""
    stamps: list[float] = []
    eng = tiny_engine(
        max_blocks=blocks,
        status_interval=None,
        on_block=lambda r: stamps.append(time.thread_time()),
    )
    inp = None
    if wav is not None:
        eng.registry.set_many(
            {"mod/1/source": "audio/level", "mod/1/target": "kv_bias", "mod/1/depth": 0.4}
        )
        inp = AudioInput(lambda: FileSource(wav), eng.registry).start()
    try:
        eng.start()
        assert eng.join(180)
        assert eng.error is None
        if inp is not None:
            assert inp.frames > 50, "the audio input ran alongside"
            assert len({r for r in [eng.registry.last_block.values["kv_bias"]]}) == 1
    finally:
        if inp is not None:
            inp.close()
        eng.stop()
    per = np.diff(stamps)[3:]
    return float(statistics.median(per))


@pytest.mark.slow
def test_audio_input_costs_the_generation_thread_nothing(tmp_path):
    x, _ = clicks(120.0, 60.0, 48000)
    wav = write_wav(tmp_path / "c.wav", x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all of a block's work on the generation thread: its CPU clock
    try:
        runs = {"none": [], "audio": []}
        for _ in range(2):  # interleaved: drifts of the machine hit both alike
            runs["none"].append(cpu_per_block(None))
            runs["audio"].append(cpu_per_block(wav))
    finally:
        torch.set_num_threads(threads)
    base, audio = min(runs["none"]), min(runs["audio"])
    assert abs(audio / base - 1) < 0.05, runs
