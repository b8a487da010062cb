"""`dreamdeck render`: timelines and control logs, offline and reproducible (tiny model)."""

import json
from pathlib import Path

import av
import numpy as np
import pytest

from bridges.timeline import blocks_for, first_frame
from engine.cli import main
from engine.runtime.control_log import read_control_log

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "timelines"
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--no-progress"]

TIMELINE = {
    "version": "2.0",
    "settings": {
        "pipelineId": "krea-realtime-video",
        "resolution": {"height": 480, "width": 832},
        "seed": 11,
        "denoisingSteps": [1000, 750],
    },
    "prompts": [
        {
            "startTime": 0,
            "endTime": 1.5,
            "prompts": [{"text": "a lighthouse on a cliff at dusk", "weight": 100}],
        },
        {
            "startTime": 1.5,
            "endTime": 3.0,
            "transitionSteps": 2,
            "temporalInterpolationMethod": "linear",
            "prompts": [
                {"text": "a lighthouse on a cliff in a storm", "weight": 75},
                {"text": "a lighthouse on a cliff at night", "weight": 25},
            ],
        },
        {
            "startTime": 3.0,
            "endTime": 4.0,
            "prompts": [{"text": "a lighthouse on a cliff at dawn", "weight": 100}],
        },
    ],
}


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    show = tmp / "show.json"
    show.write_text(json.dumps(TIMELINE))
    outs = []
    for k in range(2):
        out = tmp / f"out{k}.mp4"
        assert main(["render", str(show), "-o", str(out), *TINY]) == 0
        outs.append(out)
    return show, outs


def test_timeline_renders_the_expected_frames_and_segment_blocks(rendered):
    _, (out, _) = rendered
    blocks = blocks_for(4.0)  # 64 frames -> 6 blocks, 69 frames
    frames = frames_of(out)
    assert frames.shape == (first_frame(blocks), 64, 64, 3)
    log = read_control_log(out.with_name("out0.controls.jsonl"))
    assert len(log.blocks) == blocks and log.frames == len(frames)
    assert log.header["mode"] == "render" and log.header["width"] == 64
    # segments at 0 s, 1.5 s (frame 24 -> block 3, first frame 33) and 3 s (frame 48 -> block 5)
    starts = {b["block"]: b["prompt"] for b in log.blocks if "prompt" in b}
    assert sorted(starts) == [0, 3, 5]
    assert starts[3] == {
        "prompts": [
            ["a lighthouse on a cliff in a storm", 0.75],
            ["a lighthouse on a cliff at night", 0.25],
        ],
        "blocks": 2,
        "method": "linear",
    }
    assert starts[5]["prompts"] == [["a lighthouse on a cliff at dawn", 1.0]]
    assert log.blocks[3]["changed"]["prompt/2/text"] == "a lighthouse on a cliff at night"
    assert all(
        b["values"]["seed"] == 11 and b["values"]["steps"] == [1000, 750] for b in log.blocks
    )


def test_two_renders_are_identical(rendered):
    _, (a, b) = rendered
    assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(frames_of(a), frames_of(b))


def test_a_replayed_control_log_reproduces_the_render_at_any_step_list(rendered, tmp_path):
    _, (out, _) = rendered
    log = out.with_name("out0.controls.jsonl")
    again = tmp_path / "again.mp4"
    assert main(["render", str(log), "-o", str(again), *TINY]) == 0
    assert again.read_bytes() == out.read_bytes()
    fewer = tmp_path / "fewer.mp4"
    assert (
        main(["render", str(log), "-o", str(fewer), *TINY, "--steps", "1000", "--height", "32"])
        == 0
    )
    replayed = read_control_log(tmp_path / "fewer.controls.jsonl")
    assert all(b["values"]["steps"] == [1000] for b in replayed.blocks)
    assert frames_of(fewer).shape == (69, 32, 64, 3)


@pytest.mark.timeout(180)
def test_a_live_recording_replays_to_the_same_frames(tmp_path):
    live = tmp_path / "live.mp4"
    rc = main(
        [
            "run",
            *TINY[:-1],
            "--steps",
            "1000,750",
            "--blocks",
            "4",
            "--record",
            str(live),
            "--no-shm",
            "--no-osc",
        ]
    )
    assert rc == 0
    replay = tmp_path / "replay.mp4"
    assert (
        main(["render", str(tmp_path / "live.controls.jsonl"), "-o", str(replay), "--no-progress"])
        == 0
    )
    a, b = frames_of(live), frames_of(replay)
    assert a.shape == b.shape == (9 + 12 * 3, 64, 64, 3)
    # Same frames in, same x264 settings (CRF, no lookahead) and frame types: the same
    # pictures, though the live file's bytes differ (it carries live time stamps).
    assert np.array_equal(a, b)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_shipped_examples_render(example, tmp_path):
    out = tmp_path / "x.mp4"
    args = ["render", str(EXAMPLES / example), "-o", str(out), "--model", "tiny", "--no-progress"]
    assert main([*args, "--height", "32", "--width", "32", "--steps", "1000"]) == 0
    log = read_control_log(tmp_path / "x.controls.jsonl")
    assert log.frames == frames_of(out).shape[0] > 16 * 15


def test_bad_shows_are_refused_with_the_reason(tmp_path, capsys):
    bad = json.loads(json.dumps(TIMELINE))
    bad["prompts"][2]["endTime"] = 2.0
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    assert main(["render", str(f), "-o", str(tmp_path / "o.mp4"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "bad.json: prompts[2].endTime" in err
    assert not (tmp_path / "o.mp4").exists()
    assert main(["render", str(f), "-o", str(tmp_path / "o.avi"), *TINY]) == 2
    assert ".mp4" in capsys.readouterr().err
