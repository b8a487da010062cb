"""`dreamdeck doctor` run as a subprocess on an empty and on a complete models folder
(tiny files with valid safetensors / torch.save headers), and with a port taken."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import torch

from engine.weights import catalog

ROOT = Path(__file__).resolve().parents[1]

CPU_14B = """\
description: 14b layout on the CPU, for the doctor test
model: 14b
device: cpu
dtype: fp32
decoder: wan
text_encoder: cpu
"""


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor(*args: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "DREAMDECK_MODELS"}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "doctor", "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.strip(), r.stderr
    return r.returncode, json.loads(r.stdout)


def fill(models: Path, needs) -> None:
    for f in catalog.required_files(needs):
        p = f.path(models)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".safetensors":
            header = json.dumps(
                {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}
            ).encode()
            p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
        elif p.suffix == ".pth":
            torch.save({"w": torch.zeros(8)}, p)
        elif p.suffix == ".json":
            p.write_text("{}")
        else:
            p.write_bytes(b"\x0a\x05hello")


def test_empty_folder_lists_missing_and_the_fix(tmp_path):
    models = tmp_path / "models"
    rc, r = doctor(
        "--preset", "h100-832x480", "--models-dir", str(models),
        "--osc-port", str(free_port()), "--oscquery-port", str(free_port(socket.SOCK_STREAM)),
    )  # fmt: skip
    assert rc == 1 and r["ok"] is False
    required = {f["filename"] for f in r["files"] if f["required"]}
    assert "krea-realtime-video-14b.safetensors" in required and "taew2_1.pth" in required
    assert "Wan2_1-VACE_module_14B_bf16.safetensors" not in required
    assert all(not f["present"] for f in r["files"])
    assert f"dreamdeck download --preset h100-832x480 --models-dir {models}" in r["fixes"]
    assert any("krea-realtime-video-14b.safetensors: missing" in p for p in r["problems"])
    assert set(r["attention"]) >= {
        "flash_attn_interface",
        "flash_attn",
        "sageattention",
        "cudnn_sdpa",
    }
    assert {"shm", "ndi", "spout"} <= set(r["outputs"])


def test_complete_folder_is_ready_then_a_truncated_file_is_caught(tmp_path):
    preset = tmp_path / "cpu14b.yaml"
    preset.write_text(CPU_14B)
    models = tmp_path / "models"
    fill(models, catalog.needs_of(preset))
    ports = ["--osc-port", str(free_port()), "--oscquery-port", str(free_port(socket.SOCK_STREAM))]
    rc, r = doctor("--preset", str(preset), "--models-dir", str(models), *ports)
    assert rc == 0, r["problems"]
    req = [f for f in r["files"] if f["required"]]
    assert req and all(f["present"] and f["problem"] is None and f["size"] > 0 for f in req)
    assert r["needs"] == {"model": "14b", "decoder": "wan", "vace": False, "text_encoder": "cpu"}

    st = catalog.FILES["transformer"].path(models)
    st.write_bytes(st.read_bytes()[:-8])  # an interrupted download
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:  # and the OSC port taken
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        rc, r = doctor(
            "--preset",
            str(preset),
            "--models-dir",
            str(models),
            "--osc-port",
            str(taken),
            *ports[2:],
        )
    assert rc == 1
    assert any("truncated" in p and st.name in p for p in r["problems"])
    assert any(f"--preset {preset}" in fx for fx in r["fixes"])
    osc = next(p for p in r["ports"] if p["name"] == "osc")
    assert osc["port"] == taken and osc["free"] is False
    assert any("--osc-port" in fx for fx in r["fixes"])


def _diagnose_with_gpu(monkeypatch, tmp_path, preset: str, name: str, cap: str, total_gb: float):
    """doctor's checks against a GPU that cannot exist here: `_gpu` (what torch reports)
    is replaced by a described card; everything else is real."""
    from engine.cli import build_parser, doctor

    fake = {
        "available": True,
        "torch": torch.__version__,
        "cuda": "13.0",
        "devices": [
            {
                "index": 0,
                "name": name,
                "capability": cap,
                "memory_total_gb": total_gb,
                "memory_free_gb": total_gb,
            }
        ],
    }
    monkeypatch.setattr(doctor, "_gpu", lambda: fake)
    monkeypatch.setattr(doctor, "_attention", lambda gpu, requested: {"selected": "sdpa"})
    args = build_parser().parse_args(
        [
            "doctor",
            "--preset",
            preset,
            "--models-dir",
            str(tmp_path),
            "--osc-port",
            "0",
            "--oscquery-port",
            "0",
        ]
    )
    return doctor.diagnose(args)


def test_fp8_preset_on_a_card_without_fp8_is_a_problem(monkeypatch, tmp_path):
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "rtx4090-576x320", "RTX A6000", "8.6", 48.0)
    assert any("fp8 tensor cores" in p and "8.6" in p for p in r["problems"])
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "rtx4090-576x320", "RTX 4090", "8.9", 24.0)
    assert not any("fp8 tensor cores" in p for p in r["problems"]), r["problems"]


def test_memory_estimate_follows_the_measured_peaks(monkeypatch, tmp_path):
    # bf16 14B at 832x480 with UMT5 on the GPU: about 28 + 6.9 + 10.6 GB: a 32 GB card warns
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "h100-832x480", "RTX 5090", "12.0", 32.0)
    assert any("needs roughly 45 GB" in w for w in r["warnings"]), r["warnings"]
    # fp8 at 832x480 with UMT5 on the CPU: about 21 GB, so a 24 GB card is fine (run 11: 20.8)
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "rtx4090-832x480", "RTX 4090", "8.9", 24.0)
    assert not any("needs roughly" in w for w in r["warnings"]), r["warnings"]
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "rtx4090-832x480", "RTX 4060 Ti", "8.9", 16.0)
    assert any("needs roughly 21 GB" in w for w in r["warnings"]), r["warnings"]
    # the 32 GB preset fits a 32 GB card (fp8, UMT5 on the CPU: about 25 GB)
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "rtx5090-832x480", "RTX 5090", "12.0", 32.0)
    assert not any("needs roughly" in w for w in r["warnings"]), r["warnings"]
