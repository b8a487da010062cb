"""Live LoRA slots through the tiny engine (CPU, random weights): the stream at strength 0
is the base stream bit for bit, a change at block k changes blocks >= k only, a recorded
show with LoRA changes replays to the same frames, and every bad file named over real
OSC (UDP) is answered on /dd/error while frames keep coming and the other slots stay.

Oracles: the same pipeline's own stream without any LoRA (a fresh build, same seed),
and the live run's frames for the replay.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from helpers import wait_for
from osc_helpers import Listener
from safetensors.torch import save_file
from test_lora import random_lora, write_lora

from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_message
from engine.runtime.block_driver import BlockDriver
from engine.runtime.controls import make_registry
from engine.runtime.engine import Engine, _lora_check
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import Lora, PresetError, Vace, load_preset, parse_preset
from engine.runtime.registry import ControlError


@pytest.fixture
def assets(tmp_path):
    d = tmp_path / "assets"
    d.mkdir()
    from engine.models.wan import CONFIGS

    write_lora(random_lora(CONFIGS["tiny"], 5, rank=4), "wan", d / "style.safetensors")
    write_lora(random_lora(CONFIGS["tiny"], 6, rank=2), "kohya", d / "other.safetensors")
    return d


def preset_for(assets, **kw):
    return load_preset("tiny").replace(
        height=32, width=32, steps=[1000, 500], vace=Vace(assets_dir=str(assets)), **kw
    )


def run_blocks(preset, blocks: int, changes: dict[int, dict] | None = None, sync=True):
    """Frames of `blocks` blocks through the block driver, `changes` applied before the
    given blocks. Returns (frames, records)."""
    pipeline = build_pipeline(preset)
    reg = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=preset.vace.assets_dir,
        lora_check=_lora_check(pipeline),
    )
    reg.set_many(preset.control_defaults())
    driver = BlockDriver(pipeline, registry=reg, sync_prompts=sync)
    frames, records = [], []
    try:
        for b in range(blocks):
            if changes and b in changes:
                reg.set_many(changes[b])
            r = driver.step(reg.begin_block(b))
            frames.append(r.rgba.clone())
            records.append(r.record)
    finally:
        pipeline.close()
    return frames, records


@pytest.mark.slow
@pytest.mark.parametrize("pristine", ["host", "device"])  # side path / re-merge every block
def test_strength_zero_stream_is_base_bit_for_bit_and_change_at_k(assets, pristine):
    base, _ = run_blocks(preset_for(assets), 5)
    p = preset_for(assets, loras=[Lora("style.safetensors", 0.0)], lora_pristine=pristine)
    zero, records = run_blocks(p, 5)
    assert records[0]["lora"] == {"1": "style.safetensors"}
    assert all(torch.equal(a, b) for a, b in zip(base, zero, strict=True))
    # strength moves at block 3: blocks 0..2 are the base stream, 3 and on are not
    moved, _ = run_blocks(p, 5, {3: {"lora/1/scale": 0.8}})
    assert all(torch.equal(moved[b], base[b]) for b in range(3))
    assert not torch.equal(moved[3], base[3])
    # back to 0 at block 2 after a move at 1: the weights are the base ones again (the
    # stream differs after block 1 only through its context)
    back, _ = run_blocks(p, 3, {1: {"lora/1/scale": 1.5}, 2: {"lora/1/scale": 0.0}})
    assert torch.equal(back[0], base[0]) and not torch.equal(back[1], base[1])


@pytest.mark.parametrize("pristine", ["host", "device"])  # side path / re-merge every block
def test_live_engine_replay_of_the_control_log_reproduces_frames(assets, tmp_path, pristine):
    """A live engine (loader thread, async install) with a file change and strength
    moves; its control log replayed through `render`'s loop gives the same frames."""
    from bridges.timeline import load_show
    from engine.cli.render import play_show
    from engine.runtime.control_log import ControlLogWriter

    preset = preset_for(assets, loras=[Lora("style.safetensors", 0.5)], lora_pristine=pristine)
    log_path = tmp_path / "show.controls.jsonl"
    writer = ControlLogWriter(log_path, {"model": "tiny", "height": 32, "width": 32})
    frames: list[torch.Tensor] = []

    def on_block(r):
        frames.append(r.rgba.clone())
        writer.write_block({**r.record, "frames": r.frames})
        b = r.block
        reg = engine.registry
        if b == 1:
            reg.set_many({"lora/1/scale": -0.7, "lora/2/file": "other.safetensors"})
        elif b == 3:
            reg.set("lora/2/scale", 1.8)
        elif b == 5:
            reg.set("lora/1/file", "")

    engine = Engine(build_pipeline(preset), status_interval=None, on_block=on_block, max_blocks=9)
    engine.start()
    assert engine.join(120)
    writer.close()
    assert engine.error is None and len(frames) == 9
    show = load_show(log_path)
    installs = {b: r["lora"] for b, r in enumerate(show.records) if "lora" in r}
    assert installs[0] == {"1": "style.safetensors"} and any(
        i.get("2") == "other.safetensors" for i in installs.values()
    )
    pipeline = build_pipeline(preset_for(assets, lora_pristine=pristine))
    assert pipeline.loras.remerge == (pristine == "device")
    reg = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=str(assets),
        lora_check=_lora_check(pipeline),
    )
    driver = BlockDriver(pipeline, sync_prompts=True)
    try:
        replayed = [r.rgba.clone() for r in play_show(show, driver, reg)]
    finally:
        pipeline.close()
    assert len(replayed) == 9
    for b, (a, c) in enumerate(zip(frames, replayed, strict=True)):
        assert torch.equal(a, c), b


