"""Embedding cache: hits, misses, LRU bound, a bounded queue, errors kept per text, and
encoding off the caller's thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.models.text_encoder import TinyTextEncoder
from engine.stream.embedding_cache import EmbeddingCache


class RecordingEncoder:
    """TinyTextEncoder plus a log of what was encoded, an optional delay and a poison text."""

    def __init__(self, delay: float = 0.0, poison: str | None = None):
        self.inner = TinyTextEncoder(length=16, dim=32)
        self.delay = delay
        self.poison = poison
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, texts):
        self.gate.wait(10)
        self.calls.append(list(texts))
        if self.delay:
            time.sleep(self.delay)
        if self.poison in texts:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.encode(texts)


def test_hits_misses_and_values():
    enc = RecordingEncoder()
    with EmbeddingCache(enc, capacity=8) as cache:
        assert cache.get("a neon forest") is None and cache.misses == 1
        assert cache.request("a neon forest") is False
        assert cache.wait(["a neon forest"], timeout=10)
        e = cache.get("a neon forest")
        assert cache.hits == 1 and e.shape == (16, 32)
        torch.testing.assert_close(e, enc.inner.encode(["a neon forest"])[0])
        assert cache.request("a  neon forest ") is True  # same prompt up to white space
        assert cache.get(" a neon   forest") is e
        assert sum(len(c) for c in enc.calls) == 1  # encoded once


def test_lru_eviction_keeps_recently_used():
    enc = RecordingEncoder()
    with EmbeddingCache(enc, capacity=8) as cache:
        for i in range(8):  # one by one: insertion order is known
            assert cache.wait([f"prompt {i}"], timeout=10)
        assert cache.get("prompt 0") is not None  # touch: now most recent
        assert cache.wait(["prompt 8"], timeout=10)
        assert len(cache) == 8
        assert "prompt 0" in cache and "prompt 1" not in cache and "prompt 8" in cache


def test_queue_is_bounded_latest_wins():
    enc = RecordingEncoder()
    enc.gate.clear()  # hold the worker
    with EmbeddingCache(enc, capacity=8, max_batch=4) as cache:
        cache.request("first")
        time.sleep(0.1)  # the worker has taken "first" and waits at the gate
        for i in range(50):
            cache.request(f"flood {i}")
        queued = [i for i in range(50) if cache.is_queued(f"flood {i}")]
        assert queued == list(range(42, 50))  # only the newest `capacity` are kept
        enc.gate.set()
        assert cache.wait(["flood 49"], timeout=10)
        encoded = [t for c in enc.calls for t in c]
        assert "flood 0" not in encoded and "first" in encoded


def test_request_returns_immediately_under_slow_encoder():
    enc = RecordingEncoder(delay=0.5)
    with EmbeddingCache(enc, capacity=8) as cache:
        t0 = time.perf_counter()
        cache.request("slow prompt")
        assert time.perf_counter() - t0 < 0.05
        assert not cache.ready(["slow prompt"])
        assert cache.wait(["slow prompt"], timeout=10)
        assert cache.ready(["slow prompt"])


def test_errors_are_kept_and_the_worker_survives():
    seen = []
    enc = RecordingEncoder(poison="boom")
    with EmbeddingCache(enc, capacity=8, on_error=lambda t, e: seen.append(t)) as cache:
        assert cache.wait(["boom"], timeout=10) is False
        assert "out of memory" in cache.error("boom")
        assert seen == ["boom"]
        assert cache.wait(["fine"], timeout=10)  # still working
        with pytest.raises(TypeError):
            cache.request(42)
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(enc, capacity=2)
