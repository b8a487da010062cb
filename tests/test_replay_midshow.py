"""A recording started mid-show (`/dd/record 1` at block k) replays exactly: its control log
carries the history since the stream last started afresh, `render` runs that history
without output and then makes exactly the recorded frames. A log that cannot be replayed
exactly is refused with the reason. Real engine (tiny model, CPU), real mp4 files."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from engine.cli import main
from engine.runtime.control_log import (
    HISTORY_COMPLETE,
    ControlHistory,
    log_path_for,
    read_control_log,
)
from engine.runtime.engine import tiny_engine

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--no-progress"]


def frames_of(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def live_show(tmp_path, *, record_at: int, stop_at: int, clock: str = "wall"):
    """Run a tiny engine through a scripted show (a prompt transition that is under way
    when the recording starts, a seed change and a reset while it records); returns the
    recording's path and the RGBA blocks the engine made, by block."""
    made: dict[int, np.ndarray] = {}
    script = {
        1: {"prompt/1/text": "a koi pond in autumn", "transition/blocks": 4},
        record_at + 1: {"seed": 1234},
        record_at + 3: {"prompt/1/text": "a koi pond in winter", "transition/blocks": 2},
    }
    eng = None

    def on_block(result) -> None:
        made[result.block] = result.rgba.numpy().copy()
        nxt = result.block + 1
        if nxt in script:
            eng.registry.set_many(script[nxt].items())
        if nxt == record_at:
            eng.registry.set("record", True)
        if nxt == stop_at:
            eng.registry.set("record", False)

    eng = tiny_engine(
        record_dir=tmp_path,
        status_interval=None,
        max_blocks=stop_at,
        on_block=on_block,
        record_clock=clock,
    )
    eng.registry.set("steps", [1000, 750])
    eng.start()
    try:
        assert eng.join(timeout=240), "the engine did not finish its blocks"
        assert eng.error is None
    finally:
        eng.stop()
    (mp4,) = tmp_path.glob("dreamdeck-*.mp4")
    return mp4, made


def replay_rgba(log_file) -> dict[int, np.ndarray]:
    """The RGBA blocks `render`'s loop makes from a log, by recorded block number."""
    from bridges.timeline import load_show
    from engine.cli.render import play_show
    from engine.runtime.block_driver import BlockDriver
    from engine.runtime.controls import make_registry
    from engine.runtime.pipeline import build_pipeline
    from engine.runtime.presets import load_preset

    show = load_show(log_file)
    preset = load_preset("tiny").replace(height=64, width=64)
    pipeline = build_pipeline(preset)
    try:
        registry = make_registry(default_prompt=preset.prompt, default_steps=preset.steps)
        registry.set_many(preset.control_defaults())
        driver = BlockDriver(pipeline, sync_prompts=True)
        recorded = [r["block"] for r in show.records[show.lead_in :]]
        return {
            recorded[i]: r.rgba.numpy().copy()
            for i, r in enumerate(play_show(show, driver, registry))
        }
    finally:
        pipeline.close()


@pytest.mark.timeout(300)
def test_a_recording_started_mid_show_renders_to_the_recorded_frames(tmp_path):
    mp4, made = live_show(tmp_path / "live", record_at=3, stop_at=8)
    log = read_control_log(log_path_for(mp4))
    # the recording starts at block 3, mid-transition; its history reaches back to block 0
    assert [b["block"] for b in log.blocks] == list(range(3, 8))
    assert [b["block"] for b in log.preamble] == [0, 1, 2]
    assert log.header["history"] == HISTORY_COMPLETE and log.header["clock"] == "wall"
    assert log.reproducible() is None
    live = frames_of(mp4)
    assert live.shape[0] == 12 * 5  # blocks 3..7 are all full 12-frame blocks

    out = tmp_path / "replay.mp4"
    assert main(["render", str(log_path_for(mp4)), "-o", str(out), *TINY]) == 0
    replay = frames_of(out)
    # Same RGBA in, same x264 settings: the same pictures, bit for bit.
    assert replay.shape == live.shape
    assert np.array_equal(replay, live)
    assert read_control_log(log_path_for(out)).frames == replay.shape[0]
    # Before encoding: the replayed RGBA blocks are exactly those the live engine made.
    replayed = replay_rgba(log_path_for(mp4))
    assert sorted(replayed) == [3, 4, 5, 6, 7]
    for block, rgba in replayed.items():
        assert np.array_equal(rgba, made[block]), f"block {block} differs"

    # The oracle that the history matters: the same blocks rendered without it differ.
    lines = log_path_for(mp4).read_text().splitlines()
    head = json.loads(lines[0])
    blocks = [json.loads(x) for x in lines[1:]]
    kept = [b for b in blocks if not b.get("preamble")]
    kept[0]["index"] = 0  # pretend the stream started there
    kept[0]["values"] = blocks[-1]["values"] | kept[0]["values"]
    bare = tmp_path / "bare.controls.jsonl"
    bare.write_text("\n".join(json.dumps(x) for x in [head, *kept]) + "\n")
    out2 = tmp_path / "bare.mp4"
    assert main(["render", str(bare), "-o", str(out2), *TINY]) == 0
    assert frames_of(out2).shape[0] == 9 + 12 * 4  # from a fresh stream: 9 frames first
    assert not np.array_equal(frames_of(out2)[:9], live[:9])


