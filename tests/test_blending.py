"""Blending and transitions: properties against references written here, and a mixer that
never stalls the block loop under a slow encoder."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.text_encoder import TinyTextEncoder
from engine.stream.blending import (
    PromptMixer,
    blend,
    blend_linear,
    interpolate,
    normalize_weights,
    slerp,
)
from engine.stream.embedding_cache import EmbeddingCache


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8))
def test_normalize_weights(ws):
    w = normalize_weights(ws)
    assert len(w) == len(ws) and abs(sum(w) - 1) < 1e-9 and min(w) >= 0
    if all(x <= 0 for x in ws):
        assert w == [1 / len(ws)] * len(ws)
    else:
        pos = [max(0.0, x) for x in ws]
        assert all(abs(a - p / sum(pos)) < 1e-9 for a, p in zip(w, pos, strict=True))


def test_blend_linear_matches_reference_and_keeps_norms():
    torch.manual_seed(0)
    e = torch.randn(3, 10, 16)
    e[:, 7:] = 0  # past every prompt's tokens
    e[0, 5:7] = 0  # past the first prompt's only
    w = normalize_weights([2, 1, 1])
    out = blend_linear(e, w)
    for t in range(10):  # reference: per token, loop over prompts
        mix = sum(w[k] * e[k, t] for k in range(3))
        target = sum(w[k] * e[k, t].norm() for k in range(3))
        ref = mix * (target / mix.norm()) if mix.norm() > 1e-6 else mix
        torch.testing.assert_close(out[t], ref, rtol=1e-5, atol=1e-6)
    assert out[7:].abs().max() == 0
    assert torch.equal(blend_linear(e[:1], [1.0]), e[0])


def test_slerp_endpoints_and_geometry():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(x, y, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[2**-0.5, 2**-0.5]]))
    torch.testing.assert_close(slerp(x, y, 1 / 3), torch.tensor([[3**0.5 / 2, 0.5]]))
    z = torch.zeros(1, 2)  # undefined angle: plain lerp
    torch.testing.assert_close(slerp(x, z, 0.25), torch.tensor([[0.75, 0.0]]))
    # blend "slerp" of exactly two follows the normalised weight of the second
    torch.testing.assert_close(blend(torch.stack([a, b]), [3, 1], "slerp"), slerp(a, b, 0.25))


class SlowEncoder:
    def __init__(self, delay: float):
        self.inner = TinyTextEncoder(length=16, dim=32)
        self.delay = delay

    def encode(self, texts):
        time.sleep(self.delay)
        return self.inner.encode(texts)


@pytest.fixture
def enc():
    return TinyTextEncoder(length=16, dim=32)


def test_prompt_change_under_slow_encoder_never_stalls(enc):
    slow = SlowEncoder(0.4)
    with EmbeddingCache(slow, capacity=8) as cache:
        mixer = PromptMixer(cache)
        mixer.set_target([("a neon forest", 1.0)])
        t0 = time.perf_counter()
        first, key0 = mixer.next_block()  # the documented one-time wait
        assert time.perf_counter() - t0 >= 0.3
        torch.testing.assert_close(first[0], enc.encode(["a neon forest"])[0])

        mixer.set_target([("liquid chrome", 1.0)], transition_blocks=0)
        calls, switched_at = [], None
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline:
            done_before = cache.ready(["liquid chrome"])
            t = time.perf_counter()
            emb, key = mixer.next_block()
            calls.append(time.perf_counter() - t)
            if key != key0:
                switched_at = len(calls)
                # a block takes the new prompt only if encoding had finished before it began
                assert done_before or cache.ready(["liquid chrome"])
                torch.testing.assert_close(emb[0], enc.encode(["liquid chrome"])[0])
                break
            assert torch.equal(emb, first)
            time.sleep(0.01)
        assert switched_at is not None and switched_at > 5  # many blocks ran meanwhile
        assert max(calls) < 0.05
        assert mixer.next_block()[1] == key  # nothing moves: same key


def test_transition_reaches_target_exactly_at_block_n(enc):
    with EmbeddingCache(enc, capacity=8) as cache:
        mixer = PromptMixer(cache)
        mixer.set_target([("a neon forest", 1.0)])
        a, k0 = mixer.next_block()
        cache.wait(["liquid chrome", "glass birds"], timeout=10)
        mixer.set_target([("liquid chrome", 1.0), ("glass birds", 1.0)], transition_blocks=4)
        target = blend(torch.stack([cache.get("liquid chrome"), cache.get("glass birds")]), [1, 1])
        keys, outs = [k0], []
        for k in range(1, 5):
            emb, key = mixer.next_block()
            outs.append(emb[0])
            assert key not in keys
            keys.append(key)
            if k < 4:
                torch.testing.assert_close(emb[0], interpolate(a[0], target, k / 4))
                assert not torch.equal(emb[0], target)
        assert torch.equal(outs[-1], target)
        assert not mixer.in_transition
        assert mixer.next_block()[1] == keys[-1]
        assert (
            mixer.set_target([("glass birds", 5), ("liquid chrome", 5)], 4) is True
        )  # order differs
        assert mixer.set_target([("glass birds", 5), ("liquid chrome", 5)], 4) is False


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_retarget_mid_transition_is_continuous(enc, method):
    with EmbeddingCache(enc, capacity=8) as cache:
        cache.wait(["red", "green", "blue"], timeout=10)
        mixer = PromptMixer(cache)
        mixer.set_target([("red", 1.0)])
        prev = mixer.next_block()[0][0]
        mixer.set_target([("green", 1.0)], transition_blocks=8, method=method)
        steps = []
        for _ in range(4):
            cur = mixer.next_block()[0][0]
            steps.append((cur - prev).norm().item())
            prev = cur
        mixer.set_target([("blue", 1.0)], transition_blocks=8, method=method)
        cur = mixer.next_block()[0][0]
        torch.testing.assert_close(cur, interpolate(prev, cache.get("blue"), 1 / 8, method))
        jump = (cur - prev).norm().item()
        full = (cache.get("blue") - prev).norm().item()
        assert jump < 0.2 * full  # one eighth of the way (plus the norm rescale), not a cut
        assert jump < 3 * max(steps)


def test_bad_input_changes_nothing(enc):
    with EmbeddingCache(enc, capacity=8) as cache:
        mixer = PromptMixer(cache)
        mixer.set_target([("a", 1.0)])
        emb, key = mixer.next_block()
        for bad in (
            [],
            [("x", 1.0)] * 9,
            [("x", float("nan"))],
            [(3, 1.0)],
            "a prompt",
            [("x",)],
        ):
            with pytest.raises(ValueError):
                mixer.set_target(bad)
        with pytest.raises(ValueError, match="transition_blocks"):
            mixer.set_target([("x", 1.0)], transition_blocks=-1)
        with pytest.raises(ValueError, match="method"):
            mixer.set_target([("x", 1.0)], method="cubic")
        assert not mixer.waiting
        e2, k2 = mixer.next_block()
        assert k2 == key and torch.equal(e2, emb)
    with EmbeddingCache(enc, capacity=8) as cache, pytest.raises(RuntimeError, match="set_target"):
        PromptMixer(cache).next_block()
