"""The interpolator (uint8 frames in and out) and the frame path presenting at a fixed
rate with it: real threads, a real sink, the tiny RIFE on the CPU."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.models.rife import CONFIGS, random_rife, synthesize
from engine.runtime.frame_path import FramePath, check_output_fps
from engine.runtime.interpolator import Interpolator
from engine.runtime.pacer import OutputPacer, Pacer
from engine.runtime.registry import ControlError


def frames(h=48, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (h, w, 4), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (h, w, 4), dtype=torch.uint8, generator=g)
    return a, b


def test_endpoints_are_the_generated_frames_exactly():
    interp = Interpolator(random_rife(CONFIGS["tiny"]), "cpu")
    a, b = frames()
    assert np.array_equal(interp.frame(a, b, 0.0), a.numpy())
    assert np.array_equal(interp.frame(a, b, 1.0), b.numpy())
    assert interp.frames == 0  # no network call for either
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="time"):
            interp.frame(a, b, bad)
    with pytest.raises(ValueError, match="frames"):
        interp.frame(a, b[:, :40], 0.5)


@pytest.mark.parametrize("downscale", [1, 2])
def test_between_frames_is_the_network_on_0_1_floats(downscale):
    net = random_rife(CONFIGS["tiny"], seed=2)
    interp = Interpolator(net, "cpu", downscale=downscale)
    a, b = frames(64, 96)
    t = 0.3
    got = interp.frame(a, b, t).copy()
    x0 = a[..., :3].permute(2, 0, 1)[None].float() / 255
    x1 = b[..., :3].permute(2, 0, 1)[None].float() / 255
    if downscale == 1:
        y = net(x0, x1, t)
    else:  # flow on half-size frames, scaled up; synthesis at full size
        s0 = F.interpolate(x0, size=(32, 48), mode="bilinear", align_corners=False)
        s1 = F.interpolate(x1, size=(32, 48), mode="bilinear", align_corners=False)
        flow, mask = net.flow(s0, s1, t)
        flow = F.interpolate(flow, size=(64, 96), mode="bilinear", align_corners=False) * 2
        mask = F.interpolate(mask, size=(64, 96), mode="bilinear", align_corners=False)
        y = synthesize(x0, x1, flow, mask)
    rgb = (y[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(got[..., :3].astype(int) - rgb.astype(int)).max() <= 1
    alpha = np.round(a[..., 3].numpy() * (1 - t) + b[..., 3].numpy() * t)
    assert np.abs(got[..., 3].astype(int) - alpha.astype(int)).max() <= 1
    assert interp.frames == 1 and interp.ms is not None and interp.ms > 0


class Collect:
    name = "collect"

    def __init__(self):
        self.frames: list[tuple[float, int, int]] = []  # (timestamp, block, crc-ish)
        self.sizes: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def open(self, w, h):
        self.sizes.append((w, h))

    def send(self, rgba, meta):
        with self.lock:
            self.frames.append((meta.timestamp, meta.block, hash(rgba.tobytes())))

    def close(self):
        pass


def test_frame_path_presents_interpolated_frames_at_the_output_rate():
    """Blocks of 4 frames every 0.4 s (10 fps) presented at 30 fps: about three distinct
    frames per generated one, never blocking submit_block."""
    sink = Collect()
    interp = Interpolator(random_rife(CONFIGS["tiny"]), "cpu", downscale=2)
    fp = FramePath([sink], OutputPacer(30.0), interpolator=interp)
    g = np.random.default_rng(0)
    t_submit = []
    try:
        for k in range(12):
            block = g.integers(0, 256, (4, 48, 64, 4), dtype=np.uint8)
            t0 = time.process_time()
            assert fp.submit_block(block, k)
            t_submit.append(time.process_time() - t0)
            time.sleep(0.4)
        time.sleep(0.3)
    finally:
        fp.close()
    assert max(t_submit) < 0.05  # a memcpy, never waiting for the publisher
    got = sink.frames
    ts = np.array([t for t, _, _ in got])
    assert (np.diff(ts) > 0).all()
    distinct = len({h for *_, h in got})
    assert distinct == len(got)  # fit mode: no frame twice
    assert fp.stats.interpolated > 0
    # 48 generated frames; the output shows clearly more distinct frames than that
    assert distinct > 1.5 * 48
    assert fp.stats.interp_errors == 0


def test_configure_checks_first_and_changes_nothing_on_error():
    sink = Collect()
    fp = FramePath([sink], Pacer())  # no interpolator: weights missing
    try:
        before = dict(fp.output)
        with pytest.raises(ValueError, match="RIFE weights"):
            fp.configure(fps=30, interpolate=True)
        for bad in (500, -1, 0.5, float("nan"), "30", True):
            with pytest.raises(ValueError, match="fps"):
                fp.configure(fps=bad)
        with pytest.raises(ValueError, match="speed"):
            fp.configure(speed="warp")
        assert fp.output == before
        out = fp.configure(fps=60)  # a fixed rate without interpolation is fine
        assert out["fps"] == 60.0 and not out["interpolate"]
        for _ in range(100):
            if fp.pacer.fixed_fps == 60.0:
                break
            time.sleep(0.01)
        assert isinstance(fp.pacer, Pacer) and fp.pacer.fixed_fps == 60.0
        fp.submit_block(np.zeros((3, 8, 8, 4), np.uint8), 0)  # the stream goes on
        for _ in range(200):
            if len(sink.frames) == 3:
                break
            time.sleep(0.01)
        assert len(sink.frames) == 3
    finally:
        fp.close()
    assert check_output_fps(0) is None and check_output_fps(None) is None


def test_engine_reports_and_undoes_what_the_frame_path_cannot_take():
    from engine.runtime.engine import tiny_engine

    sink = Collect()
    fp = FramePath([sink], Pacer())
    engine = tiny_engine(frame_path=fp, status_interval=None)
    reg = engine.registry
    assert reg.get("output/fps") == 0.0 and reg.get("output/interpolate") is False
    engine.start()
    try:
        assert engine.wait_frames(9, timeout=120)
        reg.set("output/interpolate", True)
        assert reg.get("output/interpolate") is False  # undone
        assert "RIFE weights" in engine.status()["last_error"]
        with pytest.raises(ControlError, match="out of range"):
            reg.set("output/fps", 500)
        assert reg.get("output/fps") == 0.0
        reg.set("output/fps", 30)
        assert fp.output["fps"] == 30.0
        n = engine.frames_out
        assert engine.wait_frames(n + 12, timeout=120)  # generation never stopped
    finally:
        engine.stop()
    assert engine.error is None


def test_engine_latency_includes_the_wait_for_the_next_frame():
    from engine.runtime.engine import tiny_engine

    interp = Interpolator(random_rife(CONFIGS["tiny"]), "cpu", downscale=4)
    fp = FramePath([Collect()], Pacer(), interpolator=interp)
    engine = tiny_engine(frame_path=fp, status_interval=None)
    engine.registry.set_many({"output/fps": 30, "output/interpolate": True})
    assert isinstance(fp.output, dict) and fp.output["interpolate"]
    engine.start()
    try:
        assert engine.wait_frames(21, timeout=120)
        engine.registry.set("seed", 5)  # a block control: the engine measures its latency
        assert engine.wait_frames(engine.frames_out + 24, timeout=120)
        s = engine.status()
        assert fp.pacer.__class__ is OutputPacer
        # one generated frame at the rate the output moves through, plus the compute
        assert s["interp_latency_ms"] >= 1e3 / fp.pacer.source_rate
        assert s["latency_ms"] == pytest.approx(engine.latency_ms + s["interp_latency_ms"], rel=0.2)
        assert s["latency_ms"] > s["interp_latency_ms"] > 0
    finally:
        engine.stop()


class Recording:
    """A fake network-free interpolator: the frame at t is a*(1-t)+b*t (exact check of
    which frames and times the resampler asks for). Stands in for RIFE only here."""

    def __init__(self):
        self.calls = []

    def frame(self, a, b, t):
        self.calls.append(t)
        return np.round(a.astype(float) * (1 - t) + b.astype(float) * t).astype(np.uint8)


def test_block_resampler_puts_output_frames_at_exact_source_positions():
    """Source frame g has every pixel = 5 g; output frame j at position j * 16/30 must
    then be 5 * j * 16/30 everywhere, across block edges, whatever the block sizes."""
    from engine.runtime.interpolator import BlockResampler

    rs = BlockResampler(Recording(), 16 / 30)
    sizes, g, out = [9, 12, 12, 5, 12], 0, []
    for n in sizes:
        block = np.stack([np.full((2, 3, 4), 5 * (g + i), np.uint8) for i in range(n)])
        g += n
        out.append(rs(block))
    frames = np.concatenate(out)
    total = sum(sizes)
    expect = [5 * j * 16 / 30 for j in range(int((total - 1) * 30 / 16) + 1)]
    assert len(frames) == len(expect)
    assert np.allclose(frames[:, 0, 0, 0], np.round(expect), atol=1)
    assert (frames == frames[:, :1, :1, :1]).all()
    # a second resampler over the same blocks gives the same frames (deterministic)
    rs2, g2, out2 = BlockResampler(Recording(), 16 / 30), 0, []
    for n in sizes:
        out2.append(rs2(np.stack([np.full((2, 3, 4), 5 * (g2 + i), np.uint8) for i in range(n)])))
        g2 += n
    assert np.array_equal(np.concatenate(out2), frames)
    with pytest.raises(ValueError, match="step"):
        BlockResampler(Recording(), 0)(np.zeros((1, 2, 2, 4), np.uint8))


def test_render_at_30fps_interpolates_deterministically(tmp_path):
    import json

    import av

    from engine.cli import main

    show = tmp_path / "show.json"
    show.write_text(
        json.dumps(
            {
                "version": "2.0",
                "settings": {"resolution": {"height": 64, "width": 64}, "seed": 3},
                "prompts": [{"startTime": 0, "endTime": 1.3, "prompts": [{"text": "a"}]}],
            }
        )
    )
    tiny = ["--model", "tiny", "--height", "64", "--width", "64", "--no-progress"]
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.mp4"
        assert main(["render", str(show), "-o", str(out), "--fps", "30", *tiny]) == 0
        with av.open(str(out)) as c:
            st = c.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
            rate = float(st.average_rate)
        outs.append(frames)
    plain = tmp_path / "plain.mp4"
    assert main(["render", str(show), "-o", str(plain), *tiny]) == 0
    with av.open(str(plain)) as c:
        n16 = sum(1 for _ in c.decode(video=0))
    assert rate == pytest.approx(30.0, rel=0.01)
    # (n16 - 1) source intervals at 30/16 output frames each, + the first frame
    assert len(outs[0]) == int((n16 - 1) * 30 / 16) + 1
    assert np.array_equal(outs[0], outs[1])
    assert main(["render", str(show), "-o", str(plain), "--fps", "500", *tiny]) == 2


def test_live_recording_gets_the_interpolated_stream(tmp_path):
    import av

    from engine.runtime.control_log import read_control_log
    from engine.runtime.engine import tiny_engine
    from engine.runtime.recorder import Recorder

    interp = Interpolator(random_rife(CONFIGS["tiny"]), "cpu", downscale=4)
    fp = FramePath([Collect()], Pacer(), interpolator=interp)
    rec = Recorder(tmp_path / "live.mp4", width=64, height=64, fps=None)
    engine = tiny_engine(frame_path=fp, recorder=rec, status_interval=None, max_blocks=5)
    # real speed: the video's 16 fps motion at 30 fps, a fixed 30/16 frames per frame
    engine.registry.set_many({"output/fps": 30, "output/interpolate": True, "output/speed": "real"})
    assert rec.resample is not None
    for _ in range(200):  # the frame path swaps its pacer on its own thread
        if isinstance(fp.pacer, OutputPacer) and fp.pacer.speed == "real":
            break
        time.sleep(0.01)
    engine.start()
    assert engine.join(timeout=180)
    engine.stop()
    assert engine.error is None and rec.error is None
    with av.open(str(tmp_path / "live.mp4")) as c:
        n = sum(1 for _ in c.decode(video=0))
    generated = engine.frames_out  # 9 + 4 * 12
    assert n == int((generated - 1) * 30 / 16) + 1
    log = read_control_log(rec.log_path)
    assert sum(b["frames"] for b in log.blocks) == n


@pytest.mark.parametrize(
    ("fps", "msg"),
    [
        ("500", "out of range"),
        ("0", "must be positive"),
        ("-30", "out of range"),
        ("fast", "use 30, 60, display"),
        ("nan", "out of range"),
    ],
)
def test_run_refuses_a_bad_output_rate_before_loading_anything(fps, msg, capsys):
    from engine.cli import main

    assert main(["run", "--model", "tiny", "--no-osc", "--fps", fps, "--blocks", "1"]) == 2
    err = capsys.readouterr().err
    assert "--fps" in err and msg in err


def test_run_fps_display_and_numbers():
    from engine.cli.run import DISPLAY_FPS, parse_fps

    assert parse_fps("display") == DISPLAY_FPS == 60.0
    assert parse_fps(" 30 ") == 30.0 and parse_fps("59.94") == 59.94 and parse_fps(None) is None


def test_pair_cache_reuses_inputs_only_for_the_same_pair():
    net = random_rife(CONFIGS["tiny"], seed=4)
    cached, fresh = Interpolator(net, "cpu", downscale=2), Interpolator(net, "cpu", downscale=2)
    a, b = frames(32, 48, seed=1)
    c, d = frames(32, 48, seed=2)
    for t in (0.25, 0.5, 0.75):  # three output frames between the same two
        assert np.array_equal(cached.frame(a, b, t, key="ab"), fresh.frame(a, b, t))
    # another pair under another key is computed from its own frames
    assert np.array_equal(cached.frame(c, d, 0.5, key="cd"), fresh.frame(c, d, 0.5))
    assert not np.array_equal(fresh.frame(a, b, 0.5).copy(), fresh.frame(c, d, 0.5))
