"""VACE, reference images, live input and V2V through the tiny engine (CPU, random weights).

Real processes: the TouchDesigner example's ring writer feeds `vace/source shm:NAME`; it is
killed and restarted under the running engine. Oracles: the engine's own text-only
stream (a fresh pipeline, the same controls, no input), the input fallback's rule
(a block that starts more than its span after the last frame is not live), and the
registry's contract (a bad value raises and leaves everything as it was).
"""

import subprocess
import time
import uuid

import numpy as np
import pytest
import torch
from helpers import start_shm_writer, wait_for
from PIL import Image

from engine.cli import main
from engine.runtime.block_driver import BlockDriver
from engine.runtime.controls import REF_FROM_INPUT, make_registry
from engine.runtime.engine import Engine
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import Vace, load_preset
from engine.runtime.registry import ControlError
from engine.runtime.shm_ring import ShmRingReader

HOLD_S = 0.3
PRESET = load_preset("tiny").replace(
    height=64, width=64, steps=[1000, 750], vace=Vace(enabled=True, hold_s=HOLD_S)
)
STALE_S = 0.25  # the fallback's freshness floor (engine/runtime/inputs/fallback.py)


def start_writer(name: str, fps: float = 40.0) -> subprocess.Popen:
    return start_shm_writer(name, 48, 32, fps)


def text_only_frames(preset, blocks: int) -> list[torch.Tensor]:
    """The same tiny engine's blocks with no input at all (a fresh pipeline, same seed)."""
    pipeline = build_pipeline(preset)
    reg = make_registry(default_prompt=preset.prompt, default_steps=preset.steps)
    reg.set_many(preset.control_defaults())
    driver = BlockDriver(pipeline, registry=reg)
    try:
        return [driver.step(reg.begin_block(b)).rgba.clone() for b in range(blocks)]
    finally:
        pipeline.close()


def test_writer_process_drives_vace_falls_back_within_a_block_and_recovers():
    name = "ddv" + uuid.uuid4().hex[:8]
    w = start_writer(name)
    preset = PRESET.replace(vace=Vace(enabled=True, hold_s=HOLD_S, source=f"shm:{name}"))
    log: list[tuple[int, float, dict, torch.Tensor | None]] = []
    spans: list[float] = []  # the span each block's input covered (the driver's estimate)

    def on_block(r):
        keep = r.rgba.clone() if len(log) < 64 else None
        log.append((r.block, r.controls.time, r.record["input"], keep))
        spans.append(engine.driver._block_s or 0.0)

    # The writer is a separate Python process: on a loaded machine it may take seconds to
    # start. Wait for its first frame, so the first VACE block comes within the 64 kept.
    with ShmRingReader(name) as reader:
        assert wait_for(lambda: reader.read() is not None, 60), (
            w.stderr.read1().decode() if w.poll() else "the writer wrote no frame"
        )
    engine = Engine(build_pipeline(preset), status_interval=None, on_block=on_block)
    engine.start()
    try:
        # frames flow: VACE acts on blocks whose input is live
        assert wait_for(lambda: any(e[2]["vace"] for e in log), 30), (
            w.stderr.read1().decode() if w.poll() else engine.status()
        )
        assert "live" in engine.status()["vace_input"]
        first = next(e for e in log if e[2]["vace"])
        assert first[2]["state"] == "live" and first[0] < 64
        # ... and the output differs from text only exactly from that block on
        ref = text_only_frames(PRESET, first[0] + 1)
        for b, _, inp, rgba in log[: first[0]]:
            assert not inp["vace"] and torch.equal(rgba, ref[b]), b
        assert not torch.equal(first[3], ref[first[0]])

        # V2V on the same input, then with the motion-adaptive strength
        engine.registry.set_many({"v2v/enabled": True, "v2v/strength": 0.3})
        assert wait_for(lambda: log[-1][2]["v2v_strength"] == 0.3, 30)
        engine.registry.set("v2v/auto", True)
        assert wait_for(lambda: log[-1][2]["v2v_strength"] not in (None, 0.3), 30)
        engine.registry.set("v2v/enabled", False)
        assert wait_for(lambda: log[-1][2]["v2v_strength"] is None, 30)

        # a grab takes the input's current frame as reference image 2
        engine.registry.set("vace/ref/2/grab", 1)
        assert wait_for(lambda: engine.pipeline.vace.refs.count == 1, 10)
        assert wait_for(lambda: engine.registry.get("vace/ref/2") == REF_FROM_INPUT, 5)
        engine.registry.set("vace/ref/clear", 1)  # (a reference alone would keep VACE on)
        assert wait_for(lambda: engine.pipeline.vace.refs.count == 0, 10)

        # kill the writer: every block that starts more than its span after the last frame
        # is no longer live (holding, then text only after hold_s), and status says so.
        # Each block is judged by the span the engine used for it (recorded per block), not
        # a span measured before the kill: on a loaded machine block times wander.
        n_before = len(log)
        w.kill()
        w.wait()
        killed = time.time()
        assert wait_for(lambda: "text only" in str(engine.status()["vace_input"]), 30)
        # (status changes as the block starts; its log entry comes when it is done)
        assert wait_for(lambda: any(e[2]["state"] == "text_only" for e in log[n_before:]), 30)
        n_after = len(log)
        after = [(e, spans[i]) for i, e in enumerate(log[n_before:n_after], n_before)]
        after = [(e, s) for e, s in after if e[1] > killed]
        stale = [e for e, s in after if e[1] > killed + max(s, STALE_S) + 0.05]
        assert stale and all(e[2]["state"] != "live" for e in stale)
        # live, then holding, then text only, never back: a block longer than hold_s (a
        # loaded machine) may go from live to text only directly, as the rule says
        order = {"live": 0, "holding": 1, "text_only": 2}
        ranks = [order[e[2]["state"]] for e, _ in after]
        assert ranks == sorted(ranks) and ranks[-1] == 2, ranks
        starts = [killed] + [e[1] for e, _ in after]
        if max(np.diff(starts)) < HOLD_S / 2:  # blocks shorter than the holding window
            assert 1 in ranks, ranks  # ... so one of them started in it and held
        assert all(not e[2]["vace"] for e, _ in after if e[2]["state"] == "text_only")

        # restart it (same ring name): the input recovers and VACE acts again
        n_dead = len(log)
        w = start_writer(name)
        assert wait_for(lambda: any(e[2]["vace"] for e in log[n_dead:]), 30)
        assert "live" in engine.status()["vace_input"]
    finally:
        engine.stop()
        if w.poll() is None:
            w.kill()
            w.wait()
    assert engine.error is None, engine.error


