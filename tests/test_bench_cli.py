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
    # latency (computed, said so): other controls wait half a block for the boundary, then
    # the block; a prompt change joins the block in flight before its last step at the latest
    from engine.cli.bench import join_latency_ms

    assert abs(out["latency_median_boundary_ms"] - 1.5 * out["block_ms"]) < 1e-6
    assert out["latency_median_ms"] == join_latency_ms(out["stages_ms"], out["block_ms"])
    last_join = (
        out["stages_ms"]["recompute"] + out["stages_ms"]["step0"] + out["stages_ms"]["step1"]
    )
    assert abs(out["latency_median_ms"] - (1.5 * out["block_ms"] - last_join)) < 1e-6
    st = out["startup_s"]
    assert st["build"] > 0 and st["compile_and_warmup"] == out["warmup_s"] > 0
    assert st["compile_cache"] is None  # no compile on the CPU: no cache folder made


def test_bench_suite_table_is_well_formed():
    """The suite's markdown: every row has the header's columns (latency and start-up
    included), one row per case, in order."""
    from engine.cli._bench_suite import ROWS

    r = bench("--suite", "--blocks", "1", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    head, rule, *rows = lines
    assert "latency median ms" in head and "compile + warm-up s" in head
    n = head.count("|")
    assert rule.count("|") == n and all(row.count("|") == n for row in rows)
    assert [row.split("|")[1].strip() for row in rows] == [label for label, *_ in ROWS] * 2


def test_bench_bad_flags_are_one_clear_line(capsys):
    from engine.cli import main

    cases = [
        (["--steps", "750,1000"], "--steps: steps must be strictly decreasing"),
        (["--steps", "fast,slow"], "--steps: not a list of integers"),
        (["--height", "50"], "--height must be a positive multiple of 16"),
        (["--attention", "fa3", "--device", "cpu"], "needs a CUDA device"),
        (["--kv-bias", "0"], "--kv-bias must be in (0, 1]"),
        (["--drift", "-1"], "--drift takes a number of blocks"),
        (["--accuracy", "--suite"], "--accuracy / --drift run on their own"),
    ]
    for args, msg in cases:
        assert main(["bench", "--model", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_bench_accuracy_and_drift_report():
    """fp8 weights' error per layer and per block, and the fp8 KV cache's drift per block,
    measured on the tiny model in a subprocess (the 14B numbers are in PERFORMANCE.md)."""
    r = bench("--accuracy", "--drift", "3", "--steps", "1000,500", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    f = out["fp8_weights"]
    assert len(f["layers"]) == 2 and f["scaling"] == "rowwise"
    # e4m3 weights and activations: a real, small error on every layer and block
    assert all(1e-4 < row["alone"] < 0.1 for row in f["layers"])
    assert f["layers"][0]["alone"] == f["layers"][0]["accumulated"]  # same input at layer 0
    assert len(f["block_latents"]) == 2 and all(1e-4 < e < 0.2 for e in f["block_latents"])
    d = out["fp8_kv_cache_drift"]
    assert len(d) == 3 and d[0] == 0.0 and all(0 < e < 0.05 for e in d[1:])


def test_bench_reports_kv_cache_and_fusion():
    sizes = {}
    # both benches started at once: their start-ups (importing torch) overlap
    procs = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "engine", "bench", "--model", "tiny", "--json", "--blocks"]
            + ["1", "--warmup", "1", "--kv-cache", kind, "--no-fuse-qkv"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("bf16", "fp8")
    }
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        c = json.loads(out)["config"]
        # the tiny model is fp32: "bf16" (the model dtype) gives an fp32 cache, said as such
        assert c["kv_cache"] == {"bf16": "fp32", "fp8": "fp8"}[kind] and c["fused_qkv"] is False
        sizes[kind] = c["kv_cache_gb"]
    assert sizes["fp8"] < sizes["bf16"]
