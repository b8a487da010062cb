"""OSC feedback: applied values, status, errors and warnings back to the controller.

Values are echoed on their own address so a TouchDesigner OSC In CHOP (or a motorised
surface) shows what the engine really uses, whoever changed it (OSC, MIDI, a timeline).
A CHOP can only hold numbers: the state, prompt texts and errors are strings, so a
second, numbers-only target (``--osc-feedback-numeric HOST:PORT``) gets every feedback
message whose arguments are all numbers, for an OSC In CHOP; the main target keeps
everything, for an OSC In DAT. When the bridge closes (the engine shuts down) the last
message is ``/dd/status/state "stopped"``.
The registry calls our listener on the generation thread, so the listener only records
the latest value per path (bounded by the number of parameters, never a queue) and a
sender thread does the network I/O. Errors and query answers are sent at once by the
receiver thread: one small datagram per bad message, no queue to overflow.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from bridges.osc import addresses
from bridges.osc.wire import encode_message
from engine.runtime.registry import Change, ControlError, Registry

log = logging.getLogger(__name__)

Target = tuple[str, int]
STATE_ADDRESS = next(b.address for b in addresses.STATUS_ADDRESSES if b.status_key == "state")


class Feedback:
    """Where feedback goes and what is sent.

    target: a fixed host:port (``--osc-feedback``), else the last sender's host on
    ``port`` (9139 by default). ``enabled=False`` sends nothing at all (errors included).
    """

    def __init__(
        self,
        sock: socket.socket,
        registry: Registry,
        *,
        target: Target | None = None,
        port: int = 9139,
        enabled: bool = True,
        status: Callable[[], dict[str, Any]] | None = None,
        status_interval: float = 1.0,
        retarget_interval: float = 0.0,
        numeric: Target | None = None,
    ):
        self.sock = sock
        # Beyond loopback, a new last sender gets the whole state, and UDP senders can be
        # forged: the target moves at most once per retarget_interval, so forged senders
        # cannot turn the engine into a stream of full-state dumps at victims.
        self.retarget_interval = retarget_interval
        self._retargeted = float("-inf")
        self.numeric = numeric if enabled else None  # numbers-only target (OSC In CHOP)
        self.registry = registry
        self.fixed = target
        self.port = port
        self.enabled = enabled
        self.status = status
        self.status_interval = status_interval
        self._sender_host: str | None = None
        self._dirty: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._synced: tuple[Target | None, Target | None] | None = None
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.sent = 0
        self._engine_error: Any = None  # the engine's last error already sent on /dd/error
        self.limiter = RateLimitedLog()
        self.meter_interval = 0.05  # live source values (audio meters), when there are any
        self._meter_stop = threading.Event()
        self._meter_thread: threading.Thread | None = None

    # -- targets -----------------------------------------------------------------------
    def saw_sender(self, host: str) -> None:
        import time

        with self._cond:
            changed = host != self._sender_host
            if changed and self.fixed is None and self.retarget_interval:
                now = time.monotonic()
                if now - self._retargeted < self.retarget_interval:
                    return  # too soon after the last move: stay with the current target
                self._retargeted = now
            self._sender_host = host
            if changed and self.fixed is None:
                self._cond.notify()  # a new target gets the whole state

    @property
    def target(self) -> Target | None:
        if not self.enabled:
            return None
        if self.fixed is not None:
            return self.fixed
        if self._sender_host is None:
            return None
        return (self._sender_host, self.port)

    def reply_target(self, host: str, port: int | None = None) -> Target | None:
        """Where to answer a query from `host`: its own host, on the port it named, else on
        the configured feedback port for that host, else the default feedback port."""
        if not self.enabled:
            return None
        if port is not None:
            return (host, port)
        if self.fixed is not None and self.fixed[0] == host:
            return self.fixed
        return (host, self.port)

    # -- sending -----------------------------------------------------------------------
    def send(
        self, address: str, args: list[Any], target: Target | None = None, *, flow: bool = False
    ) -> None:
        """`flow`: part of the running feedback (values, status), which the numbers-only
        target also gets when every argument is a number; query answers and errors are not."""
        if flow and self.numeric is not None and args and all(_is_number(a) for a in args):
            self._sendto(address, args, self.numeric)
        target = target or self.target
        if target is None:
            return
        self._sendto(address, args, target)

    def _sendto(self, address: str, args: list[Any], target: Target) -> None:
        try:
            self.sock.sendto(encode_message(address, args), target)
            self.sent += 1
        except OSError as e:  # unreachable host, closed socket: feedback is best effort
            log.debug("OSC feedback to %s failed: %s", target, e)
        except Exception:  # noqa: BLE001 - an unencodable value must not stop the receiver
            log.exception("could not encode OSC feedback %s %r", address, args)

    def error(self, address: str, reason: str, target: Target | None = None) -> None:
        self.limiter.log(f"OSC {address} rejected: {reason}")
        self.send(addresses.ERROR, [address, reason], target)

    def warning(self, address: str, message: str, target: Target | None = None) -> None:
        self.limiter.log(f"OSC {address}: {message}")
        self.send(addresses.WARNING, [address, message], target)

    def send_value(
        self, path: str, target: Target | None = None, applied: bool = False, flow: bool = False
    ) -> None:
        """The value on its address: the latest (staged or applied, what a query asks
        for), or with ``applied`` the one in effect (what an echo reports)."""
        p = self.registry.param(path)
        value = self.registry.applied(path) if applied else self.registry.get(path)
        self.send(p.address, addresses.value_to_args(p, value), target, flow=flow)

    def send_all(
        self, target: Target | None = None, applied: bool = False, flow: bool = False
    ) -> None:
        for p in self.registry:
            if p.stateful:
                self.send_value(p.path, target, applied, flow)

    def send_status(
        self, target: Target | None = None, only: str | None = None, flow: bool = False
    ) -> None:
        if self.status is None:
            return
        try:
            st = self.status()
        except Exception:  # noqa: BLE001 - a status glitch must not stop feedback
            log.exception("engine.status() failed")
            return
        if only is None:
            err = st.get("last_error")
            if err and err != self._engine_error:  # once per new problem, not every second
                self.send(addresses.ERROR, ["engine", str(err)[:300]], target)
            self._engine_error = err
        for b in addresses.STATUS_ADDRESSES:
            if only is not None and b.address != only:
                continue
            args = addresses.status_args(st.get(b.status_key))
            if args is not None:
                self.send(b.address, args, target, flow=flow)

    def send_meters(self, target: Target | None = None) -> int:
        """The modulation layer's live sources on ``/dd/status/audio/*`` (levels, bands,
        onsets: their peak since the last update; counters, tempo), the audio input's state on ``/dd/status/audio`` and each
        active slot's source value on ``/dd/status/mod/{n}``. Returns messages sent."""
        mod = getattr(self.registry, "modulator", None)
        bank = getattr(mod, "bank", None)
        if bank is None:
            return 0
        sent = 0
        for k, v in sorted(bank.meters().items()):
            if k.startswith("audio/"):
                self.send(f"/dd/status/{k}", [float(v)], target)
                sent += 1
        state = bank.status.get("audio")
        if state:
            self.send("/dd/status/audio", [state], target)
            sent += 1
        for n, v in sorted(getattr(mod, "sources", {}).items()):
            self.send(f"/dd/status/mod/{n}", [float(v)], target)
            sent += 1
        return sent

    def _meter_loop(self) -> None:
        """Meters at about 20 Hz, only while a source is writing (nothing when idle)."""
        bank = getattr(getattr(self.registry, "modulator", None), "bank", None)
        seen = (-1, "")
        while bank is not None and not self._meter_stop.wait(self.meter_interval):
            mark = (bank.pushed, bank.status.get("audio", ""))
            target = self.target
            if mark == seen or target is None:
                continue
            seen = mark
            try:
                self.send_meters(target)
            except Exception:  # noqa: BLE001 - meters must never stop
                log.exception("OSC meters failed")

    # -- the registry listener and the sender thread ----------------------------------
    def _on_change(self, change: Change) -> None:
        with self._cond:
            self._dirty[change.path] = change.value
            self._cond.notify()

    def start(self) -> None:
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._thread = threading.Thread(target=self._run, name="osc-feedback", daemon=True)
        self._thread.start()
        self._meter_thread = threading.Thread(
            target=self._meter_loop, name="osc-meters", daemon=True
        )
        self._meter_thread.start()

    def close(self) -> None:
        """Stop, and say so: the bridge closes when the engine shuts down, and a controller
        showing "running" for a stopped engine would mislead the operator."""
        self.limiter.flush(force=True)
        if self._unsubscribe:
            self._unsubscribe()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=2)
        self._meter_stop.set()
        if self._meter_thread:
            self._meter_thread.join(timeout=2)
        self.send(STATE_ADDRESS, ["stopped"], flow=True)

    def _run(self) -> None:
        import time

        next_status = time.monotonic() + self.status_interval
        while True:
            with self._cond:
                while (
                    not self._stop
                    and not self._dirty
                    and (self.target, self.numeric) == self._synced
                    and time.monotonic() < next_status
                ):
                    self._cond.wait(max(0.0, next_status - time.monotonic()))
                if self._stop:
                    return
                dirty, self._dirty = self._dirty, {}
                target = self.target
                key = (target, self.numeric)
                resync = (target is not None or self.numeric is not None) and key != self._synced
                self._synced = key
            try:
                if resync:  # a new target: everything in effect (staged values follow)
                    self.send_all(target, applied=True, flow=True)
                else:
                    for path, value in dirty.items():
                        p = self.registry.param(path)
                        args = addresses.value_to_args(p, value)
                        self.send(p.address, args, target, flow=True)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + self.status_interval
                    self.send_status(target, flow=True)
                self.limiter.flush()  # a flood's summary, once its window is over
            except ControlError:
                log.exception("feedback for an unknown parameter")
            except Exception:  # noqa: BLE001 - feedback must never stop
                log.exception("OSC feedback failed")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float))  # (booleans go out as 0/1)


