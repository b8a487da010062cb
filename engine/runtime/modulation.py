"""The modulation layer: parameters that move on their own (LFOs, envelopes of the audio,
random walks, MIDI CCs), combined with the performer's values once per block.

Why it sits next to the registry and not in a bridge: the combination must happen at the
block boundary, inside ``Registry.begin_block``, so that a block's controls stay atomic
and the control log records what the block really used. Bridges (audio, MIDI) only write
numbers into the `SourceBank`; nothing here imports a bridge.

The rule, per block and per modulated parameter::

    value = clamp(base + sum over slots of smooth(offset + depth * curve(source)))

``base`` is the performer's value (OSC, MIDI, timeline) and is never overwritten: the
registry keeps it, feedback echoes it, and a slot switched off gives it back exactly.
Ints (seed, transition/blocks) are rounded after the sum.

Sources (a slot's ``mod/{n}/source``):

- ``lfo/sine|triangle|saw|square|sh``: on the tempo grid, one cycle per ``rate`` beats,
  shifted by ``phase`` (cycles); bipolar -1..1. ``sh`` (sample and hold) draws a new value
  each cycle from a hash of the cycle index, so a render draws the same ones every time.
- ``random``: a random walk in -1..1 (reflecting), steps scaled by sqrt(beats / rate).
- ``audio/<feature>``: what the audio bridge publishes (``rms``, ``level``, a band name
  such as ``low``, ``onset``, ``onset/<band>``, ``beat``; counters ``count``,
  ``count/<band>``, ``beats``). Levels and onsets (0..1) go through an envelope follower
  (``attack``/``release`` seconds) at the analysis hop, and the block takes the peak of
  the envelope over the hops since the last block: a block stands for its whole span, so
  a kick anywhere in it counts. Counters take their latest value (``depth`` 1 on
  ``audio/count/high`` steps the seed by one per hi-hat).
- ``midi/cc/<n>`` (any channel) or ``midi/cc/<ch>/<n>``: 0..1.

When a source falls silent (a device vanished), the slot holds its last value.
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.runtime.yaml_lines import LineDict, LineList, LineLoader

SLOTS = 16
SHAPES = ("sine", "triangle", "saw", "square", "sh")
CURVES = ("linear", "square", "cube", "sqrt", "smooth")


def _preset_dir() -> Path:
    from engine.shipped import KINDS, shipped_dir  # the checkout's presets/mod, or the wheel's

    try:
        return shipped_dir("presets/mod")
    except FileNotFoundError:  # a broken install: loading a preset by name says so later
        return KINDS["presets/mod"][0]


PRESET_DIR = _preset_dir()
SLOT_KEYS = (
    "source",
    "target",
    "depth",
    "offset",
    "curve",
    "smoothing",
    "rate",
    "phase",
    "attack",
    "release",
)
MAX_FRAMES = 4096  # analysis hops held for the next block (40 s at 10 ms): never a growing queue
_FEATURE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
COUNTERS = ("count", "beats")


@dataclass(frozen=True)
class Source:
    kind: str  # off | lfo | random | audio | midi
    name: str = ""  # shape for lfo; bank key for audio/midi
    counter: bool = False

    @property
    def spec(self) -> str:
        return {"off": "", "lfo": f"lfo/{self.name}", "random": "random"}.get(self.kind, self.name)


def parse_source(spec: Any) -> Source:
    """A slot's source spec, or ValueError naming what is wrong."""
    if not isinstance(spec, str):
        raise ValueError(f"a source is a string like lfo/sine, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in ("", "off", "none"):
        return Source("off")
    parts = s.split("/")
    if parts[0] == "lfo":
        if len(parts) != 2 or parts[1] not in SHAPES:
            raise ValueError(f"{spec[:60]!r}: LFO shapes are lfo/{', lfo/'.join(SHAPES)}")
        return Source("lfo", parts[1])
    if s == "random":
        return Source("random")
    if parts[0] == "audio":
        rest = parts[1:]
        ok = (len(rest) == 1 and _FEATURE.match(rest[0])) or (
            len(rest) == 2 and rest[0] in ("onset", "count") and _FEATURE.match(rest[1])
        )
        if not ok:
            raise ValueError(
                f"{spec[:60]!r}: audio sources are audio/rms, audio/level, audio/<band>,"
                " audio/onset[/<band>], audio/beat, audio/count[/<band>], audio/beats"
            )
        return Source("audio", s, counter=rest[0] in COUNTERS)
    if parts[0] == "midi":
        nums = parts[2:] if len(parts) >= 3 and parts[1] == "cc" else None
        if nums is None or len(nums) not in (1, 2) or not all(n.isdigit() for n in nums):
            raise ValueError(
                f"{spec[:60]!r}: MIDI sources are midi/cc/<0-127> or midi/cc/<1-16>/<n>"
            )
        cc = int(nums[-1])
        if cc > 127 or (len(nums) == 2 and not 1 <= int(nums[0]) <= 16):
            raise ValueError(f"{spec[:60]!r}: channel 1..16, controller 0..127")
        return Source("midi", "midi/cc/" + "/".join(str(int(n)) for n in nums))
    raise ValueError(
        f"unknown source {spec[:60]!r}: use lfo/<shape>, random, audio/<feature>, midi/cc/<n>, or off"
    )


# -- shapes and curves ------------------------------------------------------------------------
def _hash01(n: int) -> float:
    """splitmix64 of n -> [0, 1): the sample-and-hold draw of cycle n (seedless, reproducible)."""
    z = (n * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def lfo(shape: str, beat: float, rate: float, phase: float = 0.0, slot: int = 0) -> float:
    """The LFO value (-1..1) at beat position `beat`: one cycle per `rate` beats."""
    x = beat / rate + phase
    f = x - math.floor(x)
    if shape == "sine":
        return math.sin(2 * math.pi * f)
    if shape == "triangle":  # 0 at f=0, up to 1 at 1/4, down to -1 at 3/4
        return 4 * f if f < 0.25 else (2 - 4 * f if f < 0.75 else 4 * f - 4)
    if shape == "saw":
        return 2 * f - 1
    if shape == "square":
        return 1.0 if f < 0.5 else -1.0
    if shape == "sh":
        return 2 * _hash01(math.floor(x) * SLOTS + slot) - 1
    raise ValueError(f"unknown LFO shape {shape!r}")


def curve(name: str, x: float) -> float:
    """Shape the source, keeping its sign (bipolar sources stay bipolar)."""
    if name == "linear":
        return x
    a, s = abs(x), math.copysign(1.0, x)
    if name == "square":
        return s * a * a
    if name == "cube":
        return s * a * a * a
    if name == "sqrt":
        return s * math.sqrt(a)
    if name == "smooth":
        a = min(a, 1.0)
        return s * a * a * (3 - 2 * a)
    raise ValueError(f"unknown curve {name!r}")


# -- where sources write ----------------------------------------------------------------------
class SourceBank:
    """Latest values of every outside source, thread-safe and bounded.

    Audio hops go in with ``push(t, values)`` (held until the next block takes them: at
    most MAX_FRAMES, oldest dropped); single values (MIDI CCs) with ``set``. ``status``
    is a short line per source for feedback ("file:track.wav: playing")."""

    def __init__(self, max_frames: int = MAX_FRAMES):
        self._lock = threading.Lock()
        self._frames: deque[tuple[float, dict[str, float]]] = deque(maxlen=max_frames)
        self._latest: dict[str, float] = {}
        self._peak: dict[str, float] = {}  # since the last meters() call
        self.status: dict[str, str] = {}
        self.pushed = 0

    def push(self, t: float, values: Mapping[str, float]) -> None:
        v = {k: float(x) for k, x in values.items()}
        with self._lock:
            self._frames.append((float(t), v))
            self._latest.update(v)
            for k, x in v.items():
                p = self._peak.get(k)
                self._peak[k] = x if p is None or x > p else p
            self.pushed += 1

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._latest[name] = float(value)

    def drain(self) -> list[tuple[float, dict[str, float]]]:
        with self._lock:
            out = list(self._frames)
            self._frames.clear()
        return out

    def latest(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latest)

    def meters(self) -> dict[str, float]:
        """Each value's peak since the last call (a 3 ms click between two meter updates
        still shows), for one reader: the OSC meters."""
        with self._lock:
            out = dict(self._latest)
            out.update(self._peak)
            self._peak.clear()
        return out


# -- the per-block combination ----------------------------------------------------------------
@dataclass
class _SlotState:
    config: tuple = ()
    env: float = 0.0
    held: float = 0.0  # the source value of the last block (held when a source is silent)
    out: float | None = None  # smoothed modulation
    walk: float = 0.0
    beat: float | None = None  # beat position at the last block (random walk steps)
    rng: Any = None


class Modulation:
    """Installed on a registry as ``registry.modulator``; called by ``begin_block`` with
    the base values. ``beat_at(t)`` (the tempo grid's, when a tempo bridge runs) places
    LFOs; without one the beat position follows ``tempo/bpm`` from the first block."""

    def __init__(self, registry: Any, bank: SourceBank | None = None):
        self.registry = registry
        self.bank = bank or SourceBank()
        self.beat_at: Callable[[float], float] | None = None
        self._slots = [_SlotState() for _ in range(SLOTS)]
        self._beat: tuple[float, float] | None = None  # (time, beat) of the last block
        self.last: dict[str, float] = {}  # the modulation of each path, last block
        self.sources: dict[str, float] = {}  # each active slot's source value, last block

    def _beat_now(self, values: Mapping[str, Any], now: float) -> float:
        if self.beat_at is not None:
            return float(self.beat_at(now))
        grid = getattr(self.registry, "tempo_grid", None)
        if grid is not None:
            return float(grid.beat_at(now))
        bpm = float(values.get("tempo/bpm", 120.0))
        if self._beat is None:
            beat = 0.0
        else:
            t0, b0 = self._beat
            beat = b0 + max(0.0, now - t0) * bpm / 60.0
        self._beat = (now, beat)
        return beat

    def __call__(self, values: Mapping[str, Any], now: float, block: int) -> dict[str, Any]:
        frames = self.bank.drain()
        active = [
            (n, values.get(f"mod/{n}/source", ""), values.get(f"mod/{n}/target", ""))
            for n in range(1, SLOTS + 1)
        ]
        active = [(n, s, t) for n, s, t in active if s and t]
        if not active:
            self.last, self.sources = {}, {}
            return {}
        latest = self.bank.latest()
        beat = self._beat_now(values, now)
        sums: dict[str, float] = {}
        sources: dict[str, float] = {}
        for n, spec, target in active:
            g = lambda k, n=n: values[f"mod/{n}/{k}"]  # noqa: E731
            src = parse_source(spec)
            st = self._slots[n - 1]
            config = (spec, target)
            if st.config != config:  # a new assignment starts from rest
                self._slots[n - 1] = st = _SlotState(config=config)
            s = self._source_value(n, st, src, g, frames, latest, beat)
            sources[f"{n}"] = s
            m = float(g("offset")) + float(g("depth")) * (
                s if src.counter else curve(g("curve"), s)
            )
            sm = float(g("smoothing"))
            st.out = m if st.out is None or sm <= 0 else sm * st.out + (1 - sm) * m
            sums[target] = sums.get(target, 0.0) + st.out
        out: dict[str, Any] = {}
        for path, m in sums.items():
            p = self.registry.param(path)
            v = float(values[path]) + m
            if not math.isfinite(v):
                continue
            if p.range is not None:
                v = min(max(v, p.range[0]), p.range[1])
            out[path] = int(round(v)) if p.type == "int" else v
        self.last, self.sources = sums, sources
        return out

    def _source_value(self, n, st, src, g, frames, latest, beat) -> float:
        if src.kind == "lfo":
            return lfo(src.name, beat, float(g("rate")), float(g("phase")), n - 1)
        if src.kind == "random":
            if st.rng is None:
                import random

                st.rng = random.Random(n)  # reproducible: a render walks the same way
                st.beat = beat
            steps = max(0.0, beat - (st.beat if st.beat is not None else beat)) / float(g("rate"))
            st.beat = beat
            if steps > 0:
                x = st.walk + st.rng.gauss(0.0, 1.0) * math.sqrt(steps) * 0.5
                while abs(x) > 1:  # reflect at the walls
                    x = math.copysign(2.0, x) - x
                st.walk = x
            return st.walk
        if src.kind == "midi":
            v = latest.get(src.name)
            st.held = st.held if v is None else v
            return st.held
        # audio
        series = [(t, f[src.name]) for t, f in frames if src.name in f]
        if not series:
            return st.held  # nothing new (a device gone, a pause): hold
        if src.counter:
            st.held = series[-1][1]
            return st.held
        attack, release = float(g("attack")), float(g("release"))
        peak = -math.inf
        y = st.env
        prev_t = None
        for t, x in series:
            dt = 0.01 if prev_t is None else max(t - prev_t, 1e-4)
            prev_t = t
            tau = attack if x > y else release
            y = x if tau <= 0 else y + (x - y) * (1 - math.exp(-dt / tau))
            peak = max(peak, y)
        st.env = y
        st.held = peak
        return peak


# -- presets ----------------------------------------------------------------------------------
class ModPresetError(ValueError):
    """A modulation preset that cannot be loaded; each problem reads ``file:line: what``."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


# a YAML loader that keeps line numbers: engine/runtime/yaml_lines.py
_Dict, _List, _Loader = LineDict, LineList, LineLoader

MAX_PRESET_BYTES = 256 * 1024
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?\s*(beats?|bars?)?\s*$")


def preset_path(name: str) -> Path:
    """A shipped preset by name (``kick-pump`` -> presets/mod/kick-pump.yaml). Only names:
    a path from the network must not reach the file system."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ModPresetError([f"{str(name)[:60]!r}: a preset name is letters, digits, - _ ."])
    stem = name[:-5] if name.endswith(".yaml") else name
    path = PRESET_DIR / f"{stem}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ModPresetError([f"no modulation preset {name!r} (shipped: {shipped})"])
    return path


def _rate_beats(v: Any, beats_per_bar: int = 4) -> float:
    """4, "4 beats", "1 bar", "1/2 beat" -> beats."""
    if isinstance(v, bool):
        raise ValueError(f"rate: expected beats or bars, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = _RATE.match(v)
        if m:
            x = float(m.group(1)) / (float(m.group(2)) if m.group(2) else 1.0)
            return x * (beats_per_bar if (m.group(3) or "").startswith("bar") else 1)
    raise ValueError(f"rate: expected a number of beats, or '4 beats' / '2 bars', got {v!r}")


def parse_preset(
    text: str, file: str, params: Mapping[str, Any], targets: Callable[[], Any]
) -> dict[str, Any]:
    """The registry changes a preset stands for: every slot it names, and every other slot
    switched off. All problems are collected; ModPresetError lists them with file:line."""
    from engine.runtime.registry import ControlError, coerce

    if len(text.encode("utf-8", "replace")) > MAX_PRESET_BYTES:
        raise ModPresetError([f"{file}:1: preset larger than {MAX_PRESET_BYTES} bytes"])
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ModPresetError(
            [f"{file}:{mark.line + 1 if mark else 1}: YAML error: {e.problem or e}"]
        ) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ModPresetError([f"{file}:1: YAML error: {str(e)[:200]}"]) from None
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ModPresetError([f"{file}:1: a modulation preset is a mapping with slots:"])
    for k in doc:
        if k not in ("name", "description", "slots"):
            problems.append(
                f"{file}:{doc.lines.get(k, 1)}: unknown key {k!r} (name, description, slots)"
            )
    slots = doc.get("slots")
    if not isinstance(slots, list) or not slots:
        problems.append(
            f"{file}:{doc.lines.get('slots', doc.line)}: slots: must be a non-empty list"
        )
        raise ModPresetError(problems)
    if len(slots) > SLOTS:
        problems.append(f"{file}:{slots.line}: {len(slots)} slots, at most {SLOTS}")
    changes: dict[str, Any] = {}
    used: set[int] = set()
    known_targets = set(targets())
    for i, (item, line) in enumerate(zip(slots, slots.lines, strict=False), start=1):
        if not isinstance(item, dict):
            problems.append(f"{file}:{line}: slot {i}: expected a mapping (source:, target:, ...)")
            continue
        n = item.get("slot", i)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= SLOTS:
            problems.append(f"{file}:{item.lines.get('slot', line)}: slot: 1..{SLOTS}, got {n!r}")
            continue
        if n in used:
            problems.append(f"{file}:{item.lines.get('slot', line)}: slot {n} given twice")
            continue
        used.add(n)
        for k in item:
            if k != "slot" and k not in SLOT_KEYS:
                problems.append(
                    f"{file}:{item.lines.get(k, line)}: unknown key {k!r} ({', '.join(SLOT_KEYS)})"
                )
        for k in ("source", "target"):
            if k not in item:
                problems.append(f"{file}:{line}: slot {n}: {k}: is required")
        target = item.get("target")
        for k in SLOT_KEYS:
            if k not in item:
                continue
            v = item[k]
            where = f"{file}:{item.lines.get(k, line)}"
            try:
                if k == "rate":
                    v = _rate_beats(v)
                p = params[f"mod/{n}/{k}"]
                cv, warnings = coerce(p, v)
                if warnings:  # out of range is an error in a file: say it, do not clamp
                    raise ValueError(f"{k}: {v!r} is outside {p.range[0]:g}..{p.range[1]:g}")
                if k == "depth" and isinstance(target, str) and target.strip() in known_targets:
                    tp = params[target.strip()]
                    if tp.range is not None and abs(cv) > tp.range[1] - tp.range[0]:
                        raise ValueError(
                            f"depth {cv:g} is more than the whole range of {target}"
                            f" ({tp.range[0]:g}..{tp.range[1]:g})"
                        )
                changes[p.path] = cv
            except ControlError as e:
                problems.append(f"{where}: {e.reason if e.path == p.path else e}")
            except (ValueError, TypeError) as e:
                problems.append(f"{where}: {e}")
    if problems:
        raise ModPresetError(problems)
    out: dict[str, Any] = {}
    for n in range(1, SLOTS + 1):  # every slot: the preset's, or back to its default (off)
        for k in SLOT_KEYS:
            path = f"mod/{n}/{k}"
            out[path] = changes.get(path, params[path].default)
    return out


def read_preset(path: str | Path, params: Mapping[str, Any], targets: Callable[[], Any]) -> dict:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ModPresetError([f"{p}: cannot read: {e.strerror or e}"]) from None
    if len(raw) > MAX_PRESET_BYTES:
        raise ModPresetError([f"{p}:1: preset larger than {MAX_PRESET_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModPresetError([f"{p}:1: not UTF-8 text"]) from None
    return parse_preset(text, str(p), params, targets)
