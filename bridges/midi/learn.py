"""MIDI learn: wiggle a control, name a target, get a YAML mapping.

`Learner` watches the messages of one gesture and classifies the control:

- a note -> ``{note: n}``;
- CC 99/98 then 6 (/38) -> ``{nrpn: n}`` (``bits: 7`` when no 38 came);
- CC n with n+32 (n < 32) -> a 14-bit pair ``{cc: [n, n+32]}``;
- a CC whose values repeat a few small steps -> a relative encoder, with the encoding
  read off the values: near 0/128 two's complement, near 64 offset, 1.. and 65.. sign-bit;
- a CC that only sends 0 and 127 -> a button;
- anything else -> an absolute CC (fader or knob).

Turn an encoder or sweep a fader over a good part of its travel: two or three values of
an absolute knob near 64 look like an offset encoder.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bridges.midi.maps import MapError, parse_map, parse_yaml
from engine.runtime.registry import Registry

IGNORED = {"clock", "start", "stop", "continue", "songpos", "active_sensing", "sysex", "reset"}


class Learner:
    def __init__(self, settle: float = 0.7):
        self.settle = settle  # quiet time that ends a gesture
        self.messages: list[Any] = []
        self.last: float | None = None

    def feed(self, msg: Any, t: float) -> bool:
        """Take one message; True if it counts (clock and sysex do not)."""
        if msg.type in IGNORED or msg.type not in ("control_change", "note_on", "note_off"):
            return False
        if msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0):
            if not self.messages:
                return False  # a release left over from before
        self.messages.append(msg)
        self.last = t
        return True

    def done(self, now: float) -> bool:
        return self.last is not None and now - self.last >= self.settle

    def classify(self) -> dict[str, Any]:
        """The mapping (without target) for what was seen. Raises ValueError if nothing."""
        msgs = self.messages
        if not msgs:
            raise ValueError("no control moved")
        notes = [m for m in msgs if m.type == "note_on" and m.velocity > 0]
        if notes:
            n = Counter((m.note, m.channel) for m in notes).most_common(1)[0][0]
            return {"note": n[0], "channel": n[1] + 1}
        ccs = [m for m in msgs if m.type == "control_change"]
        if not ccs:
            raise ValueError("only note-offs seen; press the pad or button")
        ch = Counter(m.channel for m in ccs).most_common(1)[0][0]
        ccs = [m for m in ccs if m.channel == ch]
        seen = {m.control: [] for m in ccs}
        for m in ccs:
            seen[m.control].append(m.value)
        if 99 in seen and 98 in seen:
            num = seen[99][-1] << 7 | seen[98][-1]
            spec: dict[str, Any] = {"nrpn": num, "channel": ch + 1}
            if 96 in seen or 97 in seen:
                spec["mode"] = "relative"
            elif 38 not in seen:
                spec["bits"] = 7
            return spec
        cc = Counter(m.control for m in ccs).most_common(1)[0][0]
        if cc < 32 and cc + 32 in seen:
            return {"cc": [cc, cc + 32], "channel": ch + 1}
        if 32 <= cc < 64 and cc - 32 in seen:
            return {"cc": [cc - 32, cc], "channel": ch + 1}
        values = seen[cc]
        spec = {"cc": cc, "channel": ch + 1}
        distinct = set(values)
        if distinct <= {0, 127}:
            spec["button"] = True
            return spec
        if len(values) >= 3 and len(distinct) <= 3:
            lows = all(1 <= v <= 15 or 113 <= v <= 127 for v in values)
            mids = all(49 <= v <= 79 and v != 64 for v in values)
            sign = all(1 <= v <= 15 or 65 <= v <= 79 for v in values)
            if lows:
                spec.update(mode="relative", encoding="twos")
            elif mids and not (sign and any(v < 16 for v in values)):
                spec.update(mode="relative", encoding="offset")
            elif sign:
                spec.update(mode="relative", encoding="signbit")
        return spec


def finish(spec: dict[str, Any], target: str, registry: Registry) -> dict[str, Any]:
    """The learned control + a target -> a mapping dict (raises MapError if invalid)."""
    spec = dict(spec)
    button = spec.pop("button", False)
    p = registry.param(target)
    out: dict[str, Any] = {k: spec[k] for k in ("cc", "nrpn", "note") if k in spec}
    if "channel" in spec:
        out["channel"] = spec["channel"]
    out["target"] = p.path
    for k in ("mode", "encoding", "bits"):
        if k in spec:
            out[k] = spec[k]
    if button:
        if p.stateful and p.type in ("bool", "int", "float"):
            out["mode"] = "toggle"
        else:
            out["mode"] = "trigger"
    elif "mode" not in out and p.stateful and p.type in ("int", "float") and "note" not in out:
        out["takeover"] = "pickup"  # a fader should not jump the value
    validate_mapping(out, registry)
    return out


def mapping_line(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=1000).strip()


def validate_mapping(mapping: dict[str, Any], registry: Registry) -> None:
    parse_map(
        f'device: "x"\nmappings:\n  - {mapping_line(mapping)}\n', registry, "<learned mapping>"
    )


def device_regex(port_name: str) -> str:
    """A port name as a regex that survives re-plugging: ALSA appends 'client:port'
    numbers that change between sessions."""
    base = re.sub(r"\s+\d+:\d+$", "", port_name)
    return "^" + re.escape(base)


def write_mapping(path: str | Path, mapping: dict[str, Any], device: str) -> str:
    """Append the mapping to a map file (created if missing) and return the line written.
    Comments and layout of an existing file are kept: we append a line, not re-dump."""
    path = Path(path)
    line = "  - " + mapping_line(mapping) + "\n"
    if not path.exists():
        text = (
            f"# MIDI map written by `dreamdeck midi learn`\n"
            f"device: {yaml.safe_dump(device, default_style=chr(34)).strip()}\n"
            f"mappings:\n{line}"
        )
        path.write_text(text, encoding="utf-8")
        return line
    text = path.read_text(encoding="utf-8")
    doc = parse_yaml(text, str(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("mappings"), list):
        raise MapError([f"{path}:1: cannot append: the file has no mappings: list"])
    if max(doc.lines.values()) > max(doc["mappings"].lines or [doc.lines["mappings"]]):
        raise MapError(
            [f"{path}:{doc.lines['mappings']}: cannot append: mappings: must be the last section"]
        )
    if doc["mappings"].flow:
        raise MapError([f"{path}:{doc.lines['mappings']}: cannot append to a [flow] list"])
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + line, encoding="utf-8")
    return line
