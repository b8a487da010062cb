"""The MIDI message layer: from mido messages to registry changes, and back for feedback.

Pure and port-free (tests drive it with mido messages in process). A `Router` holds a
map's compiled `Binding`s and the little state MIDI needs:

- 14-bit CC (MSB n, LSB usually n+32): each byte updates its half and the pair is sent
  at once, whichever byte came. That is right in both byte orders and for gear that only
  sends the LSB while the MSB stays put. Between the two bytes of a pair the value is off
  by at most 127/16383 (0.8 %) for well under a millisecond; the registry keeps only the
  latest value per block, so that transient never reaches a frame.
- NRPN: CC 99/98 select the parameter, 6/38 carry the data MSB/LSB (same pairing as
  above; a new selection clears the data LSB), 96/97 step it, 101/100 (RPN) deselect.
- Relative encoders: two's complement (1..63 up, 127 = -1), offset (64+n / 64-n) and
  sign-bit (65 = -1) encodings.
- Notes and buttons: trigger, toggle, momentary, or set a fixed value.
- Curves (linear, exp, log, s-curve) and ranges, applied to the controller position.
- Takeover ``none | pickup | scale``, against the registry's current value, so a value
  moved by OSC or a timeline is respected: a picked-up control lets go when someone else
  changes its target, and has to cross the new value to take it again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mido

from bridges.tempo.actions import cycle_path
from engine.runtime.registry import ControlError, Param, Registry

log = logging.getLogger(__name__)

KINDS = ("cc", "cc14", "nrpn", "note")
MODES = ("absolute", "relative", "trigger", "toggle", "momentary", "set")
ENCODINGS = ("twos", "offset", "signbit")
CURVES = ("linear", "exp", "log", "scurve")
TAKEOVERS = ("none", "pickup", "scale")
ACTIONS = ("cycle", "preset")
NRPN_CCS = (99, 98, 6, 38, 96, 97, 101, 100)
DEFAULT_CURVE_K = {"exp": 4.0, "log": 4.0, "scurve": 2.0, "linear": 1.0}


# -- curves --------------------------------------------------------------------------
def apply_curve(name: str, x: float, k: float) -> float:
    """Controller position x in [0, 1] -> shaped position in [0, 1] (monotonic, fixed ends).
    exp: slow start, for things that matter near zero; log: its mirror; scurve: fine
    control at both ends."""
    x = min(max(x, 0.0), 1.0)
    if name == "linear":
        return x
    if name == "exp":
        return math.expm1(k * x) / math.expm1(k)
    if name == "log":
        return math.log1p(x * math.expm1(k)) / k
    if name == "scurve":
        a, b = x**k, (1.0 - x) ** k
        return a / (a + b)
    raise ValueError(f"unknown curve {name!r}")


def invert_curve(name: str, y: float, k: float) -> float:
    """The position that gives shaped value y (pickup compares positions, not values)."""
    y = min(max(y, 0.0), 1.0)
    if name == "linear":
        return y
    if name == "exp":
        return math.log1p(y * math.expm1(k)) / k
    if name == "log":
        return math.expm1(k * y) / math.expm1(k)
    if name == "scurve":
        if y <= 0.0 or y >= 1.0:
            return y
        r = (y / (1.0 - y)) ** (1.0 / k)
        return r / (1.0 + r)
    raise ValueError(f"unknown curve {name!r}")


def decode_relative(value: int, encoding: str) -> int:
    """A relative encoder's 7-bit value -> signed step count."""
    if encoding == "twos":
        return value - 128 if value >= 64 else value
    if encoding == "offset":
        return value - 64
    if encoding == "signbit":
        return -(value - 64) if value >= 64 else value
    raise ValueError(f"unknown relative encoding {encoding!r}")


