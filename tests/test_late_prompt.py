"""A prompt change that arrives while a block is being made joins that block at its next
denoising step (engine/runtime/block_driver.py): the session's `late` hook, the registry's
non-consuming look at what is staged, the mixer's `join_now`, the control log's step, the
replay, and the latency model `bench` reports."""

from __future__ import annotations

import pytest
import torch

from bridges.timeline import Show
from engine.cli.bench import join_latency_ms
from engine.cli.render import play_show
from engine.models.wan import CONFIGS, SELF, WanModel, init_random_
from engine.runtime.block_driver import PROMPT_PATHS, BlockDriver
from engine.runtime.controls import make_registry
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import load_preset
from engine.stream.schedule import renoise, sigma, x0_from_velocity
from engine.stream.session import BlockInputs, StreamSession

H, W = 32, 48
PRESET = load_preset("tiny").replace(height=64, width=64, steps=[1000, 750, 500])


def _text(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = CONFIGS["tiny"]
    return torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)


@pytest.fixture(scope="module")
def model():
    return init_random_(WanModel(CONFIGS["tiny"]), seed=1).eval()


# -- the session ----------------------------------------------------------------------------


def test_a_late_text_runs_the_remaining_steps_with_the_new_text(model):
    """Against a reference written here: block 0 with text A for step 0 and B after."""
    a, b = _text(1), _text(2)
    steps = [1000, 750, 500]
    asked: list[int] = []

    def late(i):
        asked.append(i)
        return (b, "B") if i == 1 else None

    sess = StreamSession(model, height=H, width=W)
    out = sess.next_block(BlockInputs(text=a, text_key="A", steps=steps, seed=3), late=late)
    assert asked == [1, 2]  # block 0 has no recompute pass: nothing before its first step
    assert out.text_step == 1

    ref_sess = StreamSession(model, height=H, width=W)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(ref_sess.latent_shape, generator=g)
    cross = {"A": model.cross_kv(a), "B": model.cross_kv(b)}
    with torch.no_grad():
        for i, t in enumerate(steps):
            kv = cross["A" if i < 1 else "B"]
            v = model.forward_stream(
                x, torch.full((1,), float(t)), kv, ref_sess.rope_first, ref_sess.cache, SELF
            )
            x0 = x0_from_velocity(x, v.float(), sigma(t))
            if i + 1 < len(steps):
                x = renoise(x0, torch.randn(x.shape, generator=g), sigma(steps[i + 1]))
    assert torch.equal(out.latents, x0)
    # and it is neither the all-A nor the all-B block
    for text, key in ((a, "A"), (b, "B")):
        other = StreamSession(model, height=H, width=W).next_block(
            BlockInputs(text=text, text_key=key, steps=steps, seed=3)
        )
        assert not torch.equal(other.latents, out.latents)


def test_a_hook_that_never_answers_changes_nothing_and_later_blocks_ask_from_step_0(model):
    a = _text(1)
    plain = StreamSession(model, height=H, width=W)
    hooked = StreamSession(model, height=H, width=W)
    asked: list[tuple[int, int]] = []
    for blk in range(3):
        inputs = BlockInputs(text=a, text_key="A", steps=[1000, 500], seed=4)
        p = plain.next_block(inputs)
        h = hooked.next_block(inputs, late=lambda i, blk=blk: asked.append((blk, i)))
        assert torch.equal(p.latents, h.latents) and h.text_step is None
    # after block 0 the recompute pass comes first: a text may join before step 0 too
    assert asked == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_bad_late_text_is_refused_with_its_shape(model):
    sess = StreamSession(model, height=H, width=W)
    with pytest.raises(ValueError, match="text embedding must be"):
        sess.next_block(
            BlockInputs(text=_text(1), text_key="A", steps=[1000, 500], seed=0),
            late=lambda i: (torch.zeros(1, 3, 5), "bad"),
        )


