"""`dreamdeck doctor` (human output, a real subprocess) says which missing files are
optional: the VACE module for a preset without VACE, the decoder a preset does not use;
the files the preset needs are plainly missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doctor_lines(*args: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DREAMDECK_MODELS"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "doctor",
            *args,
            "--osc-port",
            "0",
            "--oscquery-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout, r.stderr
    return {
        line.split()[-1].rsplit("/", 1)[-1]: line for line in r.stdout.splitlines() if "/" in line
    }


def test_missing_files_say_whether_they_are_optional(tmp_path):
    lines = doctor_lines("--preset", "h100-832x480", "--models-dir", str(tmp_path / "m"))
    vace = lines["Wan2_1-VACE_module_14B_bf16.safetensors"]
    assert "missing (optional: only for VACE" in vace and not vace.lstrip().startswith("*")
    model = lines["krea-realtime-video-14b.safetensors"]
    assert model.lstrip().startswith("*") and "missing" in model and "optional" not in model
    # with no preset nothing is marked needed, but VACE is still said to be optional
    lines = doctor_lines("--models-dir", str(tmp_path / "m"))
    assert "optional: only for VACE" in lines["Wan2_1-VACE_module_14B_bf16.safetensors"]
    assert "optional" not in lines["krea-realtime-video-14b.safetensors"]
