"""The control registry: coalescing, atomic apply per block, coercion, bad input."""

import threading

import pytest

from engine.runtime.controls import PROMPT_SLOTS, make_registry
from engine.runtime.registry import ControlError, Param, Registry


@pytest.fixture
def reg():
    return make_registry(default_prompt="a panda in a park")


def test_defaults_and_snapshot(reg):
    snap = reg.snapshot()
    assert snap["prompt/1/text"] == "a panda in a park"
    assert snap["prompt/1/weight"] == 1.0 and snap["prompt/2/weight"] == 0.0
    assert snap["steps"] == [1000, 750, 500, 250]
    assert "reset" not in snap and "prompt" not in snap  # triggers and actions hold no state


def test_changes_coalesce_and_apply_at_block_boundary(reg):
    for i in range(1000):
        reg.set("seed", i)
    assert reg.applied("seed") == 42  # nothing applied before the boundary
    assert reg.get("seed") == 999  # but the latest value is visible to controllers
    assert reg.pending_count() == 1  # a flood leaves one staged value, not a queue
    c = reg.begin_block(0)
    assert c["seed"] == 999 and c.changed == {"seed": 999}
    c2 = reg.begin_block(1)
    assert c2.changed == {} and c2["seed"] == 999


def test_set_many_is_atomic_all_or_nothing(reg):
    with pytest.raises(ControlError) as e:
        reg.set_many({"seed": 7, "kv_bias": "lots"})
    assert e.value.path == "kv_bias" and "number" in e.value.reason
    assert reg.get("seed") == 42 and reg.pending_count() == 0
    reg.set_many({"seed": 7, "kv_bias": 0.5})
    c = reg.begin_block(0)
    assert c.changed == {"seed": 7, "kv_bias": 0.5}


def test_unknown_path_and_bad_values_change_nothing(reg):
    before = reg.snapshot()
    for path, value in [
        ("nope", 1),
        ("prompt/9/text", "x"),
        ("seed", "abc"),
        ("seed", float("nan")),
        ("steps", [1000, 1000]),
        ("steps", [0]),
        ("steps", "[1000, 750.5]"),
        ("transition/method", "wobble"),
        ("prompt/1/text", 3),
        ("prompt/1/text", "x" * 5000),
        ("prompts", "not json"),
        ("prompts", "[]"),
        ("steps/preset", "ultra"),
    ]:
        with pytest.raises(ControlError) as e:
            reg.set(path, value)
        assert e.value.reason
    assert reg.begin_block(0).changed == {}
    assert reg.snapshot() == before


def test_coercion_like_touchdesigner_sends(reg):
    r = reg.set("seed", 12.6)  # float for an int: rounded
    assert r.values == {"seed": 13} and not r.warnings
    r = reg.set("prompt/2/weight", 1.7)  # clamped with a warning, not dropped
    assert r.values == {"prompt/2/weight": 1.0}
    assert "clamped" in r.warnings[0] and "prompt/2/weight" in r.warnings[0]
    r = reg.set("steps", "1000, 500")
    assert r.values == {"steps": [1000, 500]}
    r = reg.set("pause", 1.0)
    assert reg.get("pause") is True  # immediate: no block boundary needed
    r = reg.set("transition/method", "LINEAR")
    assert r.values == {"transition/method": "linear"}


def test_triggers_fire_on_nonzero_only(reg):
    reg.set("reset", 0)
    assert reg.begin_block(0).events == ()
    reg.set("reset", 0.5)
    assert reg.begin_block(1).events == ("reset",)
    assert reg.begin_block(2).events == ()


