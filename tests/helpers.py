"""Small helpers the tests share: error measure, polling, the diffusers twin's config, the
TouchDesigner ring writer as a process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHM_WRITER = ROOT / "examples" / "touchdesigner" / "dreamdeck_shm_writer.py"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `cond` until it holds (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def diffusers_wan_kwargs(cfg) -> dict:
    """diffusers' WanTransformer3DModel / WanVACETransformer3DModel arguments for a WanConfig."""
    return dict(
        patch_size=cfg.patch,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )


def start_shm_writer(name: str, width: int, height: int, fps: float = 40.0) -> subprocess.Popen:
    """examples/touchdesigner/dreamdeck_shm_writer.py writing a test pattern into ring `name`."""
    cmd = [sys.executable, str(SHM_WRITER), "--name", name, "--width", str(width)]
    cmd += ["--height", str(height), "--fps", str(fps)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def imports_in_fresh_process(code: str, module: str, timeout: float = 120) -> bool:
    """Run `code` in a new Python process (the repo root as its folder) and say whether it
    left `module` in sys.modules; fails the test, with its stderr, if the code fails."""
    probe = f"{code}\nimport sys\nprint({module!r} in sys.modules)\n"
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0 and r.stdout.strip() in ("True", "False"), r.stderr[-2000:]
    return r.stdout.strip() == "True"
