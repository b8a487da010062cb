"""The control registry: the one place a live parameter is declared, set and read.

Everything that steers the stream (OSC, MIDI, timelines, the command line, tests) goes
through here, and everything that reports on it (OSC feedback, OSCQuery, the address
reference, the control log) reads from here. A new parameter is one new `Param`.

How values move:

- ``set`` / ``set_many`` validate and coerce at once (a bad value raises `ControlError`
  and stages nothing), then *stage* the change. Staged values coalesce: the latest value
  of a path wins, so a controller flood never queues work or loses the last value.
- ``begin_block`` is called by the generation loop at each block boundary: it applies
  everything staged (and every scheduled change that is due) atomically, returns the
  `BlockControls` snapshot that block uses, and tells listeners what changed.
- Parameters with ``applies="immediate"`` skip staging (tempo, quantise mode, record...).
- ``when=`` schedules a change for a wall-clock time (beat-quantised changes): it lands
  at the first block that begins at or after ``when - lookahead``. ``quantized=True``
  (what bridges pass for performer input) asks ``registry.quantizer`` (installed by the
  tempo bridge; returns the next boundary time, or None when quantise is off) for ``when``.
- Triggers (``type="trigger"``) carry no state: firing one records an event for the next
  block. Actions (a `Param` with ``expand``) turn one message into several changes, e.g.
  ``prompt`` sets slot 1 and mutes the others, all in the same block.

Thread-safe: bridges call from their own threads; the generation thread calls
``begin_block``. The generation thread never waits long on the lock: a control thread that
holds it for good (a stuck listener, a bug) must not freeze the show. ``begin_block`` waits
at most `BLOCK_WAIT_S`, then runs the block with the last block's controls, held, and says
so (`held_blocks`, an error in the log at most every `HELD_LOG_S`); what was staged waits
for the first block that gets the lock. ``applied`` and the listener list are read without
the lock, and ``pending_within`` (asked before every denoising step) gives up after
`STEP_WAIT_S`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TYPES = ("float", "int", "bool", "str", "trigger", "int_list", "json")
APPLIES = ("block", "immediate", "reload")
MAX_STRING = 4096  # a prompt longer than this is a mistake, not a prompt
MAX_SCHEDULED = 256  # scheduled change groups held at once
BLOCK_WAIT_S = 0.1  # the longest begin_block waits for the lock before holding the controls
STEP_WAIT_S = 0.01  # the longest pending_within waits (it is asked again at the next step)
HELD_LOG_S = 10.0  # at most one "held" error in the log per this many seconds


class ControlError(ValueError):
    """A control change that cannot be taken: unknown path or bad value. Nothing changed."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Param:
    """One live parameter.

    path: slash-separated, lower case, 1-based slots (``prompt/2/weight``); the OSC
        address is ``/dd/`` + path.
    range: inclusive (min, max) for numbers; values outside are clamped with a warning.
    choices: allowed strings, for enumerations.
    validate: extra check/normalisation, raises ValueError with the reason.
    expand: for actions, maps the coerced value (and a read-only view of current values)
        to the changes it stands for.
    """

    path: str
    type: str
    default: Any = None
    description: str = ""
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    unit: str = ""
    applies: str = "block"
    validate: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)
    expand: Callable[[Any, Callable[[str], Any]], Mapping[str, Any]] | None = field(
        default=None, compare=False, repr=False
    )
    max_len: int = MAX_STRING

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"{self.path}: unknown type {self.type!r}")
        if self.applies not in APPLIES:
            raise ValueError(f"{self.path}: unknown applies {self.applies!r}")
        if not self.path or self.path != self.path.strip("/") or self.path.lower() != self.path:
            raise ValueError(f"bad parameter path {self.path!r}")

    @property
    def stateful(self) -> bool:
        """Holds a value (triggers and actions do not)."""
        return self.type != "trigger" and self.expand is None

    @property
    def address(self) -> str:
        return "/dd/" + self.path


