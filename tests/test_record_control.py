"""`/dd/record` (the registry's `record`): on starts a new dated mp4 in the recordings
folder while the engine runs, off finalises it into a playable file whose frame count
matches its control log; a folder that cannot be written is reported and turns it off."""

from __future__ import annotations

import av
import pytest
from helpers import wait_for

from engine.runtime.control_log import log_path_for, read_control_log
from engine.runtime.engine import tiny_engine
from engine.runtime.registry import ControlError


def frames_in(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_record_on_off_makes_playable_files(tmp_path):
    eng = tiny_engine(record_dir=tmp_path / "rec", status_interval=None)
    eng.start()
    try:
        eng.wait_frames(9, timeout=60)
        assert eng.registry.get("record") is False and eng.recorder is None
        eng.registry.set("record", 1)  # TouchDesigner sends ints
        assert eng.recorder is not None
        first = eng.recorder.path
        n0 = eng.frames_out
        assert wait_for(lambda: eng.frames_out >= n0 + 36, timeout=60.0)
        eng.registry.set("record", 0)
        assert eng.recorder is None
        # finalising runs on its own thread: wait until the file holds what the log says
        assert wait_for(
            lambda: frames_in(first) == read_control_log(log_path_for(first)).frames >= 12,
            timeout=60.0,
        )
        log = read_control_log(log_path_for(first))
        assert log.header["mode"] == "live" and log.blocks
        eng.registry.set("record", True)  # a second take is a second file
        assert eng.recorder is not None and eng.recorder.path != first
    finally:
        eng.stop()
    assert len(list((tmp_path / "rec").glob("*.mp4"))) == 2


def test_unwritable_folder_is_reported_and_record_turns_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    eng = tiny_engine(record_dir=blocker / "rec", status_interval=None)
    try:
        with pytest.raises(ControlError, match="cannot record into"):  # /dd/error over OSC
            eng.registry.set("record", True)
        assert eng.recorder is None and eng.registry.get("record") is False
        assert "record" in eng.status()["last_error"]
    finally:
        eng.stop()
