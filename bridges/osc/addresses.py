"""The OSC address space, derived from the control registry.

Every registry parameter is ``/dd/<path>``; nothing here lists parameters by hand. The
bridge adds a few addresses of its own (queries, errors, status), declared once in
`BRIDGE_ADDRESSES`. This module also turns OSC arguments into registry values and back,
the TouchDesigner way: floats for ints, strings on their own addresses, lists as several
arguments or one JSON string, triggers on any non-zero value.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

from bridges.osc.pattern import PatternError, compile_pattern, filter_addresses, has_pattern
from bridges.osc.wire import IMPULSE, Impulse
from engine.runtime.registry import ControlError, Param, Registry

PREFIX = "/dd/"


@dataclass(frozen=True)
class BridgeAddress:
    """An address the OSC bridge itself answers or sends (not a registry parameter)."""

    address: str
    args: str  # OSC type tags, informal ("s", "ss", "f")
    direction: str  # "in" (we receive), "out" (we send)
    description: str
    status_key: str | None = None  # key of engine.status() for /dd/status/*
    scale: float = 1.0


GET = "/dd/get"
ERROR = "/dd/error"
WARNING = "/dd/warning"

BRIDGE_ADDRESSES: tuple[BridgeAddress, ...] = (
    BridgeAddress(
        GET,
        "s [i]",
        "in",
        "Ask for the current value of an address (no argument: every value); the answer comes "
        "on that address, to the sender's host (its feedback port, or the port given as 2nd arg)."
        " Beyond loopback, answered only to --osc-allow senders",
    ),
    BridgeAddress(ERROR, "ss", "out", "A rejected message: its address and the reason"),
    BridgeAddress(
        WARNING, "ss", "out", "An accepted but adjusted value (clamped): address, message"
    ),
    BridgeAddress(
        "/dd/status/fps", "f", "out", "Frames per second out, about once a second", "fps"
    ),
    BridgeAddress(
        "/dd/status/latency",
        "f",
        "out",
        "Control to first frame of the block that used it, in ms",
        "latency_ms",
    ),
    BridgeAddress(
        "/dd/status/block_ms", "f", "out", "Time to generate one block, in ms", "block_ms"
    ),
    BridgeAddress("/dd/status/block", "i", "out", "Index of the block being generated", "block"),
    BridgeAddress(
        "/dd/status/vram", "f", "out", "GPU memory in use, in MB (not sent on CPU)", "vram_mb"
    ),
    BridgeAddress("/dd/status/state", "s", "out", "starting, running, paused or stopped", "state"),
    BridgeAddress(
        "/dd/status/vace_input",
        "s",
        "out",
        "Input video (vace/source): none, live, holding the last frame or text only, and why",
        "vace_input",
    ),
    BridgeAddress(
        "/dd/status/last_error",
        "s",
        "out",
        "The last thing the engine could not do (a control that failed when applied, a"
        " block that failed and restarted the stream); not sent while there is none",
        "last_error",
    ),
    BridgeAddress(
        "/dd/status/audio",
        "s",
        "out",
        "Audio input state (--audio): the source and live, ended, lost (why) or waiting",
    ),
    BridgeAddress(
        "/dd/status/audio/{feature}",
        "f",
        "out",
        "Live audio values, about 20 a second while audio runs: rms, level, low, lowmid,"
        " highmid, high (0..1), onset/<band> and beat (0/1), count/<band> and beats"
        " (counters), bpm",
    ),
    BridgeAddress(
        "/dd/status/mod/{n}",
        "f",
        "out",
        "Source value of each active modulation slot at the last block",
    ),
)
STATUS_ADDRESSES = tuple(b for b in BRIDGE_ADDRESSES if b.status_key)


def path_of(address: str) -> str:
    """The registry path of an OSC address; raises ControlError when outside /dd/.

    Case-sensitive, as OSC is: every dreamdeck address is lower case, and ``/dd/SEED`` is
    an unknown address (with a hint) rather than an alias. (The registry itself ignores
    case for MIDI maps and timelines, so the check is made here.) Outer slashes are
    trimmed: ``/dd/seed/`` is ``/dd/seed``."""
    if not address.startswith(PREFIX) or len(address) == len(PREFIX):
        raise ControlError(address[:128], "not a dreamdeck address (they start with /dd/)")
    path = address[len(PREFIX) :].strip("/")
    if path != path.lower():
        raise ControlError(
            address[:128],
            f"unknown address: OSC is case-sensitive and dreamdeck addresses are lower case"
            f" (/dd/{path.lower()[:64]}?)",
        )
    return path


def is_pattern(address: str) -> bool:
    """An OSC address pattern (``/dd/prompt/*/weight``) rather than one address."""
    return has_pattern(address)


MATCH_CACHE = 256  # patterns remembered per registry: controllers repeat a few all show long
_matches: weakref.WeakKeyDictionary[Registry, tuple[int, dict[str, tuple[str, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def match(pattern: str, registry: Registry) -> list[Param]:
    """The parameters whose addresses an OSC address pattern matches, in registry order.
    Linear in the pattern and the addresses (`bridges.osc.pattern`); raises ControlError
    for a malformed or too costly pattern. Results are cached per registry (until a
    parameter is declared), so `/dd/prompt/*/weight` at 60 Hz costs a lookup."""
    size, cache = _matches.get(registry, (-1, {}))
    if size != len(registry):
        cache = {}
        _matches[registry] = (len(registry), cache)
    paths = cache.get(pattern)
    if paths is None:
        try:
            compiled = compile_pattern(pattern)
        except PatternError as e:
            raise ControlError(pattern[:128], e.reason) from None
        params = list(registry)
        hits = set(filter_addresses(compiled, [p.address for p in params]))
        paths = tuple(p.path for p in params if p.address in hits)
        if len(cache) >= MATCH_CACHE:
            cache.pop(next(iter(cache)))  # the oldest
        cache[pattern] = paths
    return [registry.param(p) for p in paths]


def type_tag(param: Param, value: Any = None) -> str:
    """The OSC type tags of a parameter, as OSCQuery's TYPE shows them."""
    t = param.type
    if t == "trigger":
        return "I"  # OSC 1.1 impulse; any non-zero number fires too
    if t == "float":
        return "f"
    if t == "int":
        return "i"
    if t == "bool":
        return "T"
    if t == "int_list":
        n = len(value) if isinstance(value, (list, tuple)) and value else 1
        return "i" * n
    return "s"  # str, json


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def args_to_value(param: Param, args: tuple[Any, ...]) -> Any:
    """OSC arguments -> the value handed to the registry (which coerces, clamps and
    validates). Raises ControlError for argument shapes that cannot mean anything."""
    p, t = param.path, param.type
    if t == "trigger":
        # Any non-zero value (or no argument, or an impulse) fires; 0 is TD's pulse release.
        if not args:
            return True
        a = args[0]
        if isinstance(a, Impulse) or a is None:
            return True
        if isinstance(a, (bool, int, float)):
            return bool(a) and not (isinstance(a, float) and math.isnan(a))
        if isinstance(a, str):
            return a
        raise ControlError(p, f"a trigger takes a number, got {type(a).__name__}")
    if not args:
        raise ControlError(p, "missing value")
    if t == "int_list":
        if len(args) == 1 and isinstance(args[0], (str, list)):
            return args[0]
        if all(_is_number(a) for a in args):
            return list(args)
        raise ControlError(p, "expected integers as arguments, or one JSON list string")
    if t == "str":
        # TD's OSC Out DAT may split a sentence on spaces; several strings are one text.
        if all(isinstance(a, str) for a in args):
            return " ".join(args)
        if len(args) == 1 and isinstance(args[0], bytes):
            return args[0]
        raise ControlError(p, f"expected a string, got {_kinds(args)}")
    if t == "json":
        if len(args) == 1 and isinstance(args[0], (str, bytes)):
            v = args[0]
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        raise ControlError(p, f"expected one JSON string, got {_kinds(args)}")
    if len(args) != 1:
        raise ControlError(p, f"expected one value, got {len(args)} arguments")
    a = args[0]
    if t == "bool" and a is IMPULSE:
        return True
    if isinstance(a, (bool, int, float, str)):
        return a
    raise ControlError(p, f"expected a number, got {_kinds(args)}")


def _kinds(args: tuple[Any, ...]) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", bytes: "blob"}
    return ", ".join(names.get(type(a), type(a).__name__) for a in args[:8]) or "nothing"


def value_to_args(param: Param, value: Any) -> list[Any]:
    """A registry value as OSC arguments for feedback. Booleans go out as 0/1 ints:
    TouchDesigner's OSC In CHOP makes channels of numbers, and not every host maps T/F."""
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if _is_number(v)]
    if param.type == "json":
        return [json.dumps(value)]
    return [value]


def status_args(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (int, float, str)):
        return [value]
    return [str(value)]


def describe(registry: Registry) -> list[dict[str, Any]]:
    """Every address, registry parameters then the bridge's own, as plain rows for
    `dreamdeck osc --list`, docs/osc.md and the HTML reference."""
    rows = []
    for d in registry.describe():
        p = registry.param(d["path"])
        kind = d["type"] if p.expand is None else f"{d['type']} action"
        if d["range"]:
            rng = f"{_num(d['range'][0])}..{_num(d['range'][1])}" + (
                f" {d['unit']}" if d["unit"] else ""
            )
        elif d["choices"]:
            rng = " | ".join(d["choices"])
        else:
            rng = ""
        rows.append(
            {
                "address": d["address"],
                "args": _args_hint(p),
                "type": kind,
                "range": rng,
                "default": "" if not p.stateful else json.dumps(d["default"]),
                "unit": d["unit"],
                "applies": d["applies"],
                "description": d["description"],
            }
        )
    for b in BRIDGE_ADDRESSES:
        rows.append(
            {
                "address": b.address,
                "args": b.args,
                "type": "query" if b.direction == "in" else "feedback",
                "range": "",
                "default": "",
                "unit": "",
                "applies": "immediate" if b.direction == "in" else "sent",
                "description": b.description,
            }
        )
    return rows


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _args_hint(p: Param) -> str:
    return {
        "trigger": "any non-zero / none",
        "float": "f",
        "int": "i (f rounded)",
        "bool": "i 0/1 | T/F",
        "str": "s",
        "int_list": "i i ... | s JSON",
        "json": "s JSON",
    }[p.type]
