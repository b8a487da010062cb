"""Our OSC decoder against python-osc (the oracle) and its limits."""

from __future__ import annotations

import math
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from bridges.osc.wire import (
    IMPULSE,
    MAX_ARGS,
    OscDecodeError,
    decode,
    encode_bundle,
    encode_message,
    ntp_to_time,
    time_to_ntp,
)

addresses = st.from_regex(r"/[a-z0-9_/]{0,30}", fullmatch=True).filter(lambda a: a.startswith("/"))
arg = st.one_of(
    st.tuples(st.just("i"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("h"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("f"), st.floats(width=32, allow_nan=False)),
    st.tuples(st.just("d"), st.floats(allow_nan=False)),
    st.tuples(
        st.just("s"),
        st.text(
            st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40
        ),
    ),
    st.tuples(st.just("b"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("T"), st.just(True)),
    st.tuples(st.just("F"), st.just(False)),
    st.tuples(st.just("N"), st.none()),
)


def _build(address, args):
    b = OscMessageBuilder(address)
    for t, v in args:
        b.add_arg(v, t)
    return b.build()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(addresses, st.lists(arg, max_size=12))
def test_messages_decode_like_python_osc(address, args):
    msg = _build(address, args)
    (ours,) = decode(msg.dgram)
    theirs = OscMessage(msg.dgram)
    assert ours.address == theirs.address and ours.when is None
    assert len(ours.args) == len(theirs.params)
    for a, b in zip(ours.args, theirs.params, strict=True):
        if isinstance(b, float) and math.isnan(b):
            assert math.isnan(a)
        else:
            assert a == b and type(a) is type(b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(addresses, st.lists(arg, max_size=4)), min_size=1, max_size=6))
def test_bundles_decode_like_python_osc(contents):
    when = time.time() + 2.5
    bb = OscBundleBuilder(when)
    for address, args in contents:
        bb.add_content(_build(address, args))
    dgram = bb.build().dgram
    ours = decode(dgram)
    theirs = OscPacket(dgram).messages
    assert [m.address for m in ours] == [t.message.address for t in theirs]
    for m, t in zip(ours, theirs, strict=True):
        assert m.when == pytest.approx(t.time, abs=1e-6)
        assert m.bundle == 0


def test_nested_bundles_and_immediate_timetag():
    now = time.time()
    inner = OscBundleBuilder(now + 5)
    inner.add_content(_build("/b", [("i", 2)]))
    outer = OscBundleBuilder(0)  # 'immediately'
    outer.add_content(_build("/a", [("i", 1)]))
    outer.add_content(inner.build())
    a, b = decode(outer.build().dgram)
    assert (a.address, a.when, a.bundle) == ("/a", None, 0)
    assert b.address == "/b" and b.when == pytest.approx(now + 5, abs=1e-6) and b.bundle == 1


def test_ntp_round_trip():
    t = 1_800_000_000.123456
    assert ntp_to_time(time_to_ntp(t)) == pytest.approx(t, abs=1e-6)
    assert ntp_to_time(1) is None


def test_impulse_arrays_and_encoder():
    assert decode(b"/x\x00\x00,I\x00\x00")[0].args == (IMPULSE,)
    b = OscMessageBuilder("/x")
    b.add_arg([1, [2.5]])
    assert decode(b.build().dgram)[0].args == ([1, [2.5]],)
    (m,) = decode(encode_message("/y", [True, 3, 2**40, 1.5, "s", b"b", None]))
    assert m.args == (True, 3, 2**40, 1.5, "s", b"b", None)
    (m,) = decode(encode_bundle([("/z", [1])]))
    assert m.when is None


@pytest.mark.parametrize(
    "data, word",
    [
        (b"", "empty"),
        (b"abc", "multiple of 4"),
        (b"abcd", "neither"),
        (b"/abc", "NUL"),
        (b"/a\x00\x00xyz\x00", "','"),
        (b"/a\x00\x00,i\x00\x00", "truncated"),
        (b"/a\x00\x00,q\x00\x00", "unknown type tag"),
        (b"/a\x00\x00,]\x00\x00", "unbalanced"),
        (b"/a\x00\x00,[\x00\x00", "unbalanced"),
        (b"/a\x00\x00,s\x00\x00\xff\xfe\x00\x00", "UTF-8"),
        (b"/a\x00\x00,b\x00\x00" + struct.pack(">i", -4), "negative blob"),
        (b"/a\x00\x00,b\x00\x00" + struct.pack(">i", 1 << 30), "truncated"),
        (b"/a\x00\x00,i\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02", "left after"),
        (b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", 3) + b"abcd", "element size"),
        (b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", 64) + b"abcd", "truncated"),
        (b"#bundle\x00" + b"\x00" * 4, "truncated"),
    ],
)
def test_malformed_packets_raise_with_a_reason(data, word):
    with pytest.raises(OscDecodeError) as e:
        decode(data)
    assert word in e.value.reason


def test_limits():
    with pytest.raises(OscDecodeError, match="more than 64 arguments") as e:
        decode(encode_message("/dd/steps", list(range(MAX_ARGS + 1))))
    assert e.value.address == "/dd/steps"
    assert len(decode(encode_message("/dd/steps", list(range(MAX_ARGS))))[0].args) == MAX_ARGS
    # Bundles nested deeper than the limit: refused, not a recursion error.
    dgram = encode_message("/a", [1])
    for _ in range(50):
        dgram = b"#bundle\x00" + struct.pack(">Q", 1) + struct.pack(">i", len(dgram)) + dgram
    with pytest.raises(OscDecodeError, match="nested too deep"):
        decode(dgram)
    with pytest.raises(OscDecodeError, match="arrays nested"):
        decode(b"/a\x00\x00," + b"[" * 20 + b"]" * 20 + b"\x00" * (4 - 41 % 4))
    with pytest.raises(OscDecodeError, match="more than 65536"):
        decode(b"/a\x00\x00" + b"\x00" * 70000)
