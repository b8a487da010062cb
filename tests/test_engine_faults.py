"""A block that fails must not end the show: the engine reports it, restarts the stream and
goes on; only failures in a row stop it. The fault is injected by wrapping the real block
driver (a CUDA out-of-memory spike cannot be produced on a CPU)."""

from __future__ import annotations

import time

from engine.runtime.engine import MAX_BLOCK_FAILURES, tiny_engine


def _inject(eng, fail_calls: set[int]):
    real = eng.driver.step
    calls = [0]

    def step(controls, **kw):
        calls[0] += 1
        if calls[0] in fail_calls:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(controls, **kw)

    eng.driver.step = step
    return calls


def test_one_failed_block_is_reported_and_the_stream_goes_on():
    eng = tiny_engine(status_interval=None)
    _inject(eng, {3})
    eng.start()
    try:
        eng.wait_frames(9 + 12 * 6, timeout=60)
        assert eng.error is None and eng.state in ("running", "stopped")
        assert "block failed: RuntimeError: CUDA out of memory" in eng.status()["last_error"]
    finally:
        eng.stop()


def test_failures_in_a_row_stop_the_engine_with_the_error():
    eng = tiny_engine(status_interval=None)
    _inject(eng, set(range(2, 2 + MAX_BLOCK_FAILURES)))
    eng.start()
    deadline = time.monotonic() + 60
    while eng.state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert eng.state == "stopped" and isinstance(eng.error, RuntimeError)
    finally:
        eng.stop()