@pytest.fixture
def assets(tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / "cat.png")
    Image.fromarray(img[::-1]).save(folder / "dog.png")
    (folder / "notes.png").write_bytes(b"not an image")
    Image.fromarray(img).save(tmp_path / "secret.png")
    return folder


def test_registry_params_round_trip_and_bad_values_change_nothing(assets):
    preset = PRESET.replace(vace=Vace(enabled=True, hold_s=HOLD_S, assets_dir=str(assets)))
    pipeline = build_pipeline(preset)
    engine = Engine(pipeline, status_interval=None)  # not started: blocks stepped here
    reg, driver, refs = engine.registry, engine.driver, pipeline.vace.refs
    block = iter(range(1000))

    def step():
        return driver.step(reg.begin_block(next(block)))

    try:
        assert engine.status()["vace_input"] == "none"
        good = {
            "vace/scale": 1.5,
            "vace/ref/1": "cat.png",
            "vace/fit": "stretch",
            "vace/mask": "alpha",
            "v2v/enabled": True,
            "v2v/strength": 0.4,
            "v2v/auto": True,
            "vace/source": " shm:dd_nothing_here ",
        }
        reg.set_many(good)
        assert reg.get("vace/source") == "shm:dd_nothing_here"  # normalised
        step()
        for k, v in good.items():
            assert reg.applied(k) == (v.strip() if isinstance(v, str) else v), k
        assert refs.count == 1 and pipeline.live.spec == "shm:dd_nothing_here"
        assert (pipeline.live.fit, pipeline.live.mask_mode) == ("stretch", "alpha")
        assert "shm:dd_nothing_here" in engine.status()["vace_input"]
        assert reg.set("vace/scale", 3).warnings and reg.get("vace/scale") == 2.0

        # refused at once: nothing staged, nothing applied
        version, snapshot, pending = refs.version, reg.snapshot(), reg.pending_count()
        bad = [
            ("vace/ref/1", "../secret.png", "not allowed"),
            ("vace/ref/1", str(assets.parent / "secret.png"), "outside the assets folder"),
            ("vace/ref/1", "missing.png", "no such file"),
            ("vace/source", "bogus:1", "use shm:NAME"),
            ("vace/source", "file:../secret.png", "not allowed"),
            ("vace/source", "shm:a/b", "bad shared-memory name"),
            ("vace/scale", "loud", "expected a number"),
            ("vace/fit", "zoom", "not one of"),
            ("v2v/strength", float("nan"), "not a finite number"),
        ]
        for path, value, why in bad:
            with pytest.raises(ControlError, match=why):
                reg.set(path, value)
        assert reg.pending_count() == pending
        step()
        assert refs.version == version and pipeline.live.spec == "shm:dd_nothing_here"
        assert reg.snapshot() == {**snapshot, "vace/scale": 2.0}

        # accepted by the registry, refused when applied: set back, said why
        reg.set("vace/ref/1", "notes.png")
        step()
        assert "cannot be read as an image" in engine.status()["last_error"]
        assert refs.version == version
        step()
        assert reg.applied("vace/ref/1") == "cat.png"
        reg.set("vace/ref/1/grab", 1)  # no input frame to grab
        step()
        assert "no input frame" in driver.last_error and refs.version == version

        # set, replace and clear live
        reg.set_many({"vace/ref/2": "dog.png", "vace/ref/3": "cat.png"})
        step()
        assert refs.count == 3
        reg.set("vace/ref/1", "")
        step()
        assert refs.count == 2
        reg.set("vace/ref/clear", 1)
        step()
        assert refs.count == 0 and all(reg.applied(f"vace/ref/{n}") == "" for n in (1, 2, 3))
    finally:
        pipeline.close()


