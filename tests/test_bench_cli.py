"""`dreamdeck bench --model tiny` end to end in a subprocess, as a user runs it."""

import json
import subprocess
import sys


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--model", "tiny", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_tiny_json():
    r = bench("--json", "--blocks", "3", "--warmup", "2", "--steps", "1000,750,500")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in [
        "fps",
        "block_ms",
        "stages_ms",
        "peak_memory_allocated_gb",
        "peak_memory_reserved_gb",
        "device",
        "torch",
        "attention",
        "config",
        "latency_ms",
        "first_block_ms",
    ]:
        assert key in out, key
    assert set(out["stages_ms"]) == {"recompute", "step0", "step1", "step2"}
    assert out["fps"] > 0 and out["frames_per_block"] == 12
    assert abs(out["fps"] - 12000 / out["block_ms"]) < 1e-6
    # each stage is part of every block, so its median cannot exceed the block's median
    assert all(0 < v <= out["block_ms"] for v in out["stages_ms"].values())
    c = out["config"]
    assert (c["model"], c["dim"], c["layers"], c["height"], c["width"]) == ("tiny", 64, 2, 64, 96)
    assert c["steps"] == [1000, 750, 500] and c["kv_bias"] == 0.3 and c["dtype"] == "fp32"
    assert out["attention"] == "sdpa" and out["device"].startswith("cpu")


def test_bench_bad_flags_are_one_clear_line(capsys):
    from engine.cli import main

    cases = [
        (["--steps", "750,1000"], "--steps: steps must be strictly decreasing"),
        (["--steps", "fast,slow"], "--steps: not a list of integers"),
        (["--height", "50"], "--height must be a positive multiple of 16"),
        (["--attention", "fa3", "--device", "cpu"], "needs a CUDA device"),
        (["--kv-bias", "0"], "--kv-bias must be in (0, 1]"),
    ]
    for args, msg in cases:
        assert main(["bench", "--model", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