def _bad_files(assets, tmp_path):
    """name -> (file value sent, words the error must contain)."""
    (assets / "notes.safetensors").write_text("this is not a LoRA")
    data = (assets / "style.safetensors").read_bytes()
    (assets / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file(
        {
            "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(2, 64),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, 2),
        },
        str(assets / "i2v.safetensors"),
    )
    save_file(  # a LoRA for a wider model: 5120 is the 14B's dim
        {
            "diffusion_model.blocks.0.ffn.2.lora_down.weight": torch.zeros(2, 13824),
            "diffusion_model.blocks.0.ffn.2.lora_up.weight": torch.zeros(5120, 2),
        },
        str(assets / "big.safetensors"),
    )
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(data)
    return {
        "not safetensors": ("notes.safetensors", ["notes.safetensors", "not a safetensors"]),
        "truncated": ("cut.safetensors", ["cut.safetensors", "truncated"]),
        "unknown modules": ("i2v.safetensors", ["i2v.safetensors", "k_img"]),
        "other base": ("big.safetensors", ["big.safetensors", "[2, 13824]", "[2, 128]", "14b"]),
        "outside": (str(outside), ["outside the assets folder"]),
        "traversal": ("../outside.safetensors", ["'..'"]),
        "missing": ("nope.safetensors", ["nope.safetensors", "no such file"]),
        "device": ("/dev/zero", ["outside the assets folder"]),
    }


def test_every_bad_file_over_osc_errors_and_frames_continue(assets, tmp_path):
    bad = _bad_files(assets, tmp_path)
    preset = preset_for(assets, loras=[Lora("other.safetensors", 0.9)])
    engine = Engine(build_pipeline(preset), status_interval=None)
    slots = engine.pipeline.loras
    fb = Listener()
    cfg = OscConfig(port=0, feedback_port=fb.port, oscquery_port=None, zeroconf=False)
    bridge = OscBridge(engine.registry, cfg).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(address, *args):
        client.sendto(encode_message(address, list(args)), ("127.0.0.1", bridge.port))

    engine.start()
    try:
        assert engine.wait_frames(1, 60)
        kept = slots.slots[0]
        assert kept is not None and slots.strengths[0] == 0.9
        for case, (value, words) in bad.items():
            fb.clear()
            n = engine.frames_out
            send("/dd/lora/2/file", value)
            _, args = fb.wait(lambda a, args: a == "/dd/error", 10)
            assert args[0] == "/dd/lora/2/file", case
            assert all(w in args[1] for w in words), (case, args[1])
            assert engine.wait_frames(n + 1, 30), case  # frames continue
            assert engine.registry.get("lora/2/file") == "", case
            assert slots.slots[0] is kept and slots.slots[1] is None, case
        # over the memory budget: refused the same way
        slots.max_bytes = 1000
        fb.clear()
        send("/dd/lora/2/file", "style.safetensors")
        _, args = fb.wait(lambda a, args: a == "/dd/error", 10)
        assert "budget" in args[1] and "style.safetensors" in args[1]
        slots.max_bytes = None
        # a good file still loads into slot 2, in the background
        send("/dd/lora/2/file", "style.safetensors")
        assert wait_for(lambda: slots.slots[1] is not None, 30)
        assert slots.slots[0] is kept and engine.error is None
    finally:
        bridge.close()
        client.close()
        fb.close()
        engine.stop()


def test_a_file_that_breaks_after_the_check_is_reported_and_set_back(assets):
    """The header passed, the tensors did not (the file changed in between): the loader
    reports it, the registry goes back to what the slot really holds."""
    preset = preset_for(assets)
    pipeline = build_pipeline(preset)
    reg = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=str(assets),
        lora_check=_lora_check(pipeline),
    )
    driver = BlockDriver(pipeline, registry=reg, sync_prompts=True)
    try:
        driver.step(reg.begin_block(0))
        reg.set("lora/1/file", "style.safetensors")
        f = assets / "style.safetensors"
        f.write_bytes(f.read_bytes()[:100])  # broken after the registry's check
        r = driver.step(reg.begin_block(1))
        assert "lora" not in r.record and "style.safetensors" in driver.last_error
        assert reg.get("lora/1/file") == "" and pipeline.loras.slots[0] is None
        driver.step(reg.begin_block(2))  # and the stream goes on
    finally:
        pipeline.close()