def test_without_an_assets_folder_no_path_is_taken(assets):
    reg = make_registry(default_prompt="x")
    for path, value in [("vace/ref/1", str(assets / "cat.png")), ("vace/source", "file:a.mp4")]:
        with pytest.raises(ControlError, match="no assets folder"):
            reg.set(path, value)
    assert reg.set("vace/source", "shm:td_in").values == {"vace/source": "shm:td_in"}


def test_run_flags(assets, capsys):
    base = ["run", "--no-osc", "--no-shm", "--model", "tiny", "--height", "32", "--width", "32"]
    rc = main([*base, "--vace", "--vace-source", "shm:dd_absent", "--assets", str(assets)]
              + ["--blocks", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    for extra, words in [
        (["--assets", str(assets / "nope")], "not a folder"),
        (["--vace-source", "file:/etc/hosts"], "no assets folder"),
        (["--vace-source", "file:../x.mp4", "--assets", str(assets)], "not allowed"),
        (["--vace-source", "tcp:1"], "use shm:NAME"),
    ]:
        assert main([*base, "--vace", *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_warm_up_runs_the_vace_path_and_leaves_the_show_unchanged():
    pipeline = build_pipeline(PRESET)
    reg = make_registry(default_prompt=PRESET.prompt, default_steps=PRESET.steps)
    driver = BlockDriver(pipeline, registry=reg)
    calls = []
    vace_prepare = pipeline.vace.prepare_block
    pipeline.vace.prepare_block = lambda *a: calls.append(a[0].shape) or vace_prepare(*a)
    try:
        driver.warmup(reg.snapshot(), 2)
        assert [c[2] for c in calls] == [9, 12]  # both block shapes went through VACE
        warmed = [driver.step(reg.begin_block(b)).rgba for b in range(2)]
    finally:
        pipeline.close()
    cold = text_only_frames(PRESET, 2)
    assert all(torch.equal(a, b) for a, b in zip(warmed, cold, strict=True))


def test_preset_vace_section(assets):
    from engine.runtime.presets import PresetError, parse_preset
    from engine.weights.catalog import needs_of

    on = parse_preset("model: 14b\nvace: true\n")
    assert on.vace.enabled and needs_of(on).vace and not needs_of(parse_preset("model: 14b\n")).vace
    p = parse_preset(f"model: tiny\nvace:\n  assets_dir: {assets}\n  source: file:cat.png\n")
    assert not p.vace.enabled and p.vace.source == "file:cat.png"
    assert p.control_defaults()["vace/source"] == "file:cat.png"
    for text, why in [
        ("vace: 3\n", "expected true, false or a mapping"),
        ("vace:\n  sorce: shm:x\n", "unknown key vace.sorce"),
        ("vace:\n  fit: zoom\n", "vace.fit"),
        (f"vace:\n  assets_dir: {assets}\n  source: file:../x.mp4\n", "vace.source"),
    ]:
        with pytest.raises(PresetError, match=why):
            parse_preset("model: tiny\n" + text, "p.yaml")


def test_bench_vace_and_v2v_report_their_encode_stages(capsys):
    import json

    args = ["bench", "--model", "tiny", "--height", "32", "--width", "32", "--json"]
    args += ["--vace", "--vace-refs", "1", "--v2v", "0.5", "--blocks", "2", "--warmup", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # strength 0.5 cuts [1000, 750, 500, 250] to [500, 250]
    assert set(out["stages_ms"]) == {"vace_encode", "v2v_encode", "recompute", "step0", "step1"}
    c = out["config"]
    assert c["vace"] == {"layers": 2, "refs": 1, "scale": 1.0, "fp8": False} and c["v2v"] == 0.5
    for bad, why in [(["--vace-refs", "2"], "needs --vace"), (["--v2v", "2"], "--v2v")]:
        assert main(["bench", "--model", "tiny", *bad]) == 2
        assert why in capsys.readouterr().err
