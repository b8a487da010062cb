"""Reference tools start fast: `dreamdeck osc --list` (and --markdown, `--help`) build the
control registry without importing torch (several seconds on a cold start). Checked on a
real subprocess with Python's own import log (-X importtime), not by timing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(*argv: str) -> tuple[set[str], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "engine", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, r.stdout


@pytest.mark.parametrize("argv", [["osc", "--list"], ["osc", "--markdown"], ["--help"]])
def test_reference_tools_do_not_import_torch(argv):
    names, out = imported_modules(*argv)
    assert "engine.runtime.controls" in names or argv == ["--help"]
    heavy = {n for n in names if n.split(".")[0] in ("torch", "av", "transformers")}
    assert not heavy, sorted(heavy)[:10]
    if argv[0] == "osc":
        assert "/dd/vace/fit" in out  # the input-video names came from the light module


def test_the_light_names_are_the_ones_the_inputs_use():
    from engine.runtime import input_names
    from engine.runtime.inputs import base, live

    assert base.FIT_MODES is input_names.FIT_MODES
    assert live.MASK_MODES is input_names.MASK_MODES and live.KINDS is input_names.SOURCE_KINDS
