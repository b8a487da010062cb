"""Shared helper for the NDI tests: a child process with loopback-only NDI discovery."""

from __future__ import annotations

import os

import pytest


def run_ndi_child(tmp_path, script: str, name: str, timeout: float = 90) -> dict:
    """Run `script` (Python source, NAME as argv[1]) in a child process whose NDI runtime
    discovers on loopback only (NDI_CONFIG_DIR with 127.0.0.1 as an extra IP: mDNS multicast
    does not work on every CI network), and return the last JSON line it printed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    cfg = tmp_path / "ndi"
    cfg.mkdir(exist_ok=True)
    (cfg / "ndi-config.v1.json").write_text(
        json.dumps({"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}})
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), NDI_CONFIG_DIR=str(cfg))
    proc = subprocess.run(
        [sys.executable, "-c", script, name],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res
