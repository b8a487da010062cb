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
        numeric: Target | None = None,
    ):
        self.sock = sock
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
        self._log = _RateLimitedLog()

    # -- targets -----------------------------------------------------------------------
    def saw_sender(self, host: str) -> None:
        with self._cond:
            changed = host != self._sender_host
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
        self._log.log(f"OSC {address} rejected: {reason}")
        self.send(addresses.ERROR, [address, reason], target)

    def warning(self, address: str, message: str, target: Target | None = None) -> None:
        self._log.log(f"OSC {address}: {message}")
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
        for b in addresses.STATUS_ADDRESSES:
            if only is not None and b.address != only:
                continue
            args = addresses.status_args(st.get(b.status_key))
            if args is not None:
                self.send(b.address, args, target, flow=flow)

    # -- the registry listener and the sender thread ----------------------------------
    def _on_change(self, change: Change) -> None:
        with self._cond:
            self._dirty[change.path] = change.value
            self._cond.notify()

    def start(self) -> None:
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._thread = threading.Thread(target=self._run, name="osc-feedback", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop, and say so: the bridge closes when the engine shuts down, and a controller
        showing "running" for a stopped engine would mislead the operator."""
        if self._unsubscribe:
            self._unsubscribe()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=2)
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
            except ControlError:
                log.exception("feedback for an unknown parameter")
            except Exception:  # noqa: BLE001 - feedback must never stop
                log.exception("OSC feedback failed")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float))  # (booleans go out as 0/1)


class _RateLimitedLog:
    """Warnings for the log, at most `burst` per `window` seconds: a flood of bad packets
    must not turn into a flood of log lines (each one is still answered over OSC)."""

    def __init__(self, burst: int = 20, window: float = 5.0):
        self.burst, self.window = burst, window
        self._start = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def log(self, text: str) -> None:
        import time

        with self._lock:
            now = time.monotonic()
            if now - self._start > self.window:
                if self._count > self.burst:
                    log.warning("... %d more OSC warnings not logged", self._count - self.burst)
                self._start, self._count = now, 0
            self._count += 1
            if self._count > self.burst:
                return
        log.warning("%s", text)
