"""OSC 1.0/1.1 on the wire: a strict, bounded decoder and a small encoder.

Why our own decoder rather than python-osc's `OscPacket`: a packet from the network can
be anything, and the receiver must answer every bad one with a reason and never die.
python-osc skips unknown type tags with a warning on the *root* logger (which also
configures logging as a side effect), recurses without a depth limit on nested bundles,
and has no argument-count limit. This decoder checks every length against the datagram
before reading, limits arguments and nesting, decodes strings as UTF-8 and raises one
exception type, `OscDecodeError`, carrying the address when it got that far. It is tested
against python-osc's encoder as an oracle. Encoding uses python-osc's builders.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

MAX_DATAGRAM = 65536  # bytes; larger datagrams are refused unread
MAX_ARGS = 64  # per message; TD and every sane host send a handful
MAX_DEPTH = 8  # nested bundles / arrays
NTP_DELTA = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (time.time())
IMMEDIATELY = 1  # the special timetag: apply on arrival


class OscDecodeError(ValueError):
    """A datagram that is not valid OSC. ``address`` is the message address when the
    decoder got that far, else ``"?"``."""

    def __init__(self, reason: str, address: str = "?"):
        super().__init__(f"{address}: {reason}")
        self.reason = reason
        self.address = address


class Impulse:
    """The OSC 1.1 'I' (impulse / infinitum) argument: a bang, as for triggers."""

    def __repr__(self) -> str:
        return "Impulse"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Impulse)

    def __hash__(self) -> int:
        return 0


IMPULSE = Impulse()


@dataclass(frozen=True)
class Message:
    """One decoded message. ``when`` is the time.time() at which its enclosing bundle asks
    it to apply (None: a bare message, or a bundle timetagged 'immediately')."""

    address: str
    args: tuple[Any, ...]
    when: float | None = None
    bundle: int | None = None  # index of the enclosing bundle in the packet, for atomicity


def ntp_to_time(tag: int) -> float | None:
    """A 64-bit NTP timetag as time.time() seconds; None for 'immediately'."""
    if tag == IMMEDIATELY:
        return None
    return (tag >> 32) - NTP_DELTA + (tag & 0xFFFFFFFF) / 2**32


def time_to_ntp(t: float) -> int:
    secs = t + NTP_DELTA
    whole = int(secs)
    return (whole << 32) | int((secs - whole) * 2**32)


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise OscDecodeError(f"truncated {what}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def string(self, what: str) -> str:
        zero = self.data.find(b"\x00", self.pos, self.end)
        if zero < 0:
            raise OscDecodeError(f"{what} is not NUL-terminated")
        raw = self.data[self.pos : zero]
        self.pos = (zero + 4) & ~3  # padded to a multiple of 4 including the NUL
        if self.pos > self.end:
            raise OscDecodeError(f"{what} padding runs past the end")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OscDecodeError(f"{what} is not valid UTF-8") from None

    def blob(self) -> bytes:
        (n,) = struct.unpack(">i", self.take(4, "blob size"))
        if n < 0:
            raise OscDecodeError(f"negative blob size {n}")
        b = self.take(n, "blob")
        self.take(-n % 4, "blob padding")
        return b


def _decode_args(r: _Reader, tags: str, address: str) -> tuple[Any, ...]:
    stack: list[list[Any]] = [[]]
    count = 0
    for t in tags:
        if t == "]":
            if len(stack) < 2:
                raise OscDecodeError("unbalanced ']' in type tags", address)
            stack.pop()
            continue
        count += 1
        if count > MAX_ARGS:
            raise OscDecodeError(f"more than {MAX_ARGS} arguments", address)
        if t == "i":
            v: Any = struct.unpack(">i", r.take(4, "int32"))[0]
        elif t == "f":
            v = struct.unpack(">f", r.take(4, "float32"))[0]
        elif t == "h":
            v = struct.unpack(">q", r.take(8, "int64"))[0]
        elif t == "d":
            v = struct.unpack(">d", r.take(8, "float64"))[0]
        elif t in "sS":
            v = r.string("string argument")
        elif t == "b":
            v = r.blob()
        elif t == "c":
            v = chr(struct.unpack(">I", r.take(4, "char"))[0] & 0x10FFFF)
        elif t in "rm":
            v = r.take(4, "rgba/midi")
        elif t == "t":
            v = ntp_to_time(struct.unpack(">Q", r.take(8, "timetag"))[0])
        elif t == "T":
            v = True
        elif t == "F":
            v = False
        elif t == "N":
            v = None
        elif t == "I":
            v = IMPULSE
        elif t == "[":
            if len(stack) > MAX_DEPTH:
                raise OscDecodeError("arrays nested too deep", address)
            inner: list[Any] = []
            stack[-1].append(inner)
            stack.append(inner)
            continue
        else:
            raise OscDecodeError(f"unknown type tag {t!r}", address)
        stack[-1].append(v)
    if len(stack) != 1:
        raise OscDecodeError("unbalanced '[' in type tags", address)
    return tuple(stack[0])


def _decode_message(r: _Reader) -> tuple[str, tuple[Any, ...]]:
    address = r.string("address")
    if not address.startswith("/"):
        raise OscDecodeError("address does not start with '/'", address[:64] or "?")
    if r.pos >= r.end:
        return address, ()  # no type tag string: no arguments (old OSC 1.0 senders)
    tags = r.string("type tag string")
    if not tags.startswith(","):
        raise OscDecodeError("type tag string does not start with ','", address)
    args = _decode_args(r, tags[1:], address)
    if r.pos != r.end:
        raise OscDecodeError(f"{r.end - r.pos} bytes left after the arguments", address)
    return address, args


_BUNDLE = b"#bundle\x00"


def decode(data: bytes) -> list[Message]:
    """All messages of a datagram, in packet order. Raises OscDecodeError for anything that
    is not a well-formed OSC packet (nothing of a bad packet is returned)."""
    if len(data) > MAX_DATAGRAM:
        raise OscDecodeError(f"datagram of {len(data)} bytes, more than {MAX_DATAGRAM}")
    if not data:
        raise OscDecodeError("empty datagram")
    if len(data) % 4:
        raise OscDecodeError(f"datagram length {len(data)} is not a multiple of 4")
    out: list[Message] = []
    if data.startswith(_BUNDLE):
        _decode_bundle(_Reader(data), out, None, 0, [0])
    elif data[:1] == b"/":
        address, args = _decode_message(_Reader(data))
        out.append(Message(address, args))
    else:
        raise OscDecodeError("neither a message (starts with '/') nor a bundle")
    return out


def _decode_bundle(
    r: _Reader, out: list[Message], outer: float | None, depth: int, counter: list[int]
) -> None:
    if depth >= MAX_DEPTH:
        raise OscDecodeError("bundles nested too deep")
    r.take(8, "bundle header")
    (tag,) = struct.unpack(">Q", r.take(8, "bundle timetag"))
    when = ntp_to_time(tag)
    # A nested bundle may not ask for an earlier time than its parent (OSC 1.0 spec).
    if outer is not None and (when is None or when < outer):
        when = outer
    index = counter[0]
    counter[0] += 1
    while r.pos < r.end:
        (size,) = struct.unpack(">i", r.take(4, "bundle element size"))
        if size <= 0 or size % 4:
            raise OscDecodeError(f"bad bundle element size {size}")
        start = r.pos
        r.take(size, "bundle element")
        sub = _Reader(r.data, start, start + size)
        if r.data.startswith(_BUNDLE, start):
            _decode_bundle(sub, out, when, depth + 1, counter)
        elif r.data[start : start + 1] == b"/":
            address, args = _decode_message(sub)
            if len(out) >= 4 * MAX_ARGS:
                raise OscDecodeError(f"more than {4 * MAX_ARGS} messages in one packet")
            out.append(Message(address, args, when, index))
        else:
            raise OscDecodeError("bundle element is neither a message nor a bundle")


# -- encoding ------------------------------------------------------------------------------
def _add(builder: OscMessageBuilder, v: Any) -> None:
    if isinstance(v, bool):
        builder.add_arg(v, "T" if v else "F")
    elif isinstance(v, int):
        builder.add_arg(v, "i" if -(2**31) <= v < 2**31 else "h")
    elif isinstance(v, float):
        builder.add_arg(v if math.isfinite(v) else 0.0, "f")
    elif isinstance(v, str):
        builder.add_arg(v, "s")
    elif isinstance(v, bytes):
        builder.add_arg(v, "b")
    elif v is None:
        builder.add_arg(None, "N")
    else:
        builder.add_arg(str(v), "s")


def encode_message(address: str, args: list[Any] | tuple[Any, ...] = ()) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        _add(b, a)
    return b.build().dgram


def encode_bundle(messages: list[tuple[str, list[Any]]], when: float | None = None) -> bytes:
    """One bundle of messages; ``when`` (time.time() seconds) or None for immediately."""
    from pythonosc.osc_message import OscMessage

    bb = OscBundleBuilder(0 if when is None else when)
    for address, args in messages:
        bb.add_content(OscMessage(encode_message(address, args)))
    return bb.build().dgram