def test_actions_expand_into_one_block(reg):
    reg.set("prompt/2/weight", 0.5)
    reg.begin_block(0)
    reg.set("/dd/prompt", "a fox in snow")
    c = reg.begin_block(1)
    assert c["prompt/1/text"] == "a fox in snow"
    assert [c[f"prompt/{n}/weight"] for n in range(1, PROMPT_SLOTS + 1)] == [1.0] + [0.0] * 7
    reg.set("prompt/3/solo", 1)
    c = reg.begin_block(2)
    assert c["prompt/3/weight"] == 1.0 and c["prompt/1/weight"] == 0.0
    reg.set("prompts", '[["a forest", 1.0], {"text": "fog", "weight": 0.25}]')
    c = reg.begin_block(3)
    assert (c["prompt/1/text"], c["prompt/2/text"], c["prompt/2/weight"]) == (
        "a forest",
        "fog",
        0.25,
    )
    assert c["prompt/3/text"] == "" and c["prompt/3/weight"] == 0.0
    reg.set("steps/preset", "fast")
    assert reg.begin_block(4)["steps"] == [1000, 750]
    reg.set("seed/random", 1)
    assert reg.begin_block(5).changed.keys() <= {"seed"}


def test_scheduled_changes_land_at_the_first_block_due():
    t = [100.0]
    reg = make_registry()
    reg.clock = lambda: t[0]
    reg.lookahead = 0.25
    reg.set("seed", 5, when=102.0)
    reg.set("kv_bias", 0.9)  # unscheduled: next block
    assert reg.begin_block(0).changed == {"kv_bias": 0.9}
    t[0] = 101.7
    assert reg.begin_block(1).changed == {}  # 101.7 < 102 - 0.25
    t[0] = 101.8
    assert reg.begin_block(2).changed == {"seed": 5}


def test_listeners_see_every_applied_change_and_cannot_break_it(reg):
    seen = []
    reg.subscribe(lambda c: seen.append((c.path, c.value, c.block)))
    reg.subscribe(lambda c: 1 / 0)  # a broken listener is logged, not raised
    reg.set_many({"seed": 3, "kv_bias": 0.4})
    reg.begin_block(7)
    reg.set("pause", True)
    assert ("seed", 3, 7) in seen and ("kv_bias", 0.4, 7) in seen and ("pause", True, None) in seen


def test_threads_setting_concurrently_never_lose_the_last_value(reg):
    def worker(k):
        for i in range(500):
            reg.set(f"prompt/{k}/weight", i / 499)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    c = reg.begin_block(0)
    assert all(c[f"prompt/{k}/weight"] == 1.0 for k in range(1, 5))


def test_declaring_twice_or_badly_is_refused():
    reg = Registry([Param("a", "int", 0)])
    with pytest.raises(ValueError):
        reg.declare(Param("a", "int", 0))
    with pytest.raises(ValueError):
        Param("B/x", "int")
    with pytest.raises(ValueError):
        Param("x", "complex")


def test_describe_lists_every_parameter(reg):
    rows = {r["path"]: r for r in reg.describe()}
    assert len(rows) == len(reg)
    assert rows["kv_bias"]["range"] == [0.01, 1.0] and rows["kv_bias"]["address"] == "/dd/kv_bias"
    assert all(r["description"] for r in rows.values())


def test_quantized_changes_ask_the_installed_quantizer():
    t = [10.0]
    reg = make_registry()
    reg.clock = lambda: t[0]
    reg.set("seed", 1, quantized=True)  # no quantizer installed: next block
    assert reg.begin_block(0).changed == {"seed": 1}
    reg.quantizer = lambda: 12.0  # e.g. the next bar
    reg.set("seed", 2, quantized=True)
    reg.set("kv_bias", 0.5)  # not quantized
    assert reg.begin_block(1).changed == {"kv_bias": 0.5}
    t[0] = 12.0
    assert reg.begin_block(2).changed == {"seed": 2}


def test_immediate_triggers_reach_listeners_at_once():
    reg = Registry([Param("tap", "trigger", applies="immediate", description="tap")])
    seen = []
    reg.subscribe(lambda c: seen.append(c))
    reg.set("tap", 1)
    assert seen and seen[0].path == "tap" and seen[0].block is None
    assert reg.begin_block(0).events == ()


def test_immediate_triggers_fire_at_once_even_when_quantized():
    reg = Registry(
        [Param("tap", "trigger", applies="immediate", description="tap"), Param("x", "int", 0)]
    )
    reg.quantizer = lambda: reg.clock() + 100.0  # the next bar is far away
    seen = []
    reg.subscribe(lambda c: seen.append(c.path))
    reg.set_many({"tap": 1, "x": 3}, quantized=True)
    assert seen == ["tap"]  # the tap is not held for the bar; x is
    assert reg.begin_block(0).changed == {}


class _Holder:
    """A control thread that takes the registry's lock and keeps it (a stuck listener)."""

    def __init__(self, reg):
        self.reg, self.taken, self.let_go = reg, threading.Event(), threading.Event()
        self.t = threading.Thread(target=self._hold, daemon=True)
        self.t.start()
        assert self.taken.wait(10)

    def _hold(self):
        with self.reg._lock:
            self.taken.set()
            self.let_go.wait(60)

    def release(self):
        self.let_go.set()
        self.t.join(10)


@pytest.mark.timeout(60)
def test_a_held_lock_never_stops_the_block_boundary(reg, caplog):
    """A control thread holding the registry for good: every block still begins, with the
    last block's controls, nothing changed and nothing staged taken; the engine reads
    what is applied and asks for late prompts without waiting; once the lock is free the
    staged changes land, in order, at the next block. One error in the log, not one per
    block."""
    heard = []
    reg.subscribe(lambda c: heard.append((c.path, c.value, c.block)))
    reg.set("seed", 7)
    c0 = reg.begin_block(0)
    assert c0["seed"] == 7
    reg.set("seed", 8)
    reg.set("prompt/1/text", "a red fox")  # staged before the hold
    holder = _Holder(reg)
    try:
        with caplog.at_level("ERROR", logger="engine.runtime.registry"):
            held = [reg.begin_block(b, wait=0.01) for b in range(1, 6)]
        assert holder.t.is_alive()  # still holding: these did not wait for it
        for b, c in enumerate(held, start=1):
            assert c.block == b and c.changed == {} and c.events == ()
            assert c.values == c0.values
        assert reg.held_blocks == 5
        assert len([r for r in caplog.records if "held" in r.getMessage()]) == 1
        assert reg.applied("seed") == 7  # no lock needed
        assert reg.pending_within(frozenset({"prompt/1/text"})) is None  # gave up
        assert reg.last_block.block == 5
    finally:
        holder.release()
    c6 = reg.begin_block(6)
    assert c6.changed == {"seed": 8, "prompt/1/text": "a red fox"}
    assert heard[-2:] == [("seed", 8, 6), ("prompt/1/text", "a red fox", 6)]
    assert reg.held_blocks == 5


def test_the_first_block_held_uses_the_applied_values(reg):
    """No block before to hold: the applied values (the defaults), read without the lock."""
    holder = _Holder(reg)
    try:
        c = reg.begin_block(0, wait=0.01)
    finally:
        holder.release()
    assert c.values == reg.snapshot() and c.changed == {} and reg.held_blocks == 1


def test_listeners_subscribed_and_gone_while_changes_are_delivered(reg):
    """The listener list is replaced whole (read without the lock): a listener that
    subscribes another, or unsubscribes itself, mid-delivery changes the next delivery,
    not this one."""
    seen = []
    unsub = []

    def late(c):
        seen.append(("late", c.path))

    def first(c):
        seen.append(("first", c.path))
        if len(unsub) == 1:
            unsub.append(reg.subscribe(late))
            unsub[0]()

    unsub.append(reg.subscribe(first))
    reg.set("seed", 1)
    reg.begin_block(0)
    assert seen == [("first", "seed")]
    reg.set("seed", 2)
    reg.begin_block(1)
    assert seen == [("first", "seed"), ("late", "seed")]