# -- the registry's look at staged changes ----------------------------------------------------


def test_pending_within_looks_without_taking():
    reg = make_registry(default_prompt="a", default_steps=[1000, 750])
    reg.begin_block(0)
    assert reg.pending_within(PROMPT_PATHS) is None  # nothing staged
    reg.set("prompt/1/text", "b")
    values, received = reg.pending_within(PROMPT_PATHS)
    assert values["prompt/1/text"] == "b" and received is not None
    assert reg.applied("prompt/1/text") == "a"  # not applied by looking
    controls = reg.begin_block(1)  # the boundary still takes it
    assert controls.changed == {"prompt/1/text": "b"}
    # anything else staged beside it keeps the batch for the boundary
    reg.set_many([("prompt/1/text", "c"), ("seed", 9)])
    assert reg.pending_within(PROMPT_PATHS) is None
    reg.begin_block(2)
    reg.set("prompt/1/text", "d")
    reg.set("reset")  # a trigger waiting: not alone either
    assert reg.pending_within(PROMPT_PATHS) is None


def test_pending_within_refuses_modulated_prompt_paths():
    reg = make_registry(default_prompt="a", default_steps=[1000, 750])
    reg.set("prompt/1/text", "b")
    reg.modulator = lambda values, now, block: {"prompt/1/weight": 0.5}
    reg.begin_block(0)
    reg.set("prompt/1/text", "c")
    assert reg.pending_within(PROMPT_PATHS) is None


# -- the driver: live joins, the control log, the replay ---------------------------------------


def _driver():
    pipeline = build_pipeline(PRESET)
    registry = make_registry(default_prompt=PRESET.prompt, default_steps=PRESET.steps)
    return pipeline, registry, BlockDriver(pipeline, registry=registry)


def _mid_block(pipeline, at_step: int, action):
    """Run `action()` just before the session asks its hook at `at_step` (once)."""
    real = pipeline.session.next_block
    done = []

    def wrapped(inputs, late=None):
        if late is None:
            return real(inputs)

        def hooked(i):
            if i == at_step and not done:
                done.append(i)
                action()
            return late(i)

        return real(inputs, hooked)

    pipeline.session.next_block = wrapped


def _replay(records):
    pipeline = build_pipeline(PRESET)
    registry = make_registry(default_prompt=PRESET.prompt, default_steps=PRESET.steps)
    show = Show(path=None, kind="control-log", blocks=len(records), records=records)
    try:
        return [r for r in play_show(show, BlockDriver(pipeline, sync_prompts=True), registry)]
    finally:
        pipeline.close()


def test_a_prompt_change_mid_block_joins_it_and_replays_to_the_same_frames():
    pipeline, registry, driver = _driver()
    new = "a red cube on a table"
    pipeline.cache.request(new)
    assert pipeline.cache.wait([new], 120)
    results = [driver.step(registry.begin_block(0))]
    _mid_block(pipeline, 1, lambda: registry.set("prompt/1/text", new))
    results.append(driver.step(registry.begin_block(1)))
    results.append(driver.step(registry.begin_block(2)))
    joined = results[1].record["prompt"]
    assert joined["step"] == 1 and joined["prompts"] == [[new, 1.0]]
    assert results[1].late_received is not None
    # the boundary after it takes the same change again: no second start
    assert results[2].controls.changed.get("prompt/1/text") == new
    assert "prompt" not in results[2].record
    # ...and says so: its latency is not that change's (it showed one block earlier)
    assert results[2].echo_only and not results[1].echo_only and not results[0].echo_only
    records = [r.record for r in results]
    again = _replay(records)
    assert all(torch.equal(x.rgba, y.rgba) for x, y in zip(results, again, strict=True))
    # without the step the replay starts it at the boundary instead: other frames
    moved = [dict(r) for r in records]
    moved[1] = {**moved[1], "prompt": {k: v for k, v in joined.items() if k != "step"}}
    other = _replay(moved)
    assert torch.equal(other[0].rgba, results[0].rgba)
    assert not torch.equal(other[1].rgba, results[1].rgba)
    pipeline.close()


