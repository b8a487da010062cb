"""Timelines (Daydream v2.0) and control logs to per-block changes."""

import copy
import json
import logging
from pathlib import Path

import pytest

from bridges.timeline import (
    TimelineError,
    block_at,
    blocks_for,
    first_frame,
    load_show,
    parse_timeline,
)
from engine.runtime.control_log import ControlLogWriter
from engine.runtime.controls import make_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "timelines"

BASE = {
    "prompts": [
        {"startTime": 0, "endTime": 2.0, "prompts": [{"text": "a panda in a park", "weight": 100}]},
        {
            "startTime": 2.0,
            "endTime": 4.0,
            "transitionSteps": 3,
            "temporalInterpolationMethod": "linear",
            "prompts": [
                {"text": "a panda in a park", "weight": 60},
                {"text": "a panda in the snow", "weight": 40},
            ],
        },
    ],
    "settings": {
        "pipelineId": "krea-realtime-video",
        "resolution": {"height": 320, "width": 576},
        "seed": 42,
        "denoisingSteps": [1000, 750],
        "noiseScale": 0.7,
        "noiseController": True,
        "manageCache": True,
        "quantization": None,
    },
    "version": "2.0",
    "exportedAt": "2025-10-01T00:00:00Z",
}


def frames_reference(seconds: float) -> int:
    return round(16 * seconds)


def test_time_to_block_mapping_against_a_frame_by_frame_reference():
    # The reference walks frames: block k covers [first_frame(k), first_frame(k+1)).
    starts = [first_frame(k) for k in range(200)]
    assert starts[:4] == [0, 9, 21, 33]
    for tenth in range(0, 1200):
        t = tenth / 100
        want = next(k for k, f in enumerate(starts) if f >= 16 * t - 1e-9)
        assert block_at(t) == want, t
        n = blocks_for(t)
        total = starts[n] if n < len(starts) else None
        assert total >= frames_reference(t) or n == 1
        assert n == 1 or starts[n - 1] < frames_reference(t)  # the fewest such blocks


def test_v2_timeline_maps_segments_to_blocks_and_settings():
    show = parse_timeline(copy.deepcopy(BASE), "t.json")
    assert (show.height, show.width, show.seed, show.steps) == (320, 576, 42, [1000, 750])
    assert show.blocks == blocks_for(4.0) == 6  # 64 frames: 9 + 5*12 = 69
    reg = make_registry()
    c0, e0 = show.changes_at(0, known=reg)
    assert c0["prompts"] == [["a panda in a park", 1.0]] and c0["seed"] == 42 and e0 == []
    # 2.0 s = frame 32: the first block starting at or after it is block 3 (frame 33)
    assert [show.changes_at(b)[0] for b in (1, 2)] == [{}, {}]
    c3, _ = show.changes_at(3)
    assert c3 == {
        "transition/blocks": 3,
        "transition/method": "linear",
        "prompts": [["a panda in a park", 0.6], ["a panda in the snow", 0.4]],
    }
    # the changes are valid registry input and land in the block
    reg.set_many(c3)
    c = reg.begin_block(3)
    assert c["prompt/2/text"] == "a panda in the snow" and c["prompt/2/weight"] == pytest.approx(
        0.4
    )
    assert show.changes_at(3, skip=frozenset({"prompts"}))[0] == {
        "transition/blocks": 3,
        "transition/method": "linear",
    }


