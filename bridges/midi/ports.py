"""MIDI ports through mido + python-rtmidi: regex choice, several at once, reconnect.

A `PortWatcher` lists the port names about once a second, opens every port whose name
matches and is not open yet, and closes ports that went away: unplug a controller mid-set
and plug it back, and it is picked up again (with its LEDs refreshed, for outputs).
Errors say what is missing: no backend, no ALSA sequencer, no matching port (with the
names that are there), and on Windows that virtual ports need loopMIDI.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class MidiUnavailable(RuntimeError):
    """No MIDI backend or no port: the message says which and what to do."""


def _hint(e: BaseException) -> str:
    s = str(e)
    if "ALSA" in s or "/dev/snd" in s:
        return (
            " (no ALSA sequencer: /dev/snd/seq is missing; load the snd-seq module, or in a"
            " container pass --device /dev/snd)"
        )
    if isinstance(e, ImportError):
        return " (install python-rtmidi: pip install python-rtmidi)"
    return ""


def _mido():
    try:
        import mido

        mido.backend.load()
    except Exception as e:  # noqa: BLE001 - any backend failure is the same message
        raise MidiUnavailable(f"no MIDI backend: {e}{_hint(e)}") from None
    return mido


def input_names() -> list[str]:
    mido = _mido()
    try:
        return list(mido.get_input_names())
    except Exception as e:  # noqa: BLE001
        raise MidiUnavailable(f"cannot list MIDI inputs: {e}{_hint(e)}") from None


def output_names() -> list[str]:
    mido = _mido()
    try:
        return list(mido.get_output_names())
    except Exception as e:  # noqa: BLE001
        raise MidiUnavailable(f"cannot list MIDI outputs: {e}{_hint(e)}") from None


def open_virtual(name: str, direction: str = "input", **kwargs: Any) -> Any:
    """A virtual port other programs can connect to (ALSA / CoreMIDI only)."""
    if sys.platform.startswith("win"):
        raise MidiUnavailable(
            "virtual MIDI ports do not exist on Windows: create a loopMIDI port and "
            "choose it by name (e.g. --midi 'loopMIDI')"
        )
    mido = _mido()
    try:
        if direction == "input":
            return mido.open_input(name, virtual=True, **kwargs)
        return mido.open_output(name, virtual=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise MidiUnavailable(f"cannot open virtual MIDI port {name!r}: {e}{_hint(e)}") from None


def compile_patterns(patterns: str | Iterable[str]) -> list[re.Pattern[str]]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    out = []
    for p in pats:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"bad MIDI port regex {p!r}: {e}") from None
    return out


class PortWatcher:
    """Keeps every port matching `patterns` open (inputs call `on_message(name, msg, t)`
    with t = arrival time on `clock`; outputs call `on_open(name, port)` after each open).

    `names` and `opener` default to mido; tests inject them because hardware ports
    cannot exist on a CI machine.
    """

    def __init__(
        self,
        patterns: str | Iterable[str],
        *,
        direction: str = "input",
        on_message: Callable[[str, Any, float], None] | None = None,
        on_open: Callable[[str, Any], None] | None = None,
        on_close: Callable[[str], None] | None = None,
        poll: float = 1.0,
        names: Callable[[], list[str]] | None = None,
        opener: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.time,
        exclude: Callable[[str], bool] | None = None,
    ):
        if direction not in ("input", "output"):
            raise ValueError(f"direction must be input or output, got {direction!r}")
        self.patterns = compile_patterns(patterns)
        self.direction = direction
        self.on_message = on_message
        self.on_open = on_open
        self.on_close = on_close
        self.poll = poll
        self.names = names or (input_names if direction == "input" else output_names)
        self.opener = opener
        self.clock = clock
        self.exclude = exclude  # e.g. our own virtual ports
        self.ports: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_none = False

    def matches(self, name: str) -> bool:
        if self.exclude is not None and self.exclude(name):
            return False
        return any(p.search(name) for p in self.patterns)

    def _open(self, name: str) -> Any:
        if self.opener is not None:
            if self.direction == "input":
                return self.opener(name, callback=self._callback(name))
            return self.opener(name)
        import mido

        if self.direction == "input":
            return mido.open_input(name, callback=self._callback(name))
        return mido.open_output(name)

    def _callback(self, name: str) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            t = self.clock()
            try:
                if self.on_message is not None:
                    self.on_message(name, msg, t)
            except Exception:  # noqa: BLE001 - one bad message must not kill the port
                log.exception("MIDI message from %s failed: %s", name, msg)

        return cb

    def scan(self) -> tuple[list[str], list[str]]:
        """One look at the port list: open new matches, drop vanished ports."""
        available = self.names()
        opened, closed = [], []
        with self._lock:
            for name in list(self.ports):
                if name not in available:
                    port = self.ports.pop(name)
                    closed.append(name)
                    try:
                        port.close()
                    except Exception:  # noqa: BLE001 - it is gone already
                        pass
            for name in available:
                if name in self.ports or not self.matches(name):
                    continue
                try:
                    self.ports[name] = self._open(name)
                except Exception as e:  # noqa: BLE001 - try again next scan
                    log.warning("cannot open MIDI %s %r: %s", self.direction, name, e)
                    continue
                opened.append(name)
        for name in closed:
            log.warning("MIDI %s %r went away; waiting for it to come back", self.direction, name)
            if self.on_close is not None:
                self.on_close(name)
        for name in opened:
            log.info("MIDI %s %r open", self.direction, name)
            if self.on_open is not None:
                self.on_open(name, self.ports[name])
        if not self.ports and not self._warned_none:
            pats = ", ".join(p.pattern for p in self.patterns)
            log.warning(
                "no MIDI %s matches %s; ports now: %s",
                self.direction,
                pats,
                ", ".join(available) or "none",
            )
            self._warned_none = True
        elif self.ports:
            self._warned_none = False
        return opened, closed

    def start(self) -> PortWatcher:
        self.scan()
        self._thread = threading.Thread(
            target=self._run, name=f"dreamdeck-midi-{self.direction}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.scan()
            except MidiUnavailable as e:
                log.warning("%s", e)
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("MIDI port scan failed")

    def send(self, msg: Any) -> None:
        """Send to every open output (feedback); a port that fails is dropped and reopened
        on the next scan."""
        with self._lock:
            ports = list(self.ports.items())
        for name, port in ports:
            try:
                port.send(msg)
            except Exception as e:  # noqa: BLE001
                log.warning("MIDI output %r failed (%s); will reopen", name, e)
                with self._lock:
                    self.ports.pop(name, None)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            ports, self.ports = list(self.ports.values()), {}
        for p in ports:
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass
