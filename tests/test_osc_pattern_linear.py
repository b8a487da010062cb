"""OSC address patterns are matched in linear time (issue 14, part 1).

One 56-byte datagram (`/dd/` and 32 `*`) used to freeze the engine: the pattern became a
backtracking regex. The matcher now counts its work (`Steps`), so these tests hold it to
O(pattern x address) by counting, compare it with a slow reference (Python's `re` on
small, safe inputs), and send the datagram to a running bridge over real UDP.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import time

import pytest
from osc_helpers import BlockLoop, Listener

from bridges.osc import addresses
from bridges.osc.pattern import (
    MAX_ALTERNATIVES,
    MAX_LEVELS,
    MAX_PATTERN,
    PatternError,
    Steps,
    compile_pattern,
    filter_addresses,
    matches,
)
from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_message
from engine.runtime.controls import make_registry
from engine.runtime.registry import ControlError

REGISTRY_ADDRESSES = [p.address for p in make_registry()]


# -- a slow reference: the spec written as a regex, only for small inputs ----------------
def reference_regex(pattern: str) -> str:
    """OSC 1.0 patterns (+ OSC 1.1 '//') as a Python regex, written independently of the
    matcher, straight from the rules in docs/osc.md. Backtracks: small inputs only."""
    p = pattern.rstrip("/")
    out, i = [], 0
    while i < len(p):
        c = p[i]
        if p.startswith("//", i):
            while i < len(p) and p[i] == "/":
                i += 1
            out.append("/(?:[^/]+/)*")  # any number of whole levels
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = p.index("]", i)
            body = p[i + 1 : j]
            neg = body.startswith("!")
            body = body[1:] if neg else body
            items, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    items.append(re.escape(body[k]) + "-" + re.escape(body[k + 2]))
                    k += 3
                else:
                    items.append(re.escape(body[k]))
                    k += 1
            out.append("[" + ("^/" if neg else "") + "".join(items) + "]")
            i = j
        elif c == "{":
            j = p.index("}", i)
            out.append("(?:" + "|".join(re.escape(a) for a in p[i + 1 : j].split(",")) + ")")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


ALPHABET = "ab1"


def _random_level(rnd: random.Random) -> str:
    parts = []
    for _ in range(rnd.randint(1, 4)):
        k = rnd.randrange(9)
        if k < 3:
            parts.append(rnd.choice(ALPHABET))
        elif k == 3:
            parts.append("?")
        elif k == 4:
            parts.append("*")
        elif k == 5:
            a, b = sorted(rnd.choices(ALPHABET, k=2))
            parts.append(f"[{a}-{b}]")
        elif k == 6:
            parts.append("[!" + "".join(rnd.sample(ALPHABET, rnd.randint(1, 2))) + "]")
        elif k == 7:
            alts = ["".join(rnd.choices(ALPHABET, k=rnd.randint(0, 2))) for _ in range(2)]
            parts.append("{" + ",".join(alts) + "}")
        else:
            parts.append("[-a]")  # a literal minus in a class
    return "".join(parts)


def _random_pattern(rnd: random.Random) -> str:
    levels = [_random_level(rnd) for _ in range(rnd.randint(1, 3))]
    if rnd.random() < 0.3:
        levels.insert(rnd.randrange(len(levels) + 1), "")  # OSC 1.1 '//'
    return "/" + "/".join(levels) + ("/" if rnd.random() < 0.1 else "")


def _random_address(rnd: random.Random, pattern: str) -> str:
    """Mostly as many levels as the pattern has, so matches are not rare."""
    n = pattern.strip("/").count("/") + 1
    n = n if rnd.random() < 0.7 else rnd.randint(1, 4)
    levels = ["".join(rnd.choices(ALPHABET + "-", k=rnd.randint(1, 3))) for _ in range(n)]
    return "/" + "/".join(levels)


def test_agrees_with_the_regex_reference_on_random_small_inputs():
    rnd = random.Random(14)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        pattern = _random_pattern(rnd)
        rx = re.compile(reference_regex(pattern))
        for _ in range(10):
            address = _random_address(rnd, pattern)
            want = rx.fullmatch(address) is not None
            assert matches(pattern, address) == want, (pattern, address, rx.pattern)
            seen[want] += 1
    assert seen[True] > 1000 and seen[False] > 1000, seen  # both outcomes well exercised


def test_cached_results_follow_the_registry():
    """A repeated pattern is answered from the cache, and a parameter declared later is
    matched too (the cache is dropped when the registry grows)."""
    from engine.runtime.registry import Param

    reg = make_registry()
    first = addresses.match("/dd/prompt/*/weight", reg)
    assert addresses.match("/dd/prompt/*/weight", reg) == first and len(first) == 8
    reg.declare(Param("prompt/9/weight", "float", 0.0, "a late slot", range=(0.0, 1.0)))
    assert [p.path for p in addresses.match("/dd/prompt/*/weight", reg)][-1] == "prompt/9/weight"


def test_registry_matches_follow_the_documented_examples():
    reg = make_registry()

    def paths(p):
        return [x.path for x in addresses.match(p, reg)]

    assert paths("/dd/prompt/*/weight") == [f"prompt/{n}/weight" for n in range(1, 9)]
    assert paths("/dd/prompt/{1,3}/weight") == ["prompt/1/weight", "prompt/3/weight"]
    assert paths("/dd/prompt/[!1-7]/text") == ["prompt/8/text"]
    assert paths("/dd/prompt/[2-4]/text") == [f"prompt/{n}/text" for n in (2, 3, 4)]
    assert paths("/dd//grab") == [f"vace/ref/{n}/grab" for n in (1, 2, 3)]  # OSC 1.1 '//'
    assert paths("/dd/see?") == ["seed"]
    assert paths("/dd/" + "*" * 32) == [p.path for p in reg if "/" not in p.path]
    # OSC is case-sensitive: an upper-case pattern matches nothing.
    assert paths("/dd/SEE?") == [] and paths("/DD/*") == []


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("/dd/prompt/[9-1]/weight", "reversed range '9-1'"),
        ("/dd/prompt/[1-3/weight", "unclosed '['"),
        ("/dd/prompt/{1,3/weight", "unclosed '{'"),
        ("/dd/prompt/1]/weight", "unmatched ']'"),
        ("/dd/prompt/}/weight", "unmatched '}'"),
        ("/dd/prompt/[]/weight", "empty '[]'"),
        ("/dd/prompt/[!]/weight", "empty '[]'"),
        ("/dd/prompt/{1,*}/weight", "inside"),
        ("/dd/" + "*" * MAX_PATTERN, f"more than {MAX_PATTERN}"),
        ("/dd" + "/a" * MAX_LEVELS + "/*", f"more than {MAX_LEVELS}"),
        ("/dd/{" + ",".join("abcdefghijklmnopq") + "}", f"more than {MAX_ALTERNATIVES}"),
        ("/dd/" + "{a,b}" * 9, f"more than {MAX_ALTERNATIVES}"),
        ("dd/*", "starts with '/'"),
    ],
)
def test_malformed_or_costly_patterns_get_a_clear_error(pattern, words):
    with pytest.raises(PatternError) as e:
        compile_pattern(pattern)
    assert words in e.value.reason
    with pytest.raises(ControlError) as e2:  # what the bridge answers on /dd/error
        addresses.match(pattern, make_registry())
    assert words in e2.value.reason


# -- the cost bound -----------------------------------------------------------------------
PIECES = ["*", "?", "[a-z]", "[!0-9]", "{a,b}", "{,x}", "e", "/", "//", "**", "*?", "{,}"]


def _pathological(rnd: random.Random, length: int, within_bounds: bool = False) -> str:
    """Every combination of pattern pieces, grown to `length` characters. `within_bounds`
    keeps to the level and alternative limits (so the pattern is matched, not refused):
    one or two levels, at most 8 two-way braces."""
    out, braces, slashes = "/dd/", 0, 0
    while len(out) < length:
        piece = rnd.choice(PIECES)
        if within_bounds:
            if "/" in piece and slashes >= 2 or "{" in piece and braces >= 8:
                continue
            slashes += "/" in piece
            braces += "{" in piece
        out += piece
    out = out[:length]
    if within_bounds and out.count("{") > out.count("}"):
        out = out[: out.rindex("{")]  # no brace cut in half
    return out


def _cost_bound(pattern: str, address_chars: int) -> int:
    """The linear bound the matcher promises: a small constant times pattern x address."""
    return 4 * (len(pattern) + 1) * (address_chars + 1)


def test_work_is_bounded_by_pattern_times_address_for_pathological_patterns():
    """Counting, not timing: each (pattern, address) costs at most c*(P+1)*(A+1) steps, for
    every mix of `*`, `?`, `[...]`, `{...}` and `//` up to the pattern limit."""
    rnd = random.Random(1)
    patterns = ["/dd/" + "*" * n for n in (1, 8, 16, 32, 64, 252)]
    patterns += ["/dd/" + "".join(c) for c in itertools.product(PIECES[:6], repeat=3)]
    patterns += [_pathological(rnd, rnd.randint(5, MAX_PATTERN)) for _ in range(200)]
    patterns += [_pathological(rnd, rnd.randint(5, MAX_PATTERN), True) for _ in range(300)]
    checked = 0
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except PatternError:
            continue  # refused up front: costs nothing more
        for address in REGISTRY_ADDRESSES:
            steps = Steps()
            matches(pattern, address, steps)
            assert steps.n <= _cost_bound(pattern, len(address)), (pattern, address, steps.n)
        steps = Steps()
        filter_addresses(pattern, REGISTRY_ADDRESSES, steps)
        total = sum(len(a) for a in REGISTRY_ADDRESSES)
        assert steps.n <= _cost_bound(pattern, total)
        checked += 1
    assert checked > 300  # most of them were matched, not refused


def test_the_bound_is_really_linear_not_just_a_big_constant():
    """Doubling the stars doubles the work at most (a backtracking matcher squares it and
    worse): measured on an address the stars can almost, but not quite, match."""
    address = "/dd/" + "a" * 40
    costs = []
    for n in (8, 16, 32, 64):
        steps = Steps()
        assert not matches("/dd/" + "*a" * n + "b", address, steps)
        costs.append(steps.n)
    for small, big in itertools.pairwise(costs):
        assert big <= 2.2 * small, costs


def test_a_pattern_of_the_whole_datagram_is_refused_without_scanning_it():
    steps = Steps()
    huge = "/dd/" + "*?[a-z]{a,b}" * 5000  # about 60 KB: a full UDP datagram
    with pytest.raises(PatternError, match="more than"):
        matches(huge, "/dd/seed", steps)
    assert steps.n == 0


def test_cpu_per_pattern_stays_small_against_the_registry():
    """CPU time (thread_time, not wall clock) of matching the whole registry, for the
    worst patterns of the generator. Compared with a plain lookup measured in the same
    test, and with an absolute ceiling far below what the regex took (seconds, or never)."""
    reg = make_registry()
    rnd = random.Random(2)
    patterns = [_pathological(rnd, rnd.randint(5, MAX_PATTERN), True) for _ in range(200)]
    patterns += ["/dd/" + "*" * 32, "/dd/" + "*{,a}" * 8 + "*", "///*//*//*", "/*/*/*//*/*/*"]

    def cpu(pattern: str) -> float:
        compile_pattern.cache_clear()  # the compile is part of the cost,
        addresses._matches.clear()  # and so is the match (no cached result)
        t0 = time.thread_time()
        try:
            addresses.match(pattern, reg)
        except ControlError:
            pass
        return time.thread_time() - t0

    base = min(cpu("/dd/prompt/*/weight") for _ in range(20))
    worst = max(min(cpu(p) for _ in range(3)) for p in patterns)
    assert worst < max(40 * base, 0.005), (worst, base)


# -- over the wire ------------------------------------------------------------------------
def test_the_56_byte_datagram_is_answered_and_the_engine_carries_on():
    """The datagram that froze the engine, sent over real UDP to a running bridge with a
    block loop: it is answered on /dd/error at once, and a valid message right after it
    still lands in a block."""
    reg = make_registry(default_prompt="a forest")
    fb = Listener()
    cfg = OscConfig(port=0, feedback_port=fb.port, oscquery_port=None, zeroconf=False)
    bridge = OscBridge(reg, cfg).start()
    loop = BlockLoop(reg, period=0.01)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        freeze = encode_message("/dd/" + "*" * 40 + "/x", [1.0])
        assert len(freeze) == 56
        blocks_before = len(loop.blocks)
        for _ in range(50):  # and fifty more like it
            client.sendto(freeze, ("127.0.0.1", bridge.port))
        client.sendto(encode_message("/dd/seed", [777]), ("127.0.0.1", bridge.port))
        _, args = fb.wait(lambda a, args: a == "/dd/error", timeout=5)
        assert args[0].startswith("/dd/***") and "matches no parameter" in args[1]
        fb.wait(lambda a, args: a == "/dd/seed" and args == (777,), timeout=5)
        assert reg.applied("seed") == 777
        assert len(fb.on("/dd/error")) == 50 and bridge.stats.rejected == 50
        assert len(loop.blocks) > blocks_before or len(loop.blocks) == 256  # blocks kept coming
        # The bare stars (a valid pattern matching every top-level address) are answered
        # too: some of those parameters cannot take a float.
        client.sendto(encode_message("/dd/" + "*" * 32, [1.0]), ("127.0.0.1", bridge.port))
        fb.wait(lambda a, args: a == "/dd/error" and args[0] == "/dd/" + "*" * 32, timeout=5)
    finally:
        client.close()
        loop.close()
        bridge.close()
        fb.close()


def test_docs_state_the_bounds_the_code_enforces():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "osc.md").read_text()
    flat = " ".join(doc.split())
    assert (
        f"at most {MAX_PATTERN} characters, {MAX_LEVELS} levels and {MAX_ALTERNATIVES} `{{...}}`"
        " alternatives" in flat
    )
    assert "case-sensitive" in flat and "`/dd//weight`" in flat
