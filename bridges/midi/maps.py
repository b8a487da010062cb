"""MIDI maps in YAML: load, validate against the registry, compile to `Binding`s.

Every error names the file and line (the YAML nodes keep their marks) and all errors of a
file are reported together, so `dreamdeck midi check` gives the whole list at once::

    device: "nanoKONTROL2.*"          # regex on the input port name
    output: "nanoKONTROL2.*"          # optional: output port for feedback (default: device)
    channel: 1                        # optional default channel (1..16) for every mapping
    presets:
      calm: {prompt/1/text: "fog over a lake", seed: 7, kv_bias: 0.5}
    mappings:
      - {cc: 0, target: prompt/1/weight, takeover: pickup}
      - {cc: [1, 33], target: vace/scale, range: [0, 2]}     # 14-bit (MSB, LSB)
      - {cc: 16, target: seed, mode: relative, encoding: twos}
      - {note: 36, target: prompt/1/solo}
      - {nrpn: [1, 2], target: kv_bias}                        # NRPN MSB 1, LSB 2 (= 130)
      - {note: 40, action: preset, preset: calm}
      - {note: 41, action: cycle, step: 1}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridges.midi.messages import (
    ACTIONS,
    CURVES,
    DEFAULT_CURVE_K,
    ENCODINGS,
    MODES,
    NRPN_CCS,
    TAKEOVERS,
    Binding,
)
from engine.runtime.registry import ControlError, Registry, coerce
from engine.runtime.yaml_lines import LineDict, LineList, LineLoader
from engine.shipped import shipped_dir

PRESET_DIR = shipped_dir("presets/midi")  # the checkout's presets/midi, or the wheel's
TOP_KEYS = ("device", "output", "channel", "presets", "mappings", "name", "notes")
MAPPING_KEYS = (
    "cc", "nrpn", "note", "channel", "target", "action", "preset", "mode", "encoding",
    "range", "curve", "curve_k", "takeover", "step", "value", "feedback", "led",
    "led_channel", "bits", "name",
)  # fmt: skip


class MapError(ValueError):
    """One or more problems in a map file; each line reads ``file:line: what``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class MapFileError(MapError):
    """The file cannot be read as a map at all (missing, unreadable, not UTF-8 text)."""


# a YAML loader that keeps line numbers: engine/runtime/yaml_lines.py
_Dict, _List, _Loader = LineDict, LineList, LineLoader


def parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise MapError([f"{file}:{line}: YAML error: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise MapError([f"{file}:1: YAML error: {e}"]) from None


# -- the compiled map ------------------------------------------------------------------
@dataclass
class MidiMap:
    file: str
    device: str
    output: str | None
    bindings: list[Binding]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = ""

    def matches(self, port_name: str) -> bool:
        return re.search(self.device, port_name) is not None

    def matches_output(self, port_name: str) -> bool:
        return re.search(self.output or self.device, port_name) is not None


def resolve_map_path(name: str) -> Path:
    """A file path, or the name of a shipped map (``nanokontrol2`` ->
    presets/midi/nanokontrol2.yaml)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
        if cand.exists():
            return cand
    shipped = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise MapError([f"{name}: no such file, and not a shipped map ({shipped})"])


def load_map(path: str | Path, registry: Registry) -> MidiMap:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MapFileError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise MapFileError(
            [
                f"{path}: not a MIDI map (YAML text): byte 0x{e.object[e.start]:02x} at offset"
                f" {e.start} is not UTF-8"
            ]
        ) from None
    return parse_map(text, registry, str(path))


def parse_map(text: str, registry: Registry, file: str = "<map>") -> MidiMap:
    doc = parse_yaml(text, file)
    v = _Validator(file, registry)
    m = v.document(doc)
    if v.problems:
        raise MapError(v.problems)
    assert m is not None
    return m


def duplicates(m: MidiMap) -> tuple[list[str], list[str]]:
    """(problems, notes) about repeated mappings. The same control mapped the same way
    twice is a problem: it fires twice (a relative encoder moves double, a toggle flips
    back). One control driving several targets can be meant, so it is only noted."""
    problems: list[str] = []
    notes: list[str] = []
    same: dict[tuple[Any, ...], Binding] = {}
    control: dict[tuple[Any, ...], Binding] = {}
    for b in m.bindings:
        ctl = (b.kind, b.number, b.lsb, b.channel)
        key = (*ctl, b.target, b.action, b.preset, b.mode, repr(b.value))
        what = f"{b.kind} {b.number}" + (f"/{b.lsb}" if b.lsb is not None else "")
        if key in same:
            problems.append(
                f"{b.source}: duplicate of the mapping at {same[key].source} ({what} ->"
                f" {b.target or b.action})"
            )
            continue
        same[key] = b
        if ctl in control:
            notes.append(
                f"{b.source}: {what} also drives {control[ctl].target or control[ctl].action}"
                f" (mapped at {control[ctl].source})"
            )
        else:
            control[ctl] = b
    return problems, notes


class _Validator:
    def __init__(self, file: str, registry: Registry):
        self.file = file
        self.registry = registry
        self.problems: list[str] = []

    def err(self, line: int, msg: str) -> None:
        self.problems.append(f"{self.file}:{line}: {msg}")

    def document(self, doc: Any) -> MidiMap | None:
        if not isinstance(doc, dict):
            self.err(getattr(doc, "line", 1), "a MIDI map is a mapping with device: and mappings:")
            return None
        lines = getattr(doc, "lines", {})
        for k in doc:
            if k not in TOP_KEYS:
                self.err(lines.get(k, 1), f"unknown key {k!r} (known: {', '.join(TOP_KEYS)})")
        device = doc.get("device")
        if not isinstance(device, str) or not device:
            self.err(lines.get("device", doc.line), "device: must be a regex on the port name")
            device = "(?!)"
        else:
            device = self.regex(device, lines.get("device", 1))
        output = doc.get("output")
        if output is not None:
            output = self.regex(output, lines.get("output", 1)) if isinstance(output, str) else None
        channel = self.channel(doc.get("channel"), lines.get("channel", 1))
        presets = self.presets(doc.get("presets"), lines.get("presets", 1))
        maps = doc.get("mappings")
        bindings: list[Binding] = []
        if not isinstance(maps, list):
            self.err(lines.get("mappings", doc.line), "mappings: must be a list")
        else:
            for item, line in zip(maps, getattr(maps, "lines", [1] * len(maps)), strict=False):
                b = self.mapping(item, line, channel, presets)
                if b is not None:
                    bindings.append(b)
            self.conflicts(bindings)
        name = doc.get("name", "")
        return MidiMap(self.file, device, output, bindings, presets, str(name))

    def regex(self, s: Any, line: int) -> str:
        try:
            re.compile(s)
        except re.error as e:
            self.err(line, f"bad regex {s!r}: {e}")
            return "(?!)"
        return s

    def channel(self, value: Any, line: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
            self.err(line, f"channel must be 1..16, got {value!r}")
            return None
        return value - 1

    def presets(self, value: Any, line: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if value is None:
            return out
        if not isinstance(value, dict):
            self.err(line, "presets: must map names to {path: value}")
            return out
        for name, values in value.items():
            pline = value.lines.get(name, line)
            if not isinstance(values, dict) or not values:
                self.err(pline, f"preset {name!r} must be a non-empty {{path: value}} mapping")
                continue
            good: dict[str, Any] = {}
            for path, v in values.items():
                vline = values.lines.get(path, pline)
                try:
                    p = self.registry.param(str(path))
                    if p.type == "str" and isinstance(v, bool):
                        v = "on" if v else "off"  # YAML 1.1 reads `off` as false
                    coerce(p, v)
                except ControlError as e:
                    self.err(vline, f"preset {name!r}: {e}")
                    continue
                good[p.path] = v
            out[str(name)] = good
        return out

    def mapping(
        self, m: Any, line: int, default_channel: int | None, presets: dict[str, Any]
    ) -> Binding | None:
        if not isinstance(m, dict):
            self.err(line, "each mapping is a {cc|note|nrpn: ..., target: ...} mapping")
            return None
        n_before = len(self.problems)
        lines = m.lines

        def at(key: str) -> int:
            return lines.get(key, line)

        for k in m:
            if k not in MAPPING_KEYS:
                self.err(at(k), f"unknown key {k!r} (known: {', '.join(MAPPING_KEYS)})")
        sources = [k for k in ("cc", "nrpn", "note") if k in m]
        if len(sources) != 1:
            self.err(line, "a mapping needs exactly one of cc:, nrpn:, note:")
            return None
        src = sources[0]
        raw = m[src]
        lsb = None
        if src == "cc" and isinstance(raw, list):
            if len(raw) != 2 or not all(self.is7(x) for x in raw) or raw[0] == raw[1]:
                self.err(
                    at("cc"),
                    f"a 14-bit pair is [MSB, LSB], two different CCs 0..127; got {list(raw)}",
                )
                return None
            kind, number, lsb = "cc14", raw[0], raw[1]
        elif src == "nrpn":
            # [MSB, LSB] as manuals print them ("NRPN 01/02"), or the 14-bit number
            if isinstance(raw, list) and len(raw) == 2 and all(self.is7(x) for x in raw):
                raw = raw[0] << 7 | raw[1]
            if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 16383:
                self.err(
                    at("nrpn"), f"nrpn must be [MSB, LSB] (0..127 each) or 0..16383, got {raw!r}"
                )
                return None
            kind, number = "nrpn", raw
        else:
            if not self.is7(raw):
                self.err(at(src), f"{src} must be 0..127, got {raw!r}")
                return None
            kind, number = src, raw
        channel = self.channel(m["channel"], at("channel")) if "channel" in m else default_channel

        target, action, preset = m.get("target"), m.get("action"), m.get("preset")
        param = None
        if (target is None) == (action is None):
            self.err(line, "a mapping needs exactly one of target: (a registry path) or action:")
            return None
        if target is not None:
            try:
                param = self.registry.param(str(target))
                target = param.path
            except ControlError:
                self.err(
                    at("target"),
                    f"unknown target {target!r}: not a registry path{self.hint(str(target))}",
                )
                return None
        else:
            if action not in ACTIONS:
                self.err(at("action"), f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
                return None
            if action == "preset" and preset not in presets:
                known = ", ".join(presets) or "none defined"
                self.err(
                    at("preset") if "preset" in m else line,
                    f"unknown preset {preset!r} (presets: {known})",
                )
                return None

        mode = m.get("mode")
        if mode is None:
            if "value" in m:
                mode = "set"
            elif action is not None or (param is not None and not param.stateful):
                mode = "trigger"
            elif kind == "note" and param is not None and param.type == "bool":
                mode = "toggle"
            else:
                mode = "absolute"
        if mode not in MODES:
            self.err(at("mode"), f"unknown mode {mode!r} (known: {', '.join(MODES)})")
            return None
        if kind == "note" and mode in ("absolute", "relative"):
            self.err(at("mode"), f"a note cannot be {mode}: use trigger, toggle, momentary or set")
        if param is not None and not param.stateful and mode not in ("trigger", "set"):
            what = "a trigger" if param.type == "trigger" else "an action"
            self.err(at("mode"), f"{target} is {what}: mode must be trigger (or set, with value:)")
        if param is not None and param.type in ("str", "json", "int_list") and param.stateful:
            if param.choices is None and mode not in ("set",):
                self.err(
                    at("mode"), f"{target} takes {param.type} values: use mode: set with value:"
                )
        if mode == "set":
            if "value" not in m:
                self.err(line, "mode: set needs value:")
            elif param is not None:
                v = m["value"]
                if param.type == "str" and isinstance(v, bool):
                    v = "on" if v else "off"
                try:
                    coerce(param, v)
                except ControlError as e:
                    self.err(at("value"), str(e))
        encoding = m.get("encoding", "twos")
        if encoding not in ENCODINGS:
            self.err(
                at("encoding"), f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})"
            )
        if mode == "relative" and kind == "cc14":
            self.err(at("mode"), "a 14-bit pair is absolute; relative encoders send one CC")
        curve = m.get("curve", "linear")
        if curve not in CURVES:
            self.err(at("curve"), f"unknown curve {curve!r} (known: {', '.join(CURVES)})")
            curve = "linear"
        curve_k = m.get("curve_k", DEFAULT_CURVE_K[curve])
        if not self.number(curve_k) or curve_k <= 0:
            self.err(at("curve_k"), f"curve_k must be a positive number, got {curve_k!r}")
        takeover = m.get("takeover", "none")
        if takeover not in TAKEOVERS:
            self.err(
                at("takeover"), f"unknown takeover {takeover!r} (known: {', '.join(TAKEOVERS)})"
            )
        elif takeover != "none" and mode != "absolute":
            self.err(at("takeover"), f"takeover {takeover} only applies to absolute controls")
        rng = m.get("range")
        if rng is not None:
            if (
                not (isinstance(rng, list) and len(rng) == 2 and all(self.number(x) for x in rng))
                or rng[0] == rng[1]
            ):
                self.err(
                    at("range"), f"range must be [low, high] (two different numbers), got {rng!r}"
                )
                rng = None
            elif param is not None and param.range is not None:
                lo, hi = param.range
                for x in rng:
                    if not lo <= x <= hi:
                        self.err(
                            at("range"), f"range end {x} is outside {target}'s range [{lo}, {hi}]"
                        )
            if rng is not None and param is not None and param.type not in ("float", "int"):
                self.err(at("range"), f"range: needs a number target; {target} is {param.type}")
        step = m.get("step")
        if step is not None and (not self.number(step) or step == 0):
            self.err(at("step"), f"step must be a non-zero number, got {step!r}")
        bits = m.get("bits", 14)
        if bits not in (7, 14):
            self.err(at("bits"), f"bits must be 7 or 14, got {bits!r}")
        led = m.get("led", [0, 127])
        if not (isinstance(led, list) and len(led) == 2 and all(self.is7(x) for x in led)):
            self.err(at("led"), f"led must be [off, on] values 0..127, got {led!r}")
            led = [0, 127]
        led_channel = (
            self.channel(m["led_channel"], at("led_channel")) if "led_channel" in m else None
        )
        fb = m.get("feedback", False)
        feedback = None
        if fb is True:
            if param is None or not param.stateful:
                self.err(
                    at("feedback"),
                    "feedback: true needs a target with a value; name the path to show instead",
                )
            else:
                feedback = target
        elif isinstance(fb, str):
            try:
                fp = self.registry.param(fb)
                if not fp.stateful:
                    raise ControlError(fb, "has no value to show")
                feedback = fp.path
            except ControlError as e:
                self.err(at("feedback"), f"feedback: {e}")
        elif fb is not False and fb is not None:
            self.err(at("feedback"), f"feedback must be true, false or a registry path, got {fb!r}")
        if len(self.problems) > n_before:
            return None
        value = m.get("value")
        if param is not None and param.type == "str" and isinstance(value, bool):
            value = "on" if value else "off"
        return Binding(
            kind=kind,
            number=number,
            lsb=lsb,
            channel=channel,
            target=target,
            action=action,
            preset=preset if action == "preset" else None,
            mode=mode,
            encoding=encoding,
            range=(float(rng[0]), float(rng[1])) if rng is not None else None,
            curve=curve,
            curve_k=float(curve_k),
            takeover=takeover,
            step=float(step) if step is not None else None,
            value=value,
            feedback=feedback,
            led=(int(led[0]), int(led[1])),
            led_channel=led_channel,
            bits=int(bits),
            source=f"{self.file}:{line}",
        )

    def conflicts(self, bindings: list[Binding]) -> None:
        """A CC cannot be both half of a 14-bit pair and a plain CC, nor NRPN plumbing."""
        pair_ccs = {}
        for b in bindings:
            if b.kind == "cc14":
                for n in (b.number, b.lsb):
                    pair_ccs[(b.channel, n)] = b
        uses_nrpn = any(b.kind == "nrpn" for b in bindings)
        for b in bindings:
            if b.kind != "cc":
                continue
            line = b.source.rsplit(":", 1)[1]
            for (ch, n), other in pair_ccs.items():
                if n == b.number and (ch is None or b.channel is None or ch == b.channel):
                    self.problems.append(
                        f"{self.file}:{line}: cc {n} is also half of the 14-bit pair at {other.source}"
                    )
            if uses_nrpn and b.number in NRPN_CCS:
                self.problems.append(
                    f"{self.file}:{line}: cc {b.number} carries NRPN data in this map (99/98/6/38/96/97/100/101)"
                )

    def hint(self, path: str) -> str:
        import difflib

        close = difflib.get_close_matches(path, [p.path for p in self.registry], n=3)
        return f"; did you mean {', '.join(close)}?" if close else ""

    @staticmethod
    def is7(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 127

    @staticmethod
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
