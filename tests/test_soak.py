"""The soak (issue 14): `dreamdeck soak`'s driver at CI size against a real tiny engine
process: 1 kHz valid changes, malformed and pathological datagrams, a ring reader killed
and restarted, the ring unlinked, a recording started and stopped, the input lost and
back, alternating with idle windows. The ≥ 30 min run is the same code with
`dreamdeck soak --minutes 30` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import sys

import av
import pytest

from engine.cli.soak import SoakConfig, run_soak
from engine.runtime.control_log import log_path_for, read_control_log


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /dev/shm")
def test_soak_at_ci_size(tmp_path):
    # Short windows, alternating: the shared machine's drift falls on idle and load alike.
    # The whole process's CPU per frame is reported, not judged, here: on two shared cores
    # a block takes about a second, and the datagrams' fixed cost per second is then a
    # large part of each frame; the generation thread's CPU per frame is judged
    # (docs/RELIABILITY.md). The long run judges both.
    cfg = SoakConfig(seconds=16, window=2, cycle=16, workdir=tmp_path, judge_process_cpu=False)
    r = run_soak(cfg)
    checks = r["checks"]
    detail = {k: r[k] for k in r if k not in ("config",)}
    assert all(checks.values()), json.dumps(detail, default=str)
    # what the checks stand on, seen from here
    assert r["sent"]["valid"] >= 0.8 * cfg.seconds * cfg.rate
    assert r["sent"]["bad"] >= 0.8 * cfg.seconds * cfg.bad_rate
    assert r["errors_answered"] > 0.5 * r["sent"]["bad"]  # bad datagrams get /dd/error
    assert not r["mismatched"] and r["exit_code"] == 0
    assert r["windows_compared"]["load"] >= 2 and r["windows_compared"]["idle"] >= 2
    assert r["generation_cpu_ms_per_frame"]["ratio"] <= 1.10
    whats = [w for _, w in r["events"]]
    for event in ("record on", "record off", "reader killed", "reader restarted"):
        assert event in whats
    assert "ring unlinked" in whats and "input lost" in whats and "input back" in whats
    mp4s = sorted((tmp_path / "recordings").glob("*.mp4"))
    assert mp4s
    for mp4 in mp4s:  # decoded here too, not only by the soak
        with av.open(str(mp4)) as c:
            frames = sum(1 for _ in c.decode(video=0))
        assert frames == read_control_log(log_path_for(mp4)).frames > 0