def test_registry_params_and_preset_loras(assets):
    reg = make_registry(assets_dir=str(assets))
    reg.set("lora/3/scale", 5.0)  # clamped, with a warning
    reg.begin_block(0)
    assert reg.get("lora/3/scale") == 2.0 and reg.get("lora/4/scale") == 1.0
    with pytest.raises(ControlError, match="outside"):
        reg.set("lora/1/file", "/etc/passwd")
    reg.set("lora/1/file", "style.safetensors")  # no engine: the path is checked only
    p = parse_preset("model: tiny\nloras:\n  - {file: style.safetensors, scale: -0.5}\n")
    assert p.loras == [Lora("style.safetensors", -0.5)]
    assert p.control_defaults()["lora/1/scale"] == -0.5
    with pytest.raises(PresetError, match="scale"):
        parse_preset("model: tiny\nloras:\n  - {file: a.safetensors, scale: 3}\n").check()
    with pytest.raises(PresetError, match="at most 4"):
        load_preset("tiny").replace(loras=[Lora("a")] * 5)


def test_timeline_v21_loras_render_and_missing_ones_are_named(assets, caplog):
    from bridges.timeline import parse_timeline
    from engine.cli.render import play_show

    show = parse_timeline(
        {
            "version": "2.1",
            "prompts": [{"startTime": 0, "prompts": [{"text": "a forest", "weight": 100}]}],
            "settings": {
                "loras": [
                    {"path": "C:\\\\Users\\\\vj\\\\loras\\\\style.safetensors", "scale": 0.7},
                    {"path": "gone.safetensors", "scale": 1.0},
                ],
                "loraMergeStrategy": "permanent_merge",
            },
        }
    )
    assert show.loras == [("style.safetensors", 0.7), ("gone.safetensors", 1.0)]
    preset = preset_for(assets)
    pipeline = build_pipeline(preset)
    reg = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=str(assets),
        lora_check=_lora_check(pipeline),
    )
    driver = BlockDriver(pipeline, sync_prompts=True)
    try:
        with caplog.at_level("WARNING"):
            results = list(play_show(show, driver, reg, blocks=2))
    finally:
        pipeline.close()
    assert results[0].record["lora"] == {"1": "style.safetensors"}
    assert pipeline.loras.strengths[:2] == [0.7, 0.0]
    assert any("gone.safetensors" in r.getMessage() for r in caplog.records)


