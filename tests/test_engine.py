"""The live engine on the tiny model (CPU, random weights, 64x64), in process."""

import statistics
import threading
import time

import numpy as np
import pytest
import torch

from bridges.timeline import Show
from engine.cli.render import play_show
from engine.runtime.block_driver import BlockDriver, prompt_target
from engine.runtime.controls import make_registry
from engine.runtime.engine import Engine
from engine.runtime.frame_path import FramePath
from engine.runtime.pacer import Pacer
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import load_preset

PRESET = load_preset("tiny").replace(height=64, width=64, steps=[1000, 750])


def tiny_pipeline(**overrides):
    return build_pipeline(PRESET.replace(**overrides) if overrides else PRESET)


def run_engine(blocks: int, on_block=None, **kwargs):
    """Run a fresh engine for `blocks` blocks; returns (engine, {block: BlockResult})."""
    results = {}

    def collect(r):
        results[r.block] = r
        if on_block is not None:
            on_block(r, engine)

    engine = Engine(
        tiny_pipeline(), max_blocks=blocks, status_interval=None, on_block=collect, **kwargs
    )
    engine.start()
    assert engine.join(120), "engine did not finish"
    engine.stop()
    assert engine.error is None, engine.error
    return engine, results


def replay(records: list[dict]) -> list[torch.Tensor]:
    """The offline path (sync driver, render's loop) over recorded controls."""
    pipeline = tiny_pipeline()
    registry = make_registry(default_prompt=PRESET.prompt, default_steps=PRESET.steps)
    show = Show(path=None, kind="control-log", blocks=len(records), records=records)
    try:
        return [
            r.rgba.clone()
            for r in play_show(show, BlockDriver(pipeline, sync_prompts=True), registry)
        ]
    finally:
        pipeline.close()


def test_a_control_change_alters_the_output_from_the_next_block_and_replays_exactly():
    results = {}
    engine = Engine(
        tiny_pipeline(),
        max_blocks=7,
        status_interval=None,
        on_block=lambda r: results.__setitem__(r.block, r),
    )
    engine.start()
    assert engine.wait_frames(9 + 12 * 2, timeout=60)
    next_block = engine.block  # this block may already have begun: then the one after it
    engine.registry.set("seed", 777)
    assert engine.join(60)
    engine.stop()
    assert engine.error is None
    applied = [b for b, r in sorted(results.items()) if r.controls.changed.get("seed") == 777]
    assert applied and next_block <= applied[0] <= next_block + 1
    first = applied[0]
    assert results[first].controls.received is not None

    records = [results[b].record for b in sorted(results)]
    assert [r["block"] for r in records] == list(range(7))
    live = [results[b].rgba for b in sorted(results)]
    # The offline replay of the live record gives the very same frames.
    again = replay(records)
    assert all(torch.equal(a, b) for a, b in zip(live, again, strict=True))
    # Without the change, the blocks before it are the same and the blocks from it differ.
    unchanged = [
        dict(r, changed={k: v for k, v in r["changed"].items() if k != "seed"}) for r in records
    ]
    ref = replay(unchanged)
    for b in range(7):
        same = torch.equal(live[b], ref[b])
        assert same == (b < first), b


def test_reset_restarts_the_stream_and_reproduces_block_zero():
    def on_block(r, engine):
        if r.block == 1:
            engine.reset()  # from the generation thread itself: lands on block 2 for sure

    _, results = run_engine(4, on_block)
    assert [results[b].index for b in range(4)] == [0, 1, 0, 1]
    assert results[2].controls.events == ("reset",)
    assert results[2].frames == 9
    assert torch.equal(results[2].rgba, results[0].rgba)
    assert torch.equal(results[3].rgba, results[1].rgba)


def test_decoder_reload_between_blocks():
    def on_block(r, engine):
        if r.block == 1:
            engine.registry.set("decoder", "wan")

    engine, results = run_engine(4, on_block)
    assert engine.pipeline.decoder_kind == "wan"
    assert results[2].controls.changed == {"decoder": "wan"}
    assert [results[b].index for b in range(4)] == [0, 1, 0, 1]  # the new decoder starts a stream
    assert [results[b].frames for b in range(4)] == [9, 12, 9, 12]
    assert not torch.equal(results[2].rgba, results[0].rgba)  # another decoder, other pixels


