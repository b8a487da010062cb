"""`dreamdeck doctor` (human output, a real subprocess) says which missing files are
optional: the VACE module for a preset without VACE, the decoder a preset does not use;
the files the preset needs are plainly missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_doctor(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DREAMDECK_MODELS"}
    cmd = [sys.executable, "-m", "engine", "doctor", *args, "--osc-port", "0"]
    cmd += ["--oscquery-port", "0"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def doctor_lines(proc: subprocess.Popen) -> dict[str, str]:
    out, err = proc.communicate(timeout=120)
    assert out, err
    return {line.split()[-1].rsplit("/", 1)[-1]: line for line in out.splitlines() if "/" in line}


def test_missing_files_say_whether_they_are_optional(tmp_path):
    # both doctors started at once: their start-ups (importing torch) overlap
    with_preset = start_doctor("--preset", "h100-832x480", "--models-dir", str(tmp_path / "m"))
    without = start_doctor("--models-dir", str(tmp_path / "m"))
    lines = doctor_lines(with_preset)
    vace = lines["Wan2_1-VACE_module_14B_bf16.safetensors"]
    assert "missing (optional: only for VACE" in vace and not vace.lstrip().startswith("*")
    model = lines["krea-realtime-video-14b.safetensors"]
    assert model.lstrip().startswith("*") and "missing" in model and "optional" not in model
    # with no preset nothing is marked needed, but VACE is still said to be optional
    lines = doctor_lines(without)
    assert "optional: only for VACE" in lines["Wan2_1-VACE_module_14B_bf16.safetensors"]
    assert "optional" not in lines["krea-realtime-video-14b.safetensors"]