class RateLimitedLog:
    """Log lines for a flood: the first of each distinct text, at most `burst` per `window`
    seconds; identical repeats and the overflow are counted and summarised in one line when
    the window ends (or on `flush`). A flood of bad packets must not turn into a flood of
    log lines (5,000 datagrams once wrote 5.7 MB); each one is still answered over OSC."""

    MAX_KEYS = 1024  # distinct texts remembered per window; more are counted as overflow

    def __init__(
        self,
        logger: logging.Logger = log,
        burst: int = 20,
        window: float = 5.0,
        clock: Callable[[], float] | None = None,
    ):
        import time

        self.logger = logger
        self.burst, self.window = burst, window
        self.clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._start = self.clock()
        self._seen: dict[str, int] = {}
        self._logged = 0
        self._suppressed = 0
        self.total_logged = 0
        self.total_suppressed = 0

    def log(self, text: str, *, key: str | None = None, exc_info: Any = None) -> bool:
        """Log `text` unless it repeats or the window's budget is spent; True if logged."""
        key = (key or text)[:256]
        with self._lock:
            summary = self._roll()
            seen = self._seen.get(key)
            if seen is None and len(self._seen) < self.MAX_KEYS:
                self._seen[key] = 1
            elif seen is not None:
                self._seen[key] = seen + 1
            show = seen is None and self._logged < self.burst
            if show:
                self._logged += 1
                self.total_logged += 1
            else:
                self._suppressed += 1
                self.total_suppressed += 1
        if summary:
            self.logger.warning("%s", summary)
        if show:
            self.logger.warning("%s", text, exc_info=exc_info)
        return show

    def flush(self, force: bool = False) -> None:
        """Write the summary now if the window is over (or `force`)."""
        with self._lock:
            summary = self._roll(force)
        if summary:
            self.logger.warning("%s", summary)

    def _roll(self, force: bool = False) -> str | None:
        now = self.clock()
        if not force and now - self._start <= self.window:
            return None
        summary = None
        if self._suppressed:
            repeats = sorted(self._seen.items(), key=lambda kv: -kv[1])[:3]
            common = "; ".join(f"{n}x {k[:120]}" for k, n in repeats if n > 1)
            summary = (
                f"OSC: {self._suppressed} more messages not logged in the last"
                f" {now - self._start:.0f} s" + (f" (most repeated: {common})" if common else "")
            )
        self._start, self._seen, self._logged, self._suppressed = now, {}, 0, 0
        return summary