def test_prompt_change_is_recorded_where_the_mixer_starts_it():
    # Live, the new prompt starts when its encoding is ready: on a loaded machine that may
    # be many blocks later, so the engine runs until it started (or a generous bound)
    # rather than for a fixed number of blocks.
    def on_block(r, engine):
        if r.block == 1:
            engine.registry.set("prompt", "a red cube on a table")
        if r.block > 0 and "prompt" in r.record:
            engine.max_blocks = r.block + 1  # seen it: stop after this block

    _, results = run_engine(400, on_block)
    assert results[0].record["prompt"] == prompt_target(results[0].controls.values)
    started = [b for b in sorted(results) if "prompt" in results[b].record]
    assert started[0] == 0 and len(started) == 2, started
    assert started[1] >= 2  # at or after the block the change was made for
    assert results[started[1]].record["prompt"]["prompts"] == [["a red cube on a table", 1.0]]
    # until it started, the blocks kept the old text (one embedding: the same key)
    assert "prompt/1/text" in results[2].controls.changed


def test_pause_holds_the_stream_and_status_reports():
    engine = Engine(tiny_pipeline(), status_interval=None)
    engine.start()
    try:
        assert engine.wait_frames(21, timeout=60)
        s = engine.status()
        assert set(s) >= {"fps", "block_ms", "latency_ms", "block", "vram_mb", "state"}
        assert (
            s["state"] == "running" and s["vram_mb"] is None and s["fps"] > 0 and s["block_ms"] > 0
        )
        assert engine.registry.lookahead > 0  # the measured block time feeds quantised changes
        assert "fps" in engine.status_line()
        engine.pause()
        deadline = time.monotonic() + 10
        while engine.state != "paused" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.state == "paused"
        held = engine.frames_out
        time.sleep(0.4)
        assert engine.frames_out == held
        engine.pause(False)
        assert engine.wait_frames(held + 12, timeout=30)
    finally:
        engine.stop()
    assert engine.state == "stopped"
    engine.stop()  # idempotent


class StallableSink:
    """A consumer that stops reading (send blocks) while `stalled` is set."""

    name = "stallable"

    def __init__(self):
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.sent = 0

    def open(self, width, height):
        pass

    def send(self, rgba, meta):
        while self.stalled.is_set() and not self.released.is_set():
            self.released.wait(0.01)
        self.sent += 1

    def close(self):
        pass


class TimedFramePath(FramePath):
    """The real frame path, timing each `submit_block` call (the generation thread's only
    contact with the consumers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.submit_s: list[float] = []

    def submit_block(self, rgba, block_index):
        t = time.perf_counter()
        try:
            return super().submit_block(rgba, block_index)
        finally:
            self.submit_s.append(time.perf_counter() - t)


@pytest.mark.timeout(180)
def test_a_stalled_consumer_does_not_slow_generation():
    # Behaviour, not wall-clock ratios between runs: with the consumer stuck for good from
    # its first frame, the engine still makes every block (a blocking hand-off would hang
    # it), the frame path drops the blocks nobody reads (latest wins), and handing a block
    # over costs the generation thread a small part of the block it just made, measured in
    # the same run under the same load.
    sink = StallableSink()
    path = TimedFramePath([sink], Pacer(fps=float("inf")))
    stamps: list[float] = []
    blocks = 24

    def on_block(r):
        stamps.append(time.perf_counter())

    sink.stalled.set()  # stuck from its very first frame
    engine = Engine(
        tiny_pipeline(), frame_path=path, max_blocks=blocks, status_interval=None, on_block=on_block
    )
    engine.start()
    try:
        assert engine.join(150), "a stuck consumer stopped generation"
        assert engine.error is None
        assert engine.block == blocks and len(stamps) == blocks
        assert sink.sent == 0  # it really was stuck: not one frame went through
        assert path.stats.dropped_blocks >= blocks - 6  # pending replaced, pool reclaimed
    finally:
        sink.released.set()
        engine.stop()
    block_s = statistics.median(np.diff(stamps))
    submit_s = statistics.median(path.submit_s[1:])
    assert submit_s < 0.25 * block_s, (submit_s, block_s)


def test_warm_up_leaves_the_show_unchanged():
    """Warm-up blocks (compile, autotune) are thrown away and the stream restarts: the show
    is the same as without them."""
    outs = []
    for warm in (0, 2):
        results = {}
        pipeline = build_pipeline(PRESET.replace(warmup_blocks=warm))
        engine = Engine(
            pipeline,
            max_blocks=3,
            status_interval=None,
            on_block=lambda r, res=results: res.__setitem__(r.block, r),
        )
        engine.start()
        assert engine.join(60)
        engine.stop()
        assert engine.error is None
        outs.append([results[b].rgba for b in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_preset_kv_cache_and_fused_qkv_reach_the_session():
    """`kv_cache: fp8` in a preset gives the session an fp8 context cache, and every block
    is built with q/k/v fused."""
    p = tiny_pipeline(kv_cache="fp8")
    try:
        cache = p.session.cache
        assert cache.fp8 and cache[0].k.dtype == torch.float8_e4m3fn
        assert all(b.self_attn.fused for b in p.model.blocks)
    finally:
        p.close()
