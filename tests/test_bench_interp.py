"""`dreamdeck bench --interp FPS` in a subprocess: the interpolation report next to the
generation numbers (full-size random RIFE on the CPU at a tiny resolution)."""

import json
import subprocess
import sys

import pytest


def test_bench_interp_reports_cost_loss_and_latency():
    r = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--model", "tiny", "--json"]
        + ["--blocks", "2", "--warmup", "1", "--steps", "1000,750", "--interp", "30"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    it = out["interp"]
    assert it["output_fps"] == 30.0 and it["ms_per_frame"] > 0
    assert it["ms_per_call_p90"] >= it["ms_per_call"] > 0
    assert it["variant"] == "batched" and it["frames_per_call"] >= 1
    assert it["source_fps"] == out["fps"]  # output ticks between frames at the measured rate
    assert it["fps_base"] == out["fps"] and it["fps_with"] > 0
    assert it["fps_loss"] == pytest.approx(1 - it["fps_with"] / it["fps_base"])
    # one generated frame at the measured rate + one call (a pair's frames)
    assert it["added_latency_ms"] == pytest.approx(1e3 / out["fps"] + it["ms_per_call"])
    assert it["frames_interpolated"] > 0 and it["memory_gb"] is None  # CPU
    assert it["diff_vs_eager_max"] <= 1  # the measured path computes the plain path's frames


def test_bench_interp_rate_out_of_range(capsys):
    from engine.cli import main

    for bad in ("0", "500", "-30"):
        assert main(["bench", "--model", "tiny", "--interp", bad]) == 2
        err = capsys.readouterr().err
        assert "--interp takes an output rate in 1..240" in err and err.count("\n") == 1