def test_changes_sent_together_wait_for_the_boundary_together():
    pipeline, registry, driver = _driver()
    new = "a blue sphere"
    pipeline.cache.request(new)
    assert pipeline.cache.wait([new], 120)
    driver.step(registry.begin_block(0))
    _mid_block(pipeline, 1, lambda: registry.set_many([("prompt/1/text", new), ("seed", 77)]))
    r1 = driver.step(registry.begin_block(1))
    assert "prompt" not in r1.record and r1.late_received is None
    r2 = driver.step(registry.begin_block(2))
    assert r2.controls.changed == {"prompt/1/text": new, "seed": 77}
    assert r2.record["prompt"]["prompts"] == [[new, 1.0]] and "step" not in r2.record["prompt"]
    assert not r2.echo_only
    pipeline.close()


def test_a_change_still_encoding_joins_at_a_later_step_or_the_boundary():
    pipeline, registry, driver = _driver()
    new = "a green field at dawn"  # never encoded before: the first look finds no encoding
    driver.step(registry.begin_block(0))
    _mid_block(pipeline, 1, lambda: registry.set("prompt/1/text", new))
    r1 = driver.step(registry.begin_block(1))
    started = [r1] if "prompt" in r1.record else []
    b = 2
    while not started and b < 200:
        r = driver.step(registry.begin_block(b))
        if "prompt" in r.record:
            started.append(r)
        b += 1
    assert started, "the change never started"
    assert started[0].record["prompt"]["prompts"] == [[new, 1.0]]
    pipeline.close()


@pytest.mark.parametrize("step", [True, -1, 8, "1", 1.5, None])
def test_a_recorded_step_that_is_not_a_step_is_named_and_the_prompt_starts_at_the_boundary(step):
    pipeline = build_pipeline(PRESET)
    registry = make_registry(default_prompt=PRESET.prompt, default_steps=PRESET.steps)
    driver = BlockDriver(pipeline, sync_prompts=True)
    driver.step(registry.begin_block(0), prompt=None, replay=True)
    target = {"prompts": [["a dark room", 1.0]], "blocks": 0, "method": "linear", "step": step}
    r = driver.step(registry.begin_block(1), prompt=target, replay=True)
    assert "prompt step" in (driver.last_error or "")
    assert r.record.get("prompt", {}).get("prompts") == [["a dark room", 1.0]]
    assert "step" not in r.record["prompt"]
    pipeline.close()


# -- the latency model ------------------------------------------------------------------------


def test_join_latency_matches_a_simulation_of_arrivals():
    stages = {"text": 0.0, "recompute": 188.0, "step0": 236.0, "step1": 236.0,
              "step2": 236.0, "step3": 236.0, "decode": 20.0}  # fmt: skip
    block = 1160.0
    joins = [188.0, 424.0, 660.0, 896.0]  # the start of each step after the recompute pass

    def latency(a: float) -> float:
        return block - a if any(j >= a for j in joins) else 2 * block - a

    n = 200_001
    sim = sorted(latency(block * k / n) for k in range(n))
    for q in (0.1, 0.5, 0.9):
        assert join_latency_ms(stages, block, q) == pytest.approx(sim[int(q * (n - 1))], abs=0.1)
    assert join_latency_ms(stages, block) <= block + 150  # issue 15's target, at these times
    # no recompute pass (block 0): the first step cannot be joined
    first = {k: v for k, v in stages.items() if k != "recompute"}
    assert join_latency_ms(first, block) == pytest.approx(1.5 * block - 3 * 236.0)
    assert join_latency_ms({}, block) == 1.5 * block  # boundary only
    with pytest.raises(ValueError):
        join_latency_ms(stages, block, 1.5)
