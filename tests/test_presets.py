"""Engine presets: every shipped preset loads; bad files are rejected with file, line, key."""

import pytest

from engine.runtime.presets import (
    EnginePreset,
    PresetError,
    available_presets,
    load_preset,
    parse_preset,
)


def test_shipped_presets_load_and_cover_the_targets():
    names = available_presets()
    for required in ("tiny", "h100-832x480", "h100-576x320", "rtx5090-576x320"):
        assert required in names
    for name in names:
        p = load_preset(name)
        assert p.name == name
        assert p.height % 16 == 0 and p.width % 16 == 0
    tiny = load_preset("tiny")
    assert tiny.model == "tiny" and tiny.device == "cpu" and tiny.dtype == "fp32"
    small = load_preset("rtx5090-576x320")
    assert (small.fp8, small.text_encoder, small.width, small.height) == (True, "cpu", 576, 320)
    big = load_preset("h100-832x480")
    assert (big.model, big.width, big.height, big.dtype) == ("14b", 832, 480, "bf16")


def test_nested_sections_and_nulls():
    p = parse_preset("model: tiny\noutputs:\n  shm: null\n  ndi: stage\nports:\n  osc: 9200\n")
    assert p.outputs.shm is None and p.outputs.ndi == "stage" and p.ports.osc == 9200
    assert p.ports.oscquery == 9138  # unspecified keys keep their defaults


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("model: tiny\nheigth: 64\n", 2, ["unknown key heigth", "height"]),
        ("model: tiny\nheight: tall\n", 2, ["height", "integer"]),
        ("model: tiny\nheight: 70\n", None, ["height", "multiple of 16"]),
        ("model: 7b\n", 1, ["model", "'7b'", "14b"]),
        ("model: tiny\nsteps: [1000, x]\n", 2, ["steps[1]", "integer"]),
        ("model: tiny\nsteps: [750, 1000]\n", None, ["steps", "decreasing"]),
        ("model: tiny\nfp8: yes please\n", 2, ["fp8", "true or false"]),
        ("model: tiny\noutputs:\n  shm: a\n  sm: b\n", 4, ["unknown key outputs.sm"]),
        ("model: tiny\noutputs: 3\n", 2, ["outputs", "mapping"]),
        ("model: tiny\nmodel: 14b\n", 2, ["model given twice"]),
        ("model: [tiny\n", 2, ["invalid YAML"]),
        ("- a\n- b\n", 1, ["expected a mapping"]),
        ("", None, ["empty preset"]),
    ],
)
def test_bad_presets_name_file_line_and_key(text, line, words):
    with pytest.raises(PresetError) as e:
        parse_preset(text, "bad.yaml")
    msg = str(e.value)
    assert msg.startswith("bad.yaml")
    if line is not None:
        assert msg.startswith(f"bad.yaml:{line}:"), msg
    for w in words:
        assert w in msg, msg


def test_load_by_path_and_unknown_name(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model: tiny\nheight: 64\nwidth: 96\n")
    p = load_preset(f)
    assert (p.name, p.height, p.width) == ("mine", 64, 96)
    with pytest.raises(PresetError, match="unknown preset 'nope'.*tiny"):
        load_preset("nope")
    with pytest.raises(PresetError, match="not found"):
        load_preset(tmp_path / "missing.yaml")
    f.write_text("model: tiny\n  bad: indent\n")
    with pytest.raises(PresetError, match=rf"{f}:2: invalid YAML"):
        load_preset(f)


def test_overrides_are_validated_and_leave_the_original_alone():
    p = load_preset("tiny")
    q = p.replace(height=64, width=64, seed=None)
    assert (q.height, q.width, q.seed) == (64, 64, p.seed)
    assert p.height == 96
    with pytest.raises(PresetError, match="width: 100 is not a positive multiple of 16"):
        p.replace(width=100)
    with pytest.raises(PresetError, match="kv_bias"):
        p.replace(kv_bias=2.0)


def test_control_defaults_are_valid_registry_values():
    from engine.runtime.controls import make_registry

    reg = make_registry()
    p = EnginePreset(
        seed=7, kv_bias=0.5, transition_blocks=0, transition_method="linear", decoder="wan"
    )
    reg.set_many(p.control_defaults())
    c = reg.begin_block(0)
    assert c["seed"] == 7 and c["kv_bias"] == 0.5 and c["decoder"] == "wan"
    assert c["transition/blocks"] == 0 and c["transition/method"] == "linear"