@dataclass
class SetResult:
    """What a set did: the coerced values staged (or applied, for immediate params),
    the triggers fired, and warnings (clamping) to report back to the sender."""

    values: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BlockControls:
    """The controls one block used: its record for feedback, replay and the control log."""

    block: int
    time: float
    values: Mapping[str, Any]
    changed: Mapping[str, Any]
    events: tuple[str, ...]
    received: float | None  # earliest arrival time (time.time()) of a change in this block

    def __getitem__(self, path: str) -> Any:
        return self.values[path]

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "time": self.time,
            "values": dict(self.values),
            "changed": dict(self.changed),
            "events": list(self.events),
        }


@dataclass(frozen=True)
class Change:
    """An applied change, as listeners see it. ``block`` is None for immediate params."""

    path: str
    value: Any
    block: int | None


def _finite(x: float, path: str) -> float:
    if not math.isfinite(x):
        raise ControlError(path, f"not a finite number: {x!r}")
    return x


_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no", ""}


MAX_JSON_DEPTH = 16  # nesting of [ ] and { }; a prompt set needs 2


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # linear: the two branches never overlap
_JSON_INNERMOST = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


def _check_json_depth(path: str, text: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH before parsing it: json.loads recurses
    per level (a 32 KB string of '[' raised RecursionError out of the OSC handler), and a
    deep value would recurse again wherever it is dumped. Strings are blanked, then the
    innermost brackets peeled off once per level: all in C, at most MAX_JSON_DEPTH passes."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    t = _JSON_STRING.sub('""', text)
    for _ in range(MAX_JSON_DEPTH):
        peeled = _JSON_INNERMOST.sub("", t)
        if peeled == t:
            return  # unbalanced: json.loads names the syntax error
        t = peeled
        if "[" not in t and "{" not in t:
            return
    raise ControlError(path, f"JSON nested more than {MAX_JSON_DEPTH} levels deep")


def coerce(param: Param, value: Any) -> tuple[Any, list[str]]:
    """Turn an incoming value into the parameter's type, the way TouchDesigner-style hosts
    expect: floats for ints are rounded, out-of-range numbers clamped (with a warning),
    numbers as strings accepted. Raises ControlError naming what was wrong."""
    p, warnings = param.path, []
    t = param.type
    if t == "trigger":
        if isinstance(value, str):
            value = value.strip().lower() not in _FALSE
        elif value is None:
            value = True
        elif isinstance(value, (int, float)):
            value = bool(value) and not (isinstance(value, float) and math.isnan(value))
        else:
            raise ControlError(p, f"a trigger takes a number, got {type(value).__name__}")
        return value, warnings
    if t in ("float", "int"):
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ControlError(p, f"expected a number, got {value[:40]!r}") from None
        if not isinstance(value, (int, float)):
            raise ControlError(p, f"expected a number, got {type(value).__name__}")
        value = _finite(float(value), p) if isinstance(value, float) else value
        if t == "int":
            value = int(round(value))
        else:
            value = float(value)
        if param.range is not None:
            lo, hi = param.range
            if value < lo or value > hi:
                clamped = min(max(value, lo), hi)
                clamped = int(clamped) if t == "int" else float(clamped)
                warnings.append(f"{p}: {value} out of range [{lo}, {hi}], clamped to {clamped}")
                value = clamped
    elif t == "bool":
        if isinstance(value, str):
            s = value.strip().lower()
            if s in _TRUE:
                value = True
            elif s in _FALSE:
                value = False
            else:
                raise ControlError(p, f"expected on/off, got {value[:40]!r}")
        elif isinstance(value, (int, float)):
            value = bool(value) and not (isinstance(value, float) and math.isnan(value))
        else:
            raise ControlError(p, f"expected on/off, got {type(value).__name__}")
    elif t == "str":
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ControlError(p, "string is not valid UTF-8") from None
        if not isinstance(value, str):
            raise ControlError(p, f"expected a string, got {type(value).__name__}")
        if len(value) > param.max_len:
            raise ControlError(p, f"string of {len(value)} characters, more than {param.max_len}")
        if "\x00" in value:
            raise ControlError(p, "string contains a NUL character")
        if param.choices is not None:
            v = value.strip().lower()
            if v not in param.choices:
                raise ControlError(p, f"{value[:40]!r} is not one of {', '.join(param.choices)}")
            value = v
    elif t == "int_list":
        if isinstance(value, str):
            s = value.strip()
            if len(s) > param.max_len:
                raise ControlError(p, f"value of {len(s)} characters is too long")
            _check_json_depth(p, s)
            try:
                value = (
                    json.loads(s) if s.startswith("[") else [x for x in s.replace(",", " ").split()]
                )
            except json.JSONDecodeError as e:
                raise ControlError(p, f"not a JSON list: {e.msg}") from None
            except RecursionError:  # unbalanced and deep: the depth check let json decide
                raise ControlError(p, "JSON nested too deeply") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ControlError(p, f"expected a list of integers, got {type(value).__name__}")
        out = []
        for x in value:
            try:
                f = float(x)
            except (TypeError, ValueError):
                raise ControlError(p, f"{x!r} is not a number") from None
            if not math.isfinite(f) or f != round(f):
                raise ControlError(p, f"{x!r} is not an integer")
            out.append(int(f))
        value = out
    elif t == "json":
        if isinstance(value, str):
            if len(value) > param.max_len:
                raise ControlError(p, f"JSON of {len(value)} characters, more than {param.max_len}")
            _check_json_depth(p, value)
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ControlError(p, f"not valid JSON: {e.msg} at character {e.pos}") from None
            except RecursionError:  # unbalanced and deep: the depth check let json decide
                raise ControlError(p, "JSON nested too deeply") from None
    if param.validate is not None:
        try:
            value = param.validate(value)
        except ControlError:
            raise
        except (ValueError, TypeError) as e:
            raise ControlError(p, str(e)) from None
    return value, warnings


class Registry:
    """See the module docstring."""

    def __init__(self, params: Iterable[Param] = (), *, clock: Callable[[], float] = time.time):
        self._params: dict[str, Param] = {}
        self._values: dict[str, Any] = {}
        self._pending: dict[str, tuple[int, Any, float]] = {}  # path -> (seq, value, received)
        self._events: dict[str, float] = {}  # trigger path -> received
        self._scheduled: list[tuple[float, int, dict[str, Any], tuple[str, ...], float]] = []
        self._seq = 0
        self._lock = threading.RLock()
        # replaced, never changed in place: _notify reads it without the lock
        self._listeners: tuple[Callable[[Change], None], ...] = ()
        self.held_blocks = 0  # blocks run with the last controls: the lock was not free
        self._held_logged = -math.inf
        self._notifying = threading.local()  # per thread: changes waiting for delivery
        self._last: BlockControls | None = None
        self.clock = clock
        self.lookahead = 0.0  # seconds; set from the measured pipeline latency
        self.quantizer: Callable[[], float | None] | None = None
        # The modulation layer (engine/runtime/modulation.py), installed by make_registry:
        # (base values, now, block) -> the modulated values of the paths it moves. Called
        # once per block inside begin_block; the base values are never overwritten.
        self.modulator: Callable[[Mapping[str, Any], float, int], Mapping[str, Any]] | None = None
        self.tempo_grid: Any = None  # the tempo bridge's BeatGrid, when one runs
        self._modulated: frozenset[str] = frozenset()
        for p in params:
            self.declare(p)

    # -- declaration -------------------------------------------------------------------
    def declare(self, param: Param, *, replace: bool = False) -> None:
        """Add a parameter. `replace` swaps one already declared for a copy with, say, a
        check of the owner's (the engine checks that a recording can start, so a refusal
        is a /dd/error with the reason); its current value is kept."""
        with self._lock:
            if replace:
                if param.path not in self._params:
                    raise ValueError(f"parameter {param.path!r} is not declared")
                self._params[param.path] = param
                return
            if param.path in self._params:
                raise ValueError(f"parameter {param.path!r} declared twice")
            if param.stateful:
                value, _ = coerce(param, param.default)
                self._values[param.path] = value
            self._params[param.path] = param

    def param(self, path: str) -> Param:
        p = self._params.get(_norm(path))
        if p is None:
            raise ControlError(path, "unknown parameter")
        return p

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and _norm(path) in self._params

    def __iter__(self) -> Iterator[Param]:
        return iter(list(self._params.values()))

    def __len__(self) -> int:
        return len(self._params)

    # -- reading -----------------------------------------------------------------------
    def get(self, path: str) -> Any:
        """The latest value: staged if one is waiting, else the applied one. This is the
        'current value' a controller's pickup compares against."""
        path = _norm(path)
        with self._lock:
            p = self.param(path)
            if not p.stateful:
                raise ControlError(
                    path, f"{'a trigger' if p.type == 'trigger' else 'an action'} has no value"
                )
            if path in self._pending:
                return self._pending[path][1]
            return self._values[path]

    def applied(self, path: str) -> Any:
        """The value in effect for the block now running. Read without the lock (one dict
        read is atomic): the generation loop asks it every turn."""
        path = _norm(path)
        self.param(path)
        return self._values[path]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    @property
    def last_block(self) -> BlockControls | None:
        return self._last

    # -- writing -----------------------------------------------------------------------
    def set(
        self, path: str, value: Any = None, *, when: float | None = None, quantized: bool = False
    ) -> SetResult:
        return self.set_many([(path, value)], when=when, quantized=quantized)

    def set_many(
        self,
        changes: Mapping[str, Any] | Sequence[tuple[str, Any]],
        *,
        when: float | None = None,
        quantized: bool = False,
    ) -> SetResult:
        """Validate all changes, then stage them together (all land in the same block).
        Raises ControlError for the first bad one; then nothing is staged."""
        items = list(changes.items()) if isinstance(changes, Mapping) else list(changes)
        with self._lock:
            result = self._resolve(items)
            now = self.clock()
            if when is None and quantized and self.quantizer is not None:
                when = self.quantizer()
            if when is not None and when > now:
                if len(self._scheduled) >= MAX_SCHEDULED:
                    raise ControlError(
                        items[0][0] if items else "?", "too many scheduled changes waiting"
                    )
                immediate = {
                    k: v for k, v in result.values.items() if self._params[k].applies == "immediate"
                }
                later = {k: v for k, v in result.values.items() if k not in immediate}
                fired = [e for e in result.events if self._params[e].applies == "immediate"]
                later_events = tuple(e for e in result.events if e not in fired)
                self._apply_immediate(immediate)
                self._seq += 1
                self._scheduled.append((when, self._seq, later, later_events, now))
                self._scheduled.sort(key=lambda s: (s[0], s[1]))
                self._notify([Change(e, True, None) for e in fired])
                return result
            immediate = {}
            for k, v in result.values.items():
                if self._params[k].applies == "immediate":
                    immediate[k] = v
                else:
                    self._seq += 1
                    prev = self._pending.get(k)
                    self._pending[k] = (self._seq, v, prev[2] if prev else now)
            fired_now = [e for e in result.events if self._params[e].applies == "immediate"]
            for e in result.events:
                if e not in fired_now:
                    self._events.setdefault(e, now)
            self._apply_immediate(immediate)
        self._notify([Change(e, True, None) for e in fired_now])
        return result

    def _resolve(self, items: list[tuple[str, Any]]) -> SetResult:
        """Coerce and expand actions, in order; later changes of a path win."""
        result = SetResult()
        for path, value in items:
            path = _norm(path)
            p = self.param(path)
            v, warnings = coerce(p, value)
            result.warnings.extend(warnings)
            if p.expand is not None:
                if p.type == "trigger" and not v:
                    continue

                def view(q: str, _staged=result.values) -> Any:
                    return _staged[q] if q in _staged else self.get(q)

                try:
                    expanded = dict(p.expand(v, view))
                except ControlError:
                    raise
                except (ValueError, TypeError, KeyError) as e:
                    raise ControlError(path, str(e)) from None
                sub = self._resolve(list(expanded.items()))
                result.values.update(sub.values)
                result.events.extend(sub.events)
                result.warnings.extend(sub.warnings)
            elif p.type == "trigger":
                if v:
                    result.events.append(path)
            else:
                result.values.pop(path, None)  # keep insertion order = latest
                result.values[path] = v
        return result

    def _apply_immediate(self, values: Mapping[str, Any]) -> None:
        changed = []
        for k, v in values.items():
            if self._values.get(k) != v:
                self._values[k] = v
                changed.append(Change(k, v, None))
        self._notify(changed)

    # -- the block boundary ------------------------------------------------------------
    def begin_block(
        self, block: int, now: float | None = None, *, wait: float = BLOCK_WAIT_S
    ) -> BlockControls:
        """Apply what is staged and due, atomically, and return the block's controls. When
        the lock is not free within `wait` seconds, the last block's controls, held (module
        docstring)."""
        if not self._lock.acquire(timeout=wait):
            return self._held(block, now)
        try:
            now = self.clock() if now is None else now
            due: list[tuple[int, str, Any, float]] = [
                (seq, k, v, rec) for k, (seq, v, rec) in self._pending.items()
            ]
            events = dict(self._events)
            keep = []
            for when, seq, values, evs, rec in self._scheduled:
                if when - self.lookahead <= now:
                    due.extend((seq, k, v, rec) for k, v in values.items())
                    for e in evs:
                        events.setdefault(e, rec)
                else:
                    keep.append((when, seq, values, evs, rec))
            self._scheduled = keep
            self._pending.clear()
            self._events.clear()
            due.sort(key=lambda d: d[0])
            changed: dict[str, Any] = {}
            received = min([d[3] for d in due] + list(events.values()), default=None)
            for _, k, v, _ in due:
                if self._values[k] != v or k in changed:
                    self._values[k] = v
                    changed[k] = v
            values = dict(self._values)
            notify = dict(changed)
            if self.modulator is not None or self._modulated:
                values, changed = self._modulate(values, changed, now, block)
            controls = BlockControls(
                block=block,
                time=now,
                values=values,
                changed=changed,
                events=tuple(sorted(events)),
                received=received,
            )
            self._last = controls
        finally:
            self._lock.release()
        self._notify([Change(k, v, block) for k, v in notify.items()])
        return controls

    def _held(self, block: int, now: float | None) -> BlockControls:
        """The block's controls while another thread holds the lock: the last block's
        values, nothing changed, nothing staged taken (it waits, in order, for the lock)."""
        now = self.clock() if now is None else now
        last = self._last
        values = dict(last.values) if last is not None else self._values_unlocked()
        controls = BlockControls(
            block=block, time=now, values=values, changed={}, events=(), received=None
        )
        self._last = controls
        self.held_blocks += 1
        if time.monotonic() - self._held_logged >= HELD_LOG_S:
            self._held_logged = time.monotonic()
            log.error(
                "registry: another thread has held the controls for over %.2f s; block %d "
                "runs with the last controls (%d held so far); changes wait until it lets go",
                BLOCK_WAIT_S,
                block,
                self.held_blocks,
            )
        return controls

    def _values_unlocked(self) -> dict[str, Any]:
        """A copy of the applied values without the lock (the first block only: there is
        no last block to hold). A copy that meets a concurrent declare is tried again."""
        while True:
            try:
                return dict(self._values)
            except RuntimeError:  # dictionary changed size during iteration
                continue

    def _modulate(
        self, values: dict[str, Any], changed: dict[str, Any], now: float, block: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Base values + modulation for this block. ``changed`` then holds the values the
        block uses that differ from the last block's (so the block driver and the control
        log see the modulated values); listeners still hear only base changes."""
        mods: Mapping[str, Any] = {}
        if self.modulator is not None:
            try:
                mods = self.modulator(values, now, block)
            except Exception:  # noqa: BLE001 - a modulation bug must not stop the stream
                log.exception("modulation failed at block %d; base values used", block)
        prev = self._last.values if self._last is not None else None
        out = dict(values)
        out.update(mods)
        eff = {k: out[k] for k in changed}
        for k in self._modulated.union(mods):
            if prev is None or prev.get(k) != out[k]:
                eff[k] = out[k]
        self._modulated = frozenset(mods)
        return out, eff

    def pending_within(self, paths: frozenset[str]) -> tuple[dict[str, Any], float] | None:
        """The staged changes, not taken (begin_block still applies them), when every one
        of them lies in `paths`, none of `paths` is modulated, and no trigger is waiting:
        (the base values of `paths` with the changes applied, when the earliest arrived). None
        otherwise, or when nothing is staged. A block in flight uses this to take a prompt
        change early; anything else staged beside it keeps the whole batch for the block
        boundary, so changes sent together still land together. Only `paths`' values
        are returned (it is asked before every denoising step: kept cheap)."""
        if not self._lock.acquire(timeout=STEP_WAIT_S):
            return None  # asked again before the next step
        try:
            if not self._pending or self._events:
                return None
            if any(k not in paths for k in self._pending):
                return None
            if self._modulated.intersection(paths):
                return None
            values = {k: self._values[k] for k in paths if k in self._values}
            for k, (_, v, _) in self._pending.items():
                values[k] = v
            received = min(rec for _, _, rec in self._pending.values())
            return values, received
        finally:
            self._lock.release()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._events) + len(self._scheduled)

    # -- listeners ---------------------------------------------------------------------
    def subscribe(self, listener: Callable[[Change], None]) -> Callable[[], None]:
        """Call `listener` for every applied change. Returns an unsubscribe function.
        A listener that raises is logged and kept: feedback must never stop the stream."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(fn for fn in self._listeners if fn is not listener)

        return unsubscribe

    def echo(self, path: str) -> None:
        """Tell the listeners the value in effect again, unchanged: a controller whose change
        was refused (its toggle already shows the new state) is set back."""
        p = self.param(path)
        if p.stateful:
            self._notify([Change(p.path, self.applied(p.path), None)])

    def _notify(self, changes: list[Change]) -> None:
        """Every listener sees every change, in the order the changes happened. A listener
        that changes a value itself (the engine turning `record` back off when a recording
        cannot start) has that change delivered after the current one has reached all
        listeners, so the last value a listener sees is the value in effect."""
        if not changes:
            return
        queue = getattr(self._notifying, "queue", None)
        if queue is not None:  # inside a listener on this thread: deliver after this one
            queue.extend(changes)
            return
        queue = self._notifying.queue = list(changes)
        try:
            listeners = self._listeners  # a tuple, replaced whole: no lock needed
            i = 0
            while i < len(queue):
                c = queue[i]
                i += 1
                for fn in listeners:
                    try:
                        fn(c)
                    except Exception:  # noqa: BLE001 - a listener must not break the loop
                        log.exception("control listener failed on %s", c.path)
        finally:
            self._notifying.queue = None

    # -- reference ---------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Every parameter as plain data (the OSC reference, OSCQuery and docs use this)."""
        out = []
        for p in self:
            out.append(
                {
                    "path": p.path,
                    "address": p.address,
                    "type": p.type,
                    "range": list(p.range) if p.range else None,
                    "choices": list(p.choices) if p.choices else None,
                    "default": p.default,
                    "unit": p.unit,
                    "applies": p.applies,
                    "description": p.description,
                    "value": self.get(p.path) if p.stateful else None,
                }
            )
        return out


def _norm(path: str) -> str:
    if not isinstance(path, str):
        raise ControlError(repr(path), "parameter path must be a string")
    p = path.strip()
    if p.startswith("/dd/"):
        p = p[4:]
    return p.strip("/").lower()