@pytest.mark.timeout(300)
def test_model_clock_is_written_and_replays_too(tmp_path):
    mp4, _ = live_show(tmp_path / "live", record_at=2, stop_at=5, clock="model")
    log = read_control_log(log_path_for(mp4))
    assert log.header["clock"] == "model" and log.header["fps"] == 16
    with av.open(str(mp4)) as c:
        stamps = [float(f.time) for f in c.decode(video=0)]
    assert np.allclose(np.diff(stamps), 1 / 16)  # one frame every 1/16 s of video
    out = tmp_path / "replay.mp4"
    assert main(["render", str(log_path_for(mp4)), "-o", str(out), *TINY]) == 0
    assert np.array_equal(frames_of(out), frames_of(mp4))


def _write_log(path, header: dict, records: list[dict]) -> None:
    head = {"dreamdeck": "control-log", "version": 2, "height": 64, "width": 64, **header}
    path.write_text("\n".join(json.dumps(x) for x in [head, *records]) + "\n")


def _rec(block: int, index: int | None, **extra) -> dict:
    rec = {"block": block, "time": 0.0, "values": {}, "changed": {}, "events": [], **extra}
    if index is not None:
        rec["index"] = index
    return rec


@pytest.mark.parametrize(
    "header, records, why",
    [
        # an older log of a recording started at block 81: no history at all
        ({"version": 1}, [_rec(81, None)], "started at block 81"),
        # a stream block index past 0 with no preamble
        ({}, [_rec(5, 3)], "stream block 3"),
        # the engine said the history was too long to keep
        ({"history": "the stream ran 9 blocks without a reset"}, [_rec(5, 0)], "without a reset"),
        # a block made from live input video, which the log cannot carry
        ({}, [_rec(0, 0), _rec(1, 1, input={"vace": True})], "block 1 was made from live input"),
    ],
)
def test_a_log_that_cannot_be_replayed_exactly_is_refused_with_the_reason(
    tmp_path, capsys, header, records, why
):
    f = tmp_path / "x.controls.jsonl"
    _write_log(f, header, records)
    out = tmp_path / "o.mp4"
    assert main(["render", str(f), "-o", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "cannot be replayed exactly" in err and why in err and "--controls-only" in err
    assert not out.exists()


def test_controls_only_renders_an_inexact_log_from_a_fresh_stream(tmp_path, caplog):
    """An older log of a recording started mid-show: with --controls-only its controls
    replay (from a fresh stream, so the first block makes 9 frames), with a warning."""
    f = tmp_path / "old.controls.jsonl"
    values = {"prompt/1/text": "a lighthouse", "prompt/1/weight": 1.0, "seed": 3}
    _write_log(f, {"version": 1}, [_rec(81, None, values=values), _rec(82, None)])
    out = tmp_path / "o.mp4"
    with caplog.at_level("WARNING"):
        assert main(["render", str(f), "-o", str(out), *TINY, "--controls-only"]) == 0
    assert "rendering the controls only" in caplog.text and "block 81" in caplog.text
    assert frames_of(out).shape[0] == 9 + 12


def test_history_keeps_blocks_since_the_last_clean_one_and_gives_up_past_its_bound():
    h = ControlHistory(max_blocks=3)
    assert h.preamble()[1] != HISTORY_COMPLETE  # nothing made yet
    rest = {"prompts": [["a", 1.0]], "blocks": 0, "method": "linear"}
    h.add(_rec(0, 0, values={"seed": 1}), clean=True, rest_prompt=None)
    h.add(_rec(1, 1, values={"seed": 1}, changed={"seed": 2}), clean=False, rest_prompt=rest)
    pre, status = h.preamble()
    assert status == HISTORY_COMPLETE and [r["block"] for r in pre] == [0, 1]
    assert pre[0]["values"] == {"seed": 1} and pre[1]["values"] == {}  # changes only after
    h.add(_rec(2, 0, events=["reset"]), clean=True, rest_prompt=rest)
    pre, _ = h.preamble()
    assert [r["block"] for r in pre] == [2] and pre[0]["prompt"] == rest
    for b in range(3, 7):
        h.add(_rec(b, b - 2), clean=False, rest_prompt=rest)
    pre, status = h.preamble()
    assert pre == [] and "3 blocks without a reset" in status
    h.add(_rec(7, 0), clean=True, rest_prompt=rest)
    assert h.preamble()[1] == HISTORY_COMPLETE