def test_run_lora_flags(assets, capsys, caplog):
    """`dreamdeck run --lora FILE[:SCALE]` (in process, as the VACE flags are tested): a bad
    file is one line and exit code 2 before anything runs; good ones load at start."""
    from engine.cli import main

    (assets / "bad.safetensors").write_bytes(b"\x00" * 64)
    base = ["run", "--no-osc", "--no-shm", "--model", "tiny", "--height", "32", "--width", "32"]
    base += ["--blocks", "1", "--assets", str(assets)]
    good = ["--lora", "style.safetensors:0.5", "--lora", "other.safetensors"]
    assert main([*base, *good, "--lora", "bad.safetensors:1.2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "LoRA 3" in errors[0] and "bad.safetensors" in errors[0], err
    assert main([*base, "--lora", "x.safetensors:7"]) == 2
    assert "outside -2..2" in capsys.readouterr().err
    with caplog.at_level("INFO"):
        assert main([*base, *good]) == 0
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA slot")]
    assert loaded == ["LoRA slot 1: style.safetensors", "LoRA slot 2: other.safetensors"]


def test_lora_flag_parsing():
    from engine.cli import UsageError
    from engine.cli.run import parse_lora_flag

    assert parse_lora_flag("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_flag("a.safetensors:-0.5") == ("a.safetensors", -0.5)
    assert parse_lora_flag("C:\\x\\a.safetensors") == ("C:\\x\\a.safetensors", 1.0)
    for bad in ("a.safetensors:3", "a.safetensors:nan"):
        with pytest.raises(UsageError):
            parse_lora_flag(bad)
    assert json.loads(json.dumps(parse_lora_flag("x:0.25"))) == ["x", 0.25]


def test_static_slots_warm_up_and_leave_the_base_stream_bit_for_bit(assets):
    """The compile-time layout (every block linear prewrapped with zero factors, side paths
    run once in an extra warm-up block) on the CPU: the stream after warm-up is the plain
    pipeline's bit for bit, and a LoRA then moves as it does in the eager layout."""
    from engine.models.lora import LoraLinear, LoraSlots
    from engine.runtime.lora_loader import LoraLoader

    preset = preset_for(assets)
    base, _ = run_blocks(preset, 3)
    pipeline = build_pipeline(preset)
    pipeline.loras = LoraSlots(pipeline.model, rank_bucket=8)
    pipeline.lora_loader = LoraLoader(pipeline.loras, str(assets))
    wrapped = [m for m in pipeline.model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 8 * pipeline.model.cfg.layers  # every block linear, up front
    reg = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=str(assets),
        lora_check=_lora_check(pipeline),
    )
    driver = BlockDriver(pipeline, registry=reg, sync_prompts=True)
    calls = []
    warm = pipeline.loras.warm
    pipeline.loras.warm = lambda on: (calls.append(on), warm(on))[1]
    try:
        driver.warmup(reg.snapshot(), 1)
        assert calls == [True, False] and not any(m.side_on for m in wrapped)
        frames = [driver.step(reg.begin_block(b)).rgba for b in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(base, frames, strict=True))
        reg.set_many({"lora/1/file": "style.safetensors", "lora/1/scale": 0.7})
        driver.step(reg.begin_block(3))
        assert pipeline.loras.side_sites == len(wrapped)  # moved: every block's path on
        driver.step(reg.begin_block(4))
        assert pipeline.loras.side_sites == 0  # still: merged
    finally:
        pipeline.close()
