"""Shows, logs and MIDI maps that used to be accepted quietly (issue 14 part 9, issue 19
part 6's range message): refused timeline content fails `render` unless --lenient, one
show's repeated warnings are summarised, a torn control-log line is reported, a bad
--midi-map stops `run` at start unless --midi-optional, `midi check` flags duplicates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import pytest

from bridges.midi.maps import duplicates, parse_map
from bridges.timeline import TimelineError, load_show, parse_timeline
from engine.cli import main
from engine.cli.render import check_show
from engine.runtime.control_log import ControlLogWriter, read_control_log
from engine.runtime.controls import make_registry

TINY = ["--model", "tiny", "--height", "32", "--width", "32", "--steps", "1000", "--no-progress"]


def _timeline(*texts: str, extra: dict | None = None) -> dict:
    segs = []
    for i, t in enumerate(texts):
        seg = {"startTime": i, "endTime": i + 1, "prompts": [{"text": t, "weight": 100}]}
        seg.update(extra or {})
        segs.append(seg)
    return {"version": "2.0", "prompts": segs}


def _write(tmp_path: Path, data: dict, name: str = "show.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_render_refuses_a_timeline_whose_content_would_be_dropped(tmp_path, capsys):
    """A 1 MB prompt used to be dropped with a warning and exit 0; now the render stops
    before loading the model, names the block and the control, and writes nothing."""
    show = _write(tmp_path, _timeline("a forest", "x" * 1_000_000, "fog"))
    out = tmp_path / "o.mp4"
    assert main(["render", str(show), "-o", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "1 change(s) would be refused, the first at block 2: prompts" in err
    assert "more than" in err and "--lenient" in err
    assert not out.exists()


@pytest.mark.slow  # runs the tiny engine
def test_lenient_renders_without_the_refused_content(tmp_path, caplog):
    show = _write(tmp_path, _timeline("a forest", "x" * 1_000_000, "fog"))
    out = tmp_path / "o.mp4"
    with caplog.at_level(logging.WARNING):
        assert main(["render", str(show), "-o", str(out), *TINY, "--lenient"]) == 0
    assert _frames(out) == read_control_log(tmp_path / "o.controls.jsonl").frames > 0
    refused = [r for r in caplog.records if "prompts refused" in r.getMessage()]
    assert len(refused) == 1 and "block 2" in refused[0].getMessage()


def test_check_show_lists_every_refusal_of_a_control_log(tmp_path):
    """A control log naming controls this build does not have (or values it refuses):
    each is a refusal with its block, read from a real log file."""
    path = tmp_path / "show.controls.jsonl"
    w = ControlLogWriter(path, {"model": "tiny", "height": 32, "width": 32, "fps": 16})
    reg = make_registry()
    values = {p.path: reg.get(p.path) for p in reg if p.stateful}
    w.write_block({"block": 0, "time": 0, "values": values, "changed": {}, "events": []})
    w.write_block(
        {"block": 1, "time": 1, "values": values, "changed": {"warp/speed": 3}, "events": []}
    )
    w.write_block(
        {"block": 2, "time": 2, "values": values, "changed": {"seed": "many"}, "events": ["boom"]}
    )
    w.close()
    show = load_show(path)
    refused = check_show(show, make_registry())
    assert [(b, p) for b, p, _ in refused] == [(1, "warp/speed"), (2, "boom"), (2, "seed")]
    assert "unknown control" in refused[0][2] and "number" in refused[2][2]
    assert check_show(show, make_registry(), blocks=1) == []  # only block 0: clean


def test_repeated_warnings_of_one_timeline_are_summarised(tmp_path, caplog):
    """5,000 segments with the same unknown key: a handful of lines and one summary, not
    5,000 lines; the keys are still kept in `extra`."""
    n = 5000
    data = _timeline(*[f"scene {i}" for i in range(n)], extra={"color": "red"})
    with caplog.at_level(logging.WARNING, logger="bridges.timeline"):
        show = parse_timeline(data, tmp_path / "long.json")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 5, lines
    assert any(f"{n - 3} more warnings like this: unknown key prompts[].color" in t for t in lines)
    assert len(show.extra) == n and show.warnings.counts["unknown key prompts[].color"] == n
    caplog.clear()
    show.warnings.summarise()  # the render summarises again at its end: nothing new to say
    assert not caplog.records


def test_a_torn_last_line_of_a_control_log_is_reported(tmp_path, caplog):
    path = tmp_path / "torn.controls.jsonl"
    w = ControlLogWriter(path, {"model": "tiny"})
    for b in range(3):
        w.write_block({"block": b, "time": b, "values": {}, "changed": {}, "events": []})
    w.close()
    whole = path.read_text()
    path.write_text(whole[: whole.rstrip("\n").rfind("\n") + 20])  # cut inside block 2
    with caplog.at_level(logging.WARNING):
        log = read_control_log(path)
    assert [b["block"] for b in log.blocks] == [0, 1]
    warned = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert len(warned) == 1 and f"{path}:4:" in warned[0]
    caplog.clear()
    path.write_text(whole)  # an intact log warns nothing
    with caplog.at_level(logging.WARNING):
        assert len(read_control_log(path).blocks) == 3
    assert not caplog.records


@pytest.mark.parametrize(
    "segment, words",
    [
        ({"startTime": -1}, "-1 is below the minimum 0"),
        ({"endTime": -2}, "below the minimum 0"),
        ({"prompts": [{"text": "x", "weight": 101}]}, "101 is outside 0..100"),
        ({"transitionSteps": 65}, "65 is outside 0..64"),
    ],
)
def test_range_errors_never_print_none(tmp_path, segment, words):
    data = _timeline("a forest")
    data["prompts"][0].update(segment)
    with pytest.raises(TimelineError) as e:
        parse_timeline(data, tmp_path / "t.json")
    assert words in str(e.value) and "None" not in str(e.value)


# -- MIDI ---------------------------------------------------------------------------------
def test_a_bad_midi_map_stops_run_at_start(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: x\nmappings:\n  - {cc: 1, target: nope/path}\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    for m in (bad, binary):
        argv = ["run", *TINY[:-1], "--no-osc", "--blocks", "1", "--midi-map", str(m)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--midi-map" in err and str(m) in err and "--midi-optional" in err
        assert "Traceback" not in err


@pytest.mark.slow  # runs the tiny engine
def test_midi_optional_starts_without_midi(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: x\nmappings:\n  - {cc: 1, target: nope/path}\n")
    argv = ["run", *TINY[:-1], "--no-osc", "--blocks", "1", "--midi-map", str(bad)]
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--midi-optional"]) == 0
    assert any("MIDI disabled (--midi-optional)" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # runs the tiny engine
def test_a_good_map_without_midi_is_an_error_unless_optional(capsys):
    """Where MIDI cannot work (no ALSA sequencer, no backend), asking for a map is an error
    at start, not a show that silently has no controller."""
    from bridges.midi.ports import MidiUnavailable, input_names

    try:
        input_names()
        pytest.skip("MIDI works on this machine")
    except MidiUnavailable:
        pass
    argv = ["run", *TINY[:-1], "--no-osc", "--blocks", "1", "--midi-map", "nanokontrol2"]
    assert main(argv) == 2
    assert "MIDI is unavailable" in capsys.readouterr().err
    assert main([*argv, "--midi-optional"]) == 0


def test_midi_check_flags_duplicate_mappings(tmp_path, capsys):
    n = 2000
    rows = ["  - {cc: 1, target: seed, mode: relative}"] * n
    rows += ["  - {cc: 2, target: kv_bias}", "  - {cc: 2, target: vace/scale}"]
    f = tmp_path / "dups.yaml"
    f.write_text("device: x\nmappings:\n" + "\n".join(rows) + "\n")
    assert main(["midi", "check", str(f)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) < 40  # bounded, whatever the count
    assert f"{f}:4: duplicate of the mapping at {f}:3 (cc 1 -> seed)" in err
    assert f"{f}: {n - 1} duplicate mappings" in err
    assert any("cc 2 also drives kv_bias" in line for line in err)  # noted, not an error


def test_duplicates_against_a_reference_count():
    """Property: duplicates() reports exactly the mappings equal to an earlier one."""
    import random

    rnd = random.Random(5)
    rows, seen, expected = [], set(), 0
    for _ in range(300):
        row = (rnd.choice([1, 2, 3]), rnd.choice(["seed", "kv_bias"]), rnd.choice([1, 2]))
        expected += row in seen
        seen.add(row)
        rows.append(f"  - {{cc: {row[0]}, target: {row[1]}, channel: {row[2]}}}")
    m = parse_map("device: x\nmappings:\n" + "\n".join(rows) + "\n", make_registry(), "m.yaml")
    problems, _ = duplicates(m)
    assert len(problems) == expected