# -- a compiled mapping ----------------------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """One mapping of a map file, validated and resolved against the registry.

    channel is 0-based (mido) or None for any channel. `range` is in target units
    (may be reversed to invert). `feedback` is the registry path whose value is sent
    back to the control, or None.
    """

    kind: str
    number: int
    lsb: int | None = None
    channel: int | None = None
    target: str | None = None
    action: str | None = None
    preset: str | None = None
    mode: str = "absolute"
    encoding: str = "twos"
    range: tuple[float, float] | None = None
    curve: str = "linear"
    curve_k: float = 1.0
    takeover: str = "none"
    step: float | None = None
    value: Any = None
    feedback: str | None = None
    led: tuple[int, int] = (0, 127)
    led_channel: int | None = None
    bits: int = 14
    source: str = ""  # file:line, for messages

    @property
    def resolution(self) -> int:
        if self.kind in ("cc14",) or (self.kind == "nrpn" and self.bits == 14):
            return 16384
        return 128


@dataclass
class _State:
    prev: float | None = None  # last controller position
    engaged: bool = False
    sent: Any = None  # value this binding last wrote
    before: Any = None  # the target's value just before that write
    raw: int = 0  # last raw value (button edges)


@dataclass
class _Nrpn:
    pmsb: int | None = None
    plsb: int | None = None
    dmsb: int = 0
    dlsb: int = 0

    @property
    def number(self) -> int | None:
        if self.pmsb is None or self.plsb is None:
            return None
        return self.pmsb << 7 | self.plsb


@dataclass
class Applied:
    """What one message did (for tests, learn and logs)."""

    binding: Binding
    path: str | None
    value: Any
    warnings: list[str] = field(default_factory=list)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


class Router:
    """Turns messages into registry changes for one map. Thread-safe enough for one
    input thread per port: state is per binding, and the registry locks itself."""

    def __init__(
        self,
        registry: Registry,
        bindings: list[Binding],
        presets: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.registry = registry
        self.bindings = list(bindings)
        self.presets = dict(presets or {})
        self.state = [_State() for _ in self.bindings]
        self._index: dict[tuple[str, int], list[int]] = {}
        self._pairs: dict[tuple[int, int], list[int]] = {}  # (channel, msb cc) -> [msb, lsb]
        self._nrpn: dict[int, _Nrpn] = {}
        self.uses_nrpn = any(b.kind == "nrpn" for b in self.bindings)
        for i, b in enumerate(self.bindings):
            if b.kind == "cc14":
                self._index.setdefault(("cc14", b.number), []).append(i)
                self._index.setdefault(("cc14", b.lsb), []).append(i)
            else:
                self._index.setdefault((b.kind, b.number), []).append(i)

    # -- input --------------------------------------------------------------------------
    def handle(self, msg: mido.Message) -> list[Applied]:
        """Apply one message. Bad targets/values are logged and reported, never raised:
        a controller must not be able to stop the input thread."""
        out: list[Applied] = []
        t = msg.type
        if t == "control_change":
            ch, cc, v = msg.channel, msg.control, msg.value
            if self.uses_nrpn and cc in NRPN_CCS:
                self._nrpn_cc(ch, cc, v, out)
                return out
            for i in self._index.get(("cc14", cc), ()):
                b = self.bindings[i]
                if not self._chan_ok(b, ch):
                    continue
                pair = self._pairs.setdefault((ch, b.number), [0, 0])
                pair[0 if cc == b.number else 1] = v
                self._absolute(i, (pair[0] << 7 | pair[1]) / 16383.0, out)
            for i in self._index.get(("cc", cc), ()):
                b = self.bindings[i]
                if self._chan_ok(b, ch):
                    self._seven_bit(i, v, out)
        elif t in ("note_on", "note_off"):
            vel = msg.velocity if t == "note_on" else 0
            for i in self._index.get(("note", msg.note), ()):
                b = self.bindings[i]
                if self._chan_ok(b, msg.channel):
                    self._button(i, vel, out)
        return out

    @staticmethod
    def _chan_ok(b: Binding, ch: int) -> bool:
        return b.channel is None or b.channel == ch

    def _seven_bit(self, i: int, v: int, out: list[Applied]) -> None:
        b = self.bindings[i]
        if b.mode == "relative":
            self._relative(i, decode_relative(v, b.encoding), out)
        elif b.mode in ("trigger", "toggle", "momentary", "set"):
            self._button(i, v, out)
        else:
            self._absolute(i, v / 127.0, out)

    def _nrpn_cc(self, ch: int, cc: int, v: int, out: list[Applied]) -> None:
        st = self._nrpn.setdefault(ch, _Nrpn())
        if cc == 99:
            st.pmsb, st.dmsb, st.dlsb = v, 0, 0
            return
        if cc == 98:
            st.plsb, st.dmsb, st.dlsb = v, 0, 0
            return
        if cc in (101, 100):  # an RPN is selected: data entry is no longer ours
            st.pmsb = st.plsb = None
            return
        num = st.number
        if num is None:
            return
        for i in self._index.get(("nrpn", num), ()):
            b = self.bindings[i]
            if not self._chan_ok(b, ch):
                continue
            if cc in (96, 97):
                if b.mode == "relative":
                    self._relative(i, 1 if cc == 96 else -1, out)
                continue
            if cc == 6:
                st.dmsb = v
            elif cc == 38:
                st.dlsb = v
                if b.bits == 7:
                    continue
            if b.mode == "relative":
                if cc == 6:
                    self._relative(i, decode_relative(v, b.encoding), out)
            elif b.mode in ("trigger", "toggle", "momentary", "set"):
                if cc == 6:
                    self._button(i, st.dmsb, out)
            elif b.bits == 7:
                self._absolute(i, st.dmsb / 127.0, out)
            else:
                self._absolute(i, (st.dmsb << 7 | st.dlsb) / 16383.0, out)

    # -- value helpers -------------------------------------------------------------------
    def _param(self, b: Binding) -> Param:
        return self.registry.param(b.target)

    def _bounds(self, b: Binding, p: Param) -> tuple[float, float]:
        if b.range is not None:
            return b.range
        if p.range is not None:
            return p.range
        return (0.0, 1.0)

    def _from_position(self, b: Binding, p: Param, pos: float) -> Any:
        """Controller position [0, 1] -> target value (curve, range, type)."""
        y = apply_curve(b.curve, pos, b.curve_k)
        if p.choices is not None:
            return p.choices[min(int(y * len(p.choices)), len(p.choices) - 1)]
        if p.type == "bool":
            return y >= 0.5
        lo, hi = self._bounds(b, p)
        v = lo + y * (hi - lo)
        return int(round(v)) if p.type == "int" else v

    def position_of(self, b: Binding, value: Any) -> float:
        """Target value -> controller position [0, 1] (pickup, scale and feedback)."""
        p = self._param(b)
        if p.choices is not None:
            n = len(p.choices)
            y = (p.choices.index(value) + 0.5) / n if value in p.choices else 0.0
        elif p.type == "bool" or isinstance(value, bool):
            y = 1.0 if value else 0.0
        else:
            lo, hi = self._bounds(b, p)
            y = 0.0 if hi == lo else (float(value) - lo) / (hi - lo)
        return invert_curve(b.curve, y, b.curve_k)

    def _write(self, i: int, path: str, value: Any, out: list[Applied]) -> None:
        b, st = self.bindings[i], self.state[i]
        reg = self.registry
        p = reg.param(path)
        try:
            before = reg.get(path) if p.stateful else None
            # immediate params (tempo, quantize, pause) must not wait for a beat
            res = reg.set(path, value, quantized=p.applies != "immediate")
        except ControlError as e:
            log.warning("%s: %s", b.source, e)
            out.append(Applied(b, path, None, [str(e)]))
            return
        if p.stateful:
            st.before, st.sent = before, res.values.get(path, value)
        for w in res.warnings:
            log.info("%s: %s", b.source, w)
        out.append(Applied(b, path, res.values.get(path, value), res.warnings))

    # -- behaviours ----------------------------------------------------------------------
    def _absolute(self, i: int, pos: float, out: list[Applied]) -> None:
        b, st = self.bindings[i], self.state[i]
        p = self._param(b)
        if b.takeover == "none":
            st.prev = pos
            self._write(i, b.target, self._from_position(b, p, pos), out)
            return
        cur = self.registry.get(b.target)
        if st.sent is not None and not (_same(cur, st.sent) or _same(cur, st.before)):
            st.engaged = False  # OSC, a timeline or another control moved it: let go
            st.sent = st.before = None
        tol = 1.01 / (b.resolution - 1)
        if not st.engaged:
            c = self.position_of(b, cur)
            crossed = st.prev is not None and (st.prev - c) * (pos - c) <= 0
            if abs(pos - c) <= tol or crossed:
                st.engaged = True
            elif b.takeover == "scale" and st.prev is not None and pos != st.prev:
                # move the value toward the end the control heads for, so both get
                # there together; from then on the control leads
                if pos > st.prev:
                    new = c + (pos - st.prev) * (1.0 - c) / (1.0 - st.prev)
                else:
                    new = c - (st.prev - pos) * c / st.prev
                st.prev = pos
                if abs(new - pos) <= tol:
                    st.engaged = True
                    new = pos
                self._write(i, b.target, self._from_position(b, p, new), out)
                return
        st.prev = pos
        if st.engaged:
            self._write(i, b.target, self._from_position(b, p, pos), out)

    def _relative(self, i: int, delta: int, out: list[Applied]) -> None:
        b = self.bindings[i]
        if delta == 0:
            return
        p = self._param(b)
        cur = self.registry.get(b.target)
        if p.choices is not None:
            k = p.choices.index(cur) if cur in p.choices else 0
            new: Any = p.choices[min(max(k + (1 if delta > 0 else -1), 0), len(p.choices) - 1)]
        elif p.type == "bool":
            new = delta > 0
        else:
            lo, hi = self._bounds(b, p)
            lo, hi = min(lo, hi), max(lo, hi)
            step = b.step if b.step is not None else (1 if p.type == "int" else (hi - lo) / 128)
            new = min(max(cur + delta * step, lo), hi)
            new = int(round(new)) if p.type == "int" else float(new)
        self._write(i, b.target, new, out)

    def _button(self, i: int, v: int, out: list[Applied]) -> None:
        """Notes and button CCs: press = value rising to >= 64 (velocity > 0 for notes)."""
        b, st = self.bindings[i], self.state[i]
        pressed = v >= 64 if b.kind != "note" else v > 0
        was = st.raw >= 64 if b.kind != "note" else st.raw > 0
        st.raw = v
        if b.mode == "momentary":
            if pressed != was:
                self._write(i, b.target, self._on_off(b, pressed), out)
            return
        if not pressed or was:
            return  # only the press edge does something
        if b.action == "cycle":
            path = cycle_path(self.registry, int(b.step or 1))
            if path is not None:
                self._write(i, path, 1, out)
        elif b.action == "preset":
            self._recall(b, out)
        elif b.mode == "trigger":
            self._write(i, b.target, 1, out)
        elif b.mode == "set":
            self._write(i, b.target, b.value, out)
        elif b.mode == "toggle":
            cur = self.registry.get(b.target)
            p = self._param(b)
            if p.type == "bool":
                new: Any = not cur
            else:
                lo, hi = self._bounds(b, p)
                new = lo if _same(cur, hi) else hi
            self._write(i, b.target, new, out)

    def _on_off(self, b: Binding, on: bool) -> Any:
        p = self._param(b)
        if p.type == "bool":
            return on
        lo, hi = self._bounds(b, p)
        return hi if on else lo

    def _recall(self, b: Binding, out: list[Applied]) -> None:
        values = self.presets[b.preset]
        try:
            res = self.registry.set_many(list(values.items()), quantized=True)
        except ControlError as e:
            log.warning("%s: preset %s: %s", b.source, b.preset, e)
            out.append(Applied(b, None, None, [str(e)]))
            return
        out.append(Applied(b, f"preset:{b.preset}", dict(res.values), res.warnings))

    # -- feedback ------------------------------------------------------------------------
    def feedback_messages(self, i: int, value: Any) -> list[mido.Message]:
        """The messages that show `value` (of binding i's feedback path) on the control."""
        b = self.bindings[i]
        ch = b.led_channel if b.led_channel is not None else (b.channel or 0)
        if b.target is not None and b.feedback == b.target and b.mode == "absolute":
            if _same(value, self.state[i].sent):
                return []  # our own move: echoing it makes motor faders fight the hand
        if b.mode in ("trigger", "toggle", "momentary", "set") or b.action is not None:
            on = self._lit(b, value)
            vel = b.led[1] if on else b.led[0]
            if b.kind == "note":
                return [mido.Message("note_on", channel=ch, note=b.number, velocity=vel)]
            if b.kind == "cc":
                return [mido.Message("control_change", channel=ch, control=b.number, value=vel)]
            return []
        if b.target is None or b.feedback != b.target:
            pos = 1.0 if self._lit(b, value) else 0.0
        else:
            pos = min(max(self.position_of(b, value), 0.0), 1.0)
        if b.kind == "cc":
            return [
                mido.Message("control_change", channel=ch, control=b.number, value=round(pos * 127))
            ]
        if b.kind == "note":
            return [mido.Message("note_on", channel=ch, note=b.number, velocity=round(pos * 127))]
        v14 = round(pos * 16383)
        msb, lsb = v14 >> 7, v14 & 0x7F
        cc = lambda n, v: mido.Message("control_change", channel=ch, control=n, value=v)  # noqa: E731
        if b.kind == "cc14":
            return [cc(b.number, msb), cc(b.lsb, lsb)]
        n = b.number
        if b.bits == 7:
            return [cc(99, n >> 7), cc(98, n & 0x7F), cc(6, round(pos * 127))]
        return [cc(99, n >> 7), cc(98, n & 0x7F), cc(6, msb), cc(38, lsb)]

    def _lit(self, b: Binding, value: Any) -> bool:
        if b.mode == "set" and b.feedback == b.target:
            return _same(value, b.value)
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            if b.target is not None and b.feedback == b.target and b.mode != "trigger":
                return self.position_of(b, value) >= 0.5
            return value >= 0.5
        return bool(value)

    def feedback_paths(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, b in enumerate(self.bindings):
            if b.feedback is not None:
                out.setdefault(b.feedback, []).append(i)
        return out


Handler = Callable[[mido.Message], list[Applied]]
