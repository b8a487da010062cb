"""Scope timelines beyond the Krea v2.0 examples: version 2.1 settings (kvCacheAttentionBias,
quantization, loras) are read, not dropped; a timeline made for another Scope pipeline is
rendered with a warning saying so; bad values name the JSON path."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from bridges.timeline import TimelineError, parse_timeline
from engine.cli import main
from engine.cli.render import _with_quantization
from engine.runtime.presets import load_preset

V21 = {
    "version": "2.1",
    "prompts": [
        {"startTime": 0, "endTime": 1.0, "prompts": [{"text": "a fox in a city", "weight": 100}]}
    ],
    "settings": {
        "pipelineId": "krea-realtime-video",
        "resolution": {"height": 320, "width": 576},
        "seed": 7,
        "denoisingSteps": [1000, 750],
        "kvCacheAttentionBias": 0.45,
        "quantization": "fp8_e4m3fn",
        "loras": [
            {"id": "a1", "path": "styles/ink.safetensors", "scale": 0.8},
            {"path": "anime.safetensors", "scale": 1.2, "mergeMode": "runtime_peft"},
        ],
        "loraMergeStrategy": "permanent_merge",
    },
}


def test_v21_settings_are_read(caplog):
    with caplog.at_level(logging.WARNING):
        show = parse_timeline(copy.deepcopy(V21), "t.json")
    assert show.kv_bias == 0.45 and show.quantization == "fp8"
    assert show.loras == [("styles/ink.safetensors", 0.8), ("anime.safetensors", 1.2)]
    assert show.lora_merge == "permanent_merge" and show.pipeline == "krea-realtime-video"
    assert show.extra == {}
    assert caplog.text == ""  # 2.1 is a version we read, with nothing unknown in it


@pytest.mark.parametrize("pipeline", ["streamdiffusionv2", "longlive", "memflow", "reward-forcing"])
def test_a_timeline_for_another_pipeline_warns(pipeline, caplog):
    data = copy.deepcopy(V21)
    data["settings"]["pipelineId"] = pipeline
    with caplog.at_level(logging.WARNING):
        show = parse_timeline(data, "t.json")
    assert show.pipeline == pipeline
    assert f"made for Scope's {pipeline!r} pipeline" in caplog.text


def test_render_warns_for_another_pipeline_and_fp8_on_the_cpu(tmp_path, caplog):
    data = copy.deepcopy(V21)
    data["settings"]["pipelineId"] = "longlive"
    f = tmp_path / "t.json"
    f.write_text(json.dumps(data))
    out = tmp_path / "o.mp4"
    args = ["render", str(f), "-o", str(out), "--model", "tiny", "--no-progress"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--height", "32", "--width", "32", "--steps", "1000"]) == 0
    assert "'longlive' pipeline" in caplog.text
    # the LoRAs it names are not on this machine: said by name, the show renders without
    assert "styles/ink.safetensors" in caplog.text and "anime.safetensors" in caplog.text
    assert "fp8_e4m3fn ignored" in caplog.text  # tiny runs on the CPU


def test_quantization_turns_on_fp8_where_a_gpu_runs_it():
    show = parse_timeline(copy.deepcopy(V21), "t.json")
    gpu = load_preset("h100-576x320").replace(device="cuda", fp8=False)
    assert _with_quantization(gpu, show).fp8 is True
    assert _with_quantization(load_preset("tiny"), show).fp8 is False  # CPU: ignored
    show.quantization = None
    assert _with_quantization(gpu, show).fp8 is False


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("quantization", "int4", "settings.quantization"),
        ("loras", {"path": "x"}, "settings.loras: expected a list"),
        ("loras", [{"scale": 1}], "settings.loras[0].path"),
        ("loras", [{"path": "a\x00b"}], "settings.loras[0].path"),
        ("loras", [{"path": "x", "scale": "big"}], "settings.loras[0].scale"),
        ("loras", [{"path": "x", "scale": float("inf")}], "settings.loras[0].scale"),
        ("loras", [{"path": "x"}] * 5, "at most 4"),
        ("loras", [{"path": "x", "mergeMode": 3}], "mergeMode"),
        ("pipelineId", 5, "settings.pipelineId"),
        ("loraMergeStrategy", ["a"], "settings.loraMergeStrategy"),
    ],
)
def test_bad_v21_settings_name_the_path(key, value, where):
    data = copy.deepcopy(V21)
    data["settings"][key] = value
    with pytest.raises(TimelineError, match=r"^t\.json: ") as e:
        parse_timeline(data, "t.json")
    assert where in str(e.value)