def test_unknown_keys_are_kept_with_a_warning(caplog):
    data = copy.deepcopy(BASE)
    data["mood"] = "dark"
    data["settings"]["fancy"] = 1
    data["prompts"][1]["color"] = "red"
    with caplog.at_level(logging.WARNING):
        show = parse_timeline(data, "t.json")
    assert show.extra == {"mood": "dark", "settings.fancy": 1, "prompts[1].color": "red"}
    text = caplog.text
    assert "prompts[1].color" in text and "settings.fancy" in text and "mood" in text
    assert "noiseScale" not in text  # known Daydream keys are not warned about


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["prompts"][1].__setitem__("endTime", 1.0), "prompts[1].endTime"),
        (lambda d: d["prompts"][1].__setitem__("startTime", "soon"), "prompts[1].startTime"),
        (lambda d: d["prompts"][1].pop("startTime"), "prompts[1].startTime: missing"),
        (
            lambda d: d["prompts"][0]["prompts"][0].__setitem__("weight", 150),
            "prompts[0].prompts[0].weight",
        ),
        (
            lambda d: d["prompts"][0]["prompts"][0].__setitem__("text", ""),
            "prompts[0].prompts[0].text",
        ),
        (
            lambda d: d["prompts"][1].__setitem__("temporalInterpolationMethod", "cubic"),
            "temporalInterpolationMethod",
        ),
        (lambda d: d["prompts"][1].__setitem__("startTime", -1), "prompts[1].startTime"),
        (
            lambda d: d["settings"]["resolution"].__setitem__("width", 570),
            "settings.resolution.width",
        ),
        (
            lambda d: d["settings"].__setitem__("denoisingSteps", [750, 1000]),
            "settings.denoisingSteps",
        ),
        (lambda d: d["settings"].__setitem__("seed", -3), "settings.seed"),
        (lambda d: d.__setitem__("version", "1.0"), "version"),
        (lambda d: d.__setitem__("prompts", []), "prompts"),
        (lambda d: d["prompts"].reverse(), "prompts[1].startTime"),
    ],
)
def test_invalid_timelines_name_file_and_json_path(mutate, where):
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(TimelineError) as e:
        parse_timeline(data, "show.json")
    assert str(e.value).startswith("show.json: ") and where in str(e.value), str(e.value)


def test_bad_json_file_names_line(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"version": "2.0",\n "prompts": [,]}')
    with pytest.raises(TimelineError, match=r"t.json:2:\d+: invalid JSON"):
        load_show(f)
    with pytest.raises(TimelineError, match="not found"):
        load_show(tmp_path / "nope.json")


def test_shipped_examples_are_valid_and_cover_the_brief():
    shows = {f.name: load_show(f) for f in sorted(EXAMPLES.glob("*.json"))}
    assert len(shows) >= 3
    sizes = {(s.width, s.height) for s in shows.values()}
    assert (832, 480) in sizes and (576, 320) in sizes
    assert any(len(seg.prompts) > 1 for s in shows.values() for seg in s.segments)  # a blend
    for name, s in shows.items():
        assert not s.extra, name
        assert len(s.segments) >= 3, name
        assert all(len(t) > 200 for seg in s.segments for t, _ in seg.prompts), name  # detailed
        assert len({seg.block for seg in s.segments}) == len(s.segments), name


def test_control_log_show_replays_changes_and_prompt_targets(tmp_path):
    reg = make_registry(default_prompt="a fox")
    path = tmp_path / "show.controls.jsonl"
    w = ControlLogWriter(path, {"width": 64, "height": 64, "model": "tiny", "preset": "tiny"})
    reg.set("seed", 5)
    for b in range(4):
        if b == 2:
            reg.set_many({"prompt": "a wolf", "reset": 1, "pause": False})
        rec = reg.begin_block(b).to_json()
        if b in (0, 3):
            rec["prompt"] = {"prompts": [["x", 1.0]], "blocks": 0, "method": "linear"}
        w.write_block({**rec, "frames": 9 if b == 0 else 12})
    w.close()
    with path.open("a") as f:
        f.write('{"block": 4, "values": {')  # a torn last line, as a killed engine leaves
    show = load_show(path)
    assert show.kind == "control-log" and show.blocks == 4 and (show.width, show.height) == (64, 64)
    c0, _ = show.changes_at(0)
    assert c0["seed"] == 5 and c0["prompt/1/text"] == "a fox"  # block 0: the whole state
    assert show.changes_at(1) == ({}, [])
    c2, e2 = show.changes_at(2)
    assert c2["prompt/1/text"] == "a wolf" and e2 == ["reset"]
    assert (
        show.prompt_at(0) is not None
        and show.prompt_at(1) is None
        and show.prompt_at(3) is not None
    )
    # a corrupt line in the middle is an error naming the line
    lines = path.read_text().splitlines()
    lines[2] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TimelineError, match=r"show.controls.jsonl:3: not JSON"):
        load_show(path)


def test_timeline_file_on_disk_roundtrip(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(BASE))
    show = load_show(f)
    assert show.kind == "timeline" and show.blocks == 6
