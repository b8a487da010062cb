"""The OSC bridge: a UDP receiver that turns messages into registry changes.

Our own receive loop rather than python-osc's servers: every datagram is decoded inside
try/except by `bridges.osc.wire`, so no packet can kill the receiver, and every rejected
message is answered on ``/dd/error`` with its address and the reason. Performer input goes
through ``registry.set_many(..., quantized=True)``: the messages of one packet that share a
time (a bundle) land together in one block, all or nothing; a future timetag becomes the
registry's ``when=`` and never blocks the receiver.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridges.osc import addresses
from bridges.osc.feedback import Feedback, Target
from bridges.osc.wire import MAX_DATAGRAM, Message, OscDecodeError, decode
from engine.runtime.registry import ControlError, Registry

log = logging.getLogger(__name__)

RETARGET_INTERVAL = 2.0  # s: beyond loopback, the last-sender feedback target moves this rarely
MAX_AHEAD = 3600.0  # seconds: a timetag further ahead is a mistake (or an attack on the schedule)


@dataclass
class OscConfig:
    host: str = "127.0.0.1"
    port: int = 9137  # 0: any free port (tests)
    feedback: Target | None = None  # fixed feedback target; None: the last sender's host
    feedback_port: int = 9139
    feedback_enabled: bool = True
    feedback_numeric: Target | None = None  # numbers-only feedback (an OSC In CHOP)
    allow: frozenset[str] = field(default_factory=frozenset)  # empty: everyone may send
    status_interval: float = 1.0
    oscquery_port: int | None = 9138  # None: no OSCQuery service; 0: any free port
    zeroconf: bool = True
    max_datagram: int = MAX_DATAGRAM
    timetags: bool = True  # False: apply bundles on arrival whatever their timetag
    oscquery_hosts: frozenset[str] = field(default_factory=frozenset)  # extra Host names


@dataclass
class Stats:
    packets: int = 0  # datagrams done with (applied, answered or dropped)
    messages: int = 0
    applied: int = 0  # messages whose changes were taken
    rejected: int = 0  # messages answered on /dd/error
    refused: int = 0  # datagrams from senders outside the allowlist (not answered)
    max_cpu_ms: float = 0.0  # the most CPU time one datagram took the receiver thread


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class OscBridge:
    """OSC in, feedback out, OSCQuery on the side. ``start()`` then ``close()``."""

    def __init__(
        self,
        registry: Registry,
        config: OscConfig | None = None,
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.config = config or OscConfig()
        self.status = status
        self.clock = clock
        self.stats = Stats()
        self.sock: socket.socket | None = None
        self.feedback: Feedback | None = None
        self.oscquery = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        assert self.sock is not None, "not started"
        return self.sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> OscBridge:
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            sock.close()
            raise OSError(f"OSC: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e
        # A big receive buffer absorbs controller bursts; the loop drains it fast.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        sock.settimeout(0.2)  # wake up to notice close()
        self.sock = sock
        if not _is_loopback(cfg.host) and not cfg.allow:
            log.warning(
                "OSC listens on %s with no --osc-allow list: anyone on the network can drive it",
                cfg.host,
            )
        self.feedback = Feedback(
            sock,
            self.registry,
            target=cfg.feedback,
            port=cfg.feedback_port,
            enabled=cfg.feedback_enabled,
            status=self.status,
            status_interval=cfg.status_interval,
            retarget_interval=0.0 if _is_loopback(cfg.host) or cfg.allow else RETARGET_INTERVAL,
            numeric=cfg.feedback_numeric,
        )
        self.feedback.start()
        self._thread = threading.Thread(target=self._loop, name="osc-receiver", daemon=True)
        self._thread.start()
        if cfg.oscquery_port is not None:
            from bridges.osc.oscquery import OscQueryService

            try:
                self.oscquery = OscQueryService(
                    self.registry,
                    host=cfg.host,
                    port=cfg.oscquery_port,
                    osc_port=self.port,
                    status=self.status,
                    zeroconf=cfg.zeroconf,
                    allowed_hosts=cfg.oscquery_hosts,
                ).start()
            except OSError as e:  # the OSC server is still useful without discovery
                log.error("OSCQuery not started: %s", e)
        log.info(
            "OSC listening on %s:%d (feedback %s)",
            *self.address,
            f"{cfg.feedback[0]}:{cfg.feedback[1]}"
            if cfg.feedback
            else f"last sender, port {cfg.feedback_port}"
            if cfg.feedback_enabled
            else "off",
        )
        return self

    def close(self) -> None:
        self._stop.set()
        if self.sock is not None and self._thread is not None:
            try:  # wake the receiver now rather than at its next timeout
                host, port = self.address
                host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
                self.sock.sendto(b"", (host, port))
            except OSError:
                pass
        if self._thread:
            self._thread.join(timeout=2)
        if self.feedback:
            self.feedback.close()
        if self.oscquery is not None:
            self.oscquery.close()
        if self.sock:
            self.sock.close()

    def __enter__(self) -> OscBridge:
        return self.start() if self.sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.sock is not None
        bufsize = self.config.max_datagram + 1  # one more byte tells us it was too big
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(max(bufsize, 65536))
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue  # e.g. Windows' ICMP 'connection reset' on UDP: not ours to die of
            if self._stop.is_set():
                return
            t0 = time.thread_time()
            try:
                self.handle_datagram(data, addr)
            except Exception as e:  # noqa: BLE001 - the receiver never dies of a packet
                self._internal_error("?", e)
            cpu_ms = (time.thread_time() - t0) * 1000.0
            if cpu_ms > self.stats.max_cpu_ms:  # watched by tests and the soak run
                self.stats.max_cpu_ms = cpu_ms

    def handle_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Decode one datagram and apply it. Public so tests and replays can drive it.
        `stats.packets` counts it once it is done with (applied, answered or dropped), so
        a reader that sees the count has its effects: counted on arrival, a reader could
        look between the count and the change (it did, with a short GIL switch interval)."""
        try:
            self._handle(data, addr)
        finally:
            self.stats.packets += 1

    def _handle(self, data: bytes, addr: tuple[Any, ...]) -> None:
        fb = self.feedback
        assert fb is not None
        host = addr[0]
        if self.config.allow and host not in self.config.allow and not _is_loopback(host):
            self.stats.refused += 1  # never answer a stranger: no reflection
            if self.stats.refused in (1, 10, 100, 1000) or self.stats.refused % 10000 == 0:
                log.warning("OSC: refused %d datagram(s), latest from %s", self.stats.refused, host)
            return
        fb.saw_sender(host)
        if len(data) > self.config.max_datagram:
            self._reject(
                "?", f"datagram of {len(data)} bytes, more than {self.config.max_datagram}"
            )
            return
        try:
            messages = decode(data)
        except OscDecodeError as e:
            self._reject(e.address, e.reason)
            return
        self.stats.messages += len(messages)
        # Group by time: a bundle (same timetag) is one transaction, in time order.
        groups: dict[float | None, list[Message]] = {}
        for m in messages:
            groups.setdefault(m.when if self.config.timetags else None, []).append(m)
        for when in sorted(groups, key=lambda w: -1.0 if w is None else w):
            self._apply(groups[when], when, host)

    def _reject(self, address: str, reason: str, count: int = 1) -> None:
        self.stats.rejected += count
        assert self.feedback is not None
        self.feedback.error(address, reason)

    def _internal_error(self, address: str, e: BaseException, count: int = 1) -> None:
        """A failure of ours, not the sender's: answered like any rejection (the sender
        learns its message did nothing), logged with its traceback once per kind."""
        self._reject(address[:256], self._log_internal(address, e), count)

    def _log_internal(self, address: str, e: BaseException) -> str:
        assert self.feedback is not None
        kind = f"{type(e).__name__}: {str(e)[:120]}"
        self.feedback.limiter.log(
            f"OSC: unexpected failure handling {address[:128]}: {kind}",
            key=f"internal {type(e).__name__} {address[:64]}",
            exc_info=(type(e), e, e.__traceback__),
        )
        return f"internal error ({kind})"

    def _apply(self, messages: list[Message], when: float | None, host: str) -> None:
        """One transaction: every change of these messages in one set_many, or none."""
        changes: list[tuple[str, Any]] = []
        sources: dict[str, str] = {}  # registry path -> the address it came in on
        errors: list[tuple[str, str]] = []
        inputs = 0
        for m in messages:
            if m.address == addresses.GET:
                try:
                    self._query(m, host)
                except Exception as e:  # noqa: BLE001 - a query failing is answered too
                    self._internal_error(addresses.GET, e)
                continue
            if _outgoing(m.address):
                continue  # our own feedback looped back: ignore, never answer (no echo storm)
            inputs += 1
            try:
                if addresses.is_pattern(m.address):
                    # `/dd/prompt/*/weight 0`: every matching parameter, in the same block
                    params = addresses.match(m.address, self.registry)
                    if not params:
                        raise ControlError(m.address[:128], "the pattern matches no parameter")
                else:
                    params = [self.registry.param(addresses.path_of(m.address))]
                for param in params:
                    changes.append((param.path, addresses.args_to_value(param, m.args)))
                    sources.setdefault(param.path, m.address)
            except ControlError as e:
                errors.append((m.address, e.reason))
            except Exception as e:  # noqa: BLE001 - answered, never a silent drop
                errors.append((m.address, self._log_internal(m.address, e)))
        if not inputs:
            return
        ahead = None if when is None else when - self.clock()
        if ahead is not None and ahead > MAX_AHEAD:
            errors = [
                (m.address, f"timetag {ahead:.0f} s ahead, more than {MAX_AHEAD:.0f}")
                for m in messages
                if not _outgoing(m.address) and m.address != addresses.GET
            ]
        tail = f" (bundle of {inputs} messages not applied)" if inputs > 1 else ""
        if errors:
            for address, reason in errors:
                self._reject(address, reason + tail)
            return
        try:
            result = self.registry.set_many(changes, when=when, quantized=True)
        except ControlError as e:
            # The registry names a path (maybe one an action expanded to): map it back.
            path = path_or(e.path)
            address = sources.get(path) or (messages[0].address if inputs == 1 else "/dd/" + path)
            reason = e.reason if path in sources else str(e)
            self._reject(address, reason + tail, inputs)
            return
        except Exception as e:  # noqa: BLE001 - e.g. an action's expansion failing
            self._internal_error(messages[0].address if inputs == 1 else "?", e, inputs)
            return
        self.stats.applied += inputs
        assert self.feedback is not None
        for w in result.warnings:
            path = w.split(":", 1)[0]  # registry warnings start with the path
            self.feedback.warning(sources.get(path, "/dd/" + path), w)

    def may_answer_queries(self, host: str) -> bool:
        """Whether `/dd/get` from `host` is answered. UDP senders can be forged, and one
        small `/dd/get` answers with every value (to any port it names): on a network that
        makes the engine a reflector. So beyond loopback only `--osc-allow` senders (and
        loopback ones) get answers; with OSC on loopback, everyone that can reach it may."""
        return _is_loopback(self.config.host) or _is_loopback(host) or host in self.config.allow

    def _query(self, m: Message, host: str) -> None:
        """``/dd/get [address [port]]``: answer on the address itself, to the asker."""
        fb = self.feedback
        assert fb is not None
        if not self.may_answer_queries(host):
            self.stats.refused += 1  # no answer at all: an answer is what a reflector sends
            fb.limiter.log(
                f"OSC: /dd/get from {host} not answered: OSC listens on {self.config.host};"
                " list the sender in --osc-allow to query from the network",
                key=f"get-refused {host}",
            )
            return
        args = m.args
        port = None
        if len(args) >= 2:
            if (
                not isinstance(args[1], (int, float))
                or isinstance(args[1], bool)
                or not 0 < args[1] < 65536
            ):
                self._reject(addresses.GET, f"reply port must be 1..65535, got {args[1]!r}")
                return
            port = int(args[1])
        if len(args) > 2:
            self._reject(
                addresses.GET,
                f"expected an address and an optional port, got {len(args)} arguments",
            )
            return
        target = fb.reply_target(host, port)
        if not args:
            fb.send_all(target)
            fb.send_status(target)
            return
        what = args[0]
        if not isinstance(what, str):
            self._reject(addresses.GET, f"expected an address string, got {type(what).__name__}")
            return
        address = what if what.startswith("/") else "/dd/" + what.strip("/")
        if address.rstrip("/") == "/dd/status":
            fb.send_status(target)
            return
        if address in _STATUS:
            fb.send_status(target, only=address)
            return
        try:
            param = self.registry.param(addresses.path_of(address))
            if not param.stateful:
                raise ControlError(address, f"{param.type} {address} has no value to get")
            fb.send_value(param.path, target)
        except ControlError as e:
            self._reject(addresses.GET, f"{what[:128]}: {e.reason}")


def path_or(address: str) -> str:
    try:
        return addresses.path_of(address)
    except ControlError:
        return address


_OUTGOING = frozenset(b.address for b in addresses.BRIDGE_ADDRESSES if b.direction == "out")
_OUTGOING_PREFIXES = ("/dd/status/audio/", "/dd/status/mod/")  # meters: one address per source


def _outgoing(address: str) -> bool:
    return address in _OUTGOING or address.startswith(_OUTGOING_PREFIXES)


_STATUS = frozenset(b.address for b in addresses.STATUS_ADDRESSES)
