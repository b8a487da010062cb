"""OSCQuery: the address space as an HTTP JSON tree, announced on zeroconf.

Hosts that speak OSCQuery (TouchDesigner's OSCQuery COMP, Chataigne, Vezér, ossia score)
discover the engine (``_oscjson._tcp``) and build their controls from the tree: every
registry parameter with FULL_PATH, TYPE (OSC type tags), RANGE, VALUE, DESCRIPTION and
ACCESS, plus the bridge's read-only status addresses. Read-only: only GET/HEAD, only
nodes that exist (anything else, traversal attempts included, is a 404 or 400). The tree
is built from the registry on every request, so VALUE is always current.

Exposure (issue 14 part 8, issue 19 part 5):

- At most `MAX_CONNECTIONS` connections at once (more get a 503 and are closed at once,
  without a thread), each read times out after `READ_TIMEOUT` seconds and a connection is
  cut after `CONNECTION_DEADLINE` seconds whatever it does (slow senders included).
- DNS rebinding: a request whose Host header names anything but an IP address, localhost,
  this machine's name (or NAME.local) or an `allowed_hosts` entry gets a 403, so a web page
  on a rebound domain cannot read the tree.
- Zeroconf: nothing is announced while OSC listens on loopback only (nobody else could
  reach it); otherwise only the addresses OSC listens on are announced, on their own
  interfaces. HOST_INFO's OSC_IP is a reachable address: the listening one, or, when
  listening on every interface, the address the asking connection came in on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from bridges.osc import addresses
from engine.runtime.registry import Registry

log = logging.getLogger(__name__)

ACCESS_NONE, ACCESS_READ, ACCESS_WRITE, ACCESS_RW = 0, 1, 2, 3
ATTRIBUTES = (
    "FULL_PATH",
    "CONTENTS",
    "TYPE",
    "VALUE",
    "RANGE",
    "DESCRIPTION",
    "ACCESS",
    "CLIPMODE",
    "UNIT",
)
EXTENSIONS = {
    "ACCESS": True,
    "VALUE": True,
    "RANGE": True,
    "DESCRIPTION": True,
    "CLIPMODE": True,
    "UNIT": True,
    "TAGS": False,
    "EXTENDED_TYPE": False,
    "CRITICAL": False,
    "OVERLOADS": False,
    "LISTEN": False,
    "PATH_CHANGED": False,
    "PATH_RENAMED": False,
    "PATH_ADDED": False,
    "PATH_REMOVED": False,
    "HTML": False,
}


MAX_CONNECTIONS = 16
READ_TIMEOUT = 5.0  # seconds one socket read may wait
CONNECTION_DEADLINE = 10.0  # seconds one connection may last, whatever it sends
WILDCARDS = ("0.0.0.0", "::", "")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def own_names() -> set[str]:
    """Names this machine answers to that a browser may send as Host."""
    names = {"localhost"}
    try:
        name = socket.gethostname().lower().rstrip(".")
    except OSError:
        return names
    if name:
        short = name.split(".")[0]
        names |= {name, short, short + ".local"}
    return names


def host_allowed(host_header: str | None, allowed: Iterable[str] = ()) -> bool:
    """Whether a request's Host header is safe to answer (DNS-rebinding defence): no header
    (not a browser), an IP literal (rebinding needs a name), or one of our own names."""
    if host_header is None or not host_header.strip():
        return True
    h = host_header.strip().lower()
    if h.startswith("["):  # [v6]:port
        end = h.find("]")
        if end < 0:
            return False
        return _is_ip(h[1:end])
    if h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    h = h.rstrip(".")
    if _is_ip(h):
        return True
    return h in own_names() or h in {a.lower().rstrip(".") for a in allowed}


def local_addresses() -> list[str]:
    """This machine's addresses, loopback and link-local ones left out (no one else can
    use them to reach us)."""
    out: list[str] = []
    try:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                a = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                try:
                    addr = ipaddress.ip_address(a)
                except ValueError:
                    continue
                if not (addr.is_loopback or addr.is_link_local):
                    out.append(str(addr))
    except Exception:  # noqa: BLE001 - no adapter list: announce nothing rather than guess
        log.debug("could not list network interfaces", exc_info=True)
    return list(dict.fromkeys(out))


def announce_addresses(host: str) -> list[str]:
    """The addresses to announce on zeroconf for OSC listening on `host`: none for
    loopback, the host itself for one address, every non-loopback one for a wildcard
    (IPv4 only for 0.0.0.0, which is what such a socket serves)."""
    if host in WILDCARDS:
        ips = local_addresses()
        return [ip for ip in ips if ":" not in ip] if host == "0.0.0.0" else ips
    if _is_loopback(host):
        return []
    return [host] if _is_ip(host) else []


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections and on each connection's lifetime."""

    daemon_threads = True
    request_queue_size = 64  # the accept backlog; refusing is done after accept, with a 503

    def __init__(self, *args: Any, max_connections: int, deadline: float, **kw: Any):
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadline = deadline
        self._active: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self.refused = 0
        self.cut = 0
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.settimeout(0.1)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._active[request] = time.monotonic() + self._deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._lock:
            if self._active.pop(request, None) is None:
                return
        self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever about every poll interval: cut connections past their
        deadline (a slow sender that keeps each read under the timeout)."""
        now = time.monotonic()
        with self._lock:
            late = [r for r, end in self._active.items() if now > end]
        for r in late:
            self.cut += 1
            try:
                r.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return v


def build_tree(registry: Registry, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OSCQuery namespace: a node per path segment, attributes on the leaves (and on
    containers that are also parameters, like /dd/seed with /dd/seed/random below it)."""
    root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": ACCESS_NONE, "CONTENTS": {}}

    def node(address: str) -> dict[str, Any]:
        cur = root
        parts = address.strip("/").split("/")
        for i, part in enumerate(parts):
            contents = cur.setdefault("CONTENTS", {})
            if part not in contents:
                contents[part] = {
                    "FULL_PATH": "/" + "/".join(parts[: i + 1]),
                    "ACCESS": ACCESS_NONE,
                }
            cur = contents[part]
        return cur

    node("/dd")["DESCRIPTION"] = "dreamdeck: live real-time video diffusion"
    for p in registry:
        n = node(p.address)
        value = registry.get(p.path) if p.stateful else None
        n["TYPE"] = addresses.type_tag(p, value)
        n["DESCRIPTION"] = p.description
        n["ACCESS"] = ACCESS_RW if p.stateful else ACCESS_WRITE
        if p.stateful:
            if isinstance(value, (list, tuple)):
                n["VALUE"] = [_json_value(v) for v in value]
            else:
                n["VALUE"] = [_json_value(value)]
        if p.range is not None:
            n["RANGE"] = [{"MIN": p.range[0], "MAX": p.range[1]}]
            n["CLIPMODE"] = ["both"]  # out-of-range values are clamped, with a warning
        elif p.choices is not None:
            n["RANGE"] = [{"VALS": list(p.choices)}]
        if p.unit:
            n["UNIT"] = [p.unit]
    for b in addresses.BRIDGE_ADDRESSES:
        if b.direction == "in":
            n = node(b.address)
            n.update(TYPE="s", ACCESS=ACCESS_WRITE, DESCRIPTION=b.description)
            continue
        if not b.status_key:
            continue  # /dd/error, /dd/warning: events, not state; see docs/osc.md
        n = node(b.address)
        n.update(TYPE=b.args, ACCESS=ACCESS_READ, DESCRIPTION=b.description)
        if status is not None and status.get(b.status_key) is not None:
            n["VALUE"] = [_json_value(status[b.status_key])]
    return root


class OscQueryService:
    """HTTP (ThreadingHTTPServer in a thread) plus zeroconf registration (in another
    thread, because registering probes the network for a second or two, and may fail
    where multicast is unavailable: that is logged, never fatal)."""

    def __init__(
        self,
        registry: Registry,
        *,
        host: str = "127.0.0.1",
        port: int = 9138,
        osc_port: int = 9137,
        status: Callable[[], dict[str, Any]] | None = None,
        zeroconf: bool = True,
        name: str = "dreamdeck",
        allowed_hosts: Iterable[str] = (),
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        connection_deadline: float = CONNECTION_DEADLINE,
    ):
        self.registry = registry
        self.allowed_hosts = frozenset(allowed_hosts)
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.connection_deadline = connection_deadline
        self.host, self.requested_port, self.osc_port = host, port, osc_port
        self.status = status
        self.use_zeroconf = zeroconf
        self.name = name
        self.httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._zc: Any = None
        self._infos: list[Any] = []
        self._zc_lock = threading.Lock()
        self._closing = False
        self.announce: list[str] = []  # addresses given to zeroconf (none: not announced)

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return self.httpd.server_address[1]

    def host_info(self, local_ip: str | None = None) -> dict[str, Any]:
        """HOST_INFO. OSC_IP is never a wildcard: listening on every interface, it is the
        address the asking connection reached (`local_ip`), which that client can reach."""
        ip = self.host
        if ip in WILDCARDS:
            ip = local_ip or ("127.0.0.1" if ip != "::" else "::1")
            if ip.startswith("::ffff:") and "." in ip:
                ip = ip[7:]  # an IPv4 client on a dual-stack socket
        return {
            "NAME": self.name,
            "OSC_IP": ip,
            "OSC_PORT": self.osc_port,
            "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": dict(EXTENSIONS),
        }

    def start(self) -> OscQueryService:
        service = self

        class Handler(_Handler):
            svc = service
            timeout = self.read_timeout  # per socket read (StreamRequestHandler.setup)

        server_cls = _BoundedHTTPServer
        if ":" in self.host:

            class server_cls(_BoundedHTTPServer):  # noqa: N801 - a local subclass
                address_family = socket.AF_INET6

        try:
            self.httpd = server_cls(
                (self.host, self.requested_port),
                Handler,
                max_connections=self.max_connections,
                deadline=self.connection_deadline,
            )
        except OSError as e:
            raise OSError(
                f"OSCQuery: cannot listen on {self.host}:{self.requested_port}: {e.strerror or e}"
            ) from e
        self.httpd.daemon_threads = True
        t = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25}, name="oscquery-http"
        )
        t.daemon = True
        t.start()
        self._threads.append(t)
        log.info("OSCQuery on http://%s:%d/", self.host, self.port)
        self.announce = announce_addresses(self.host) if self.use_zeroconf else []
        if self.use_zeroconf and not self.announce:
            log.info(
                "OSCQuery not announced on zeroconf: OSC listens on %s, no address another"
                " machine can reach (--osc-host 0.0.0.0 or this machine's address for that)",
                self.host,
            )
        if self.announce:
            z = threading.Thread(target=self._register, name="oscquery-zeroconf", daemon=True)
            z.start()
            self._threads.append(z)
        return self

    def _register(self) -> None:
        try:
            from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

            ips = list(self.announce)
            packed = [
                socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip) for ip in ips
            ]
            hostname = socket.gethostname().split(".")[0] or "dreamdeck"
            infos = [
                ServiceInfo(
                    "_oscjson._tcp.local.",
                    f"{self.name}._oscjson._tcp.local.",
                    addresses=packed,
                    port=self.port,
                    server=f"{hostname}.local.",
                ),
                ServiceInfo(
                    "_osc._udp.local.",
                    f"{self.name}._osc._udp.local.",
                    addresses=packed,
                    port=self.osc_port,
                    server=f"{hostname}.local.",
                ),
            ]
            # Only the interfaces OSC listens on (all of them for a wildcard address).
            zc = Zeroconf(interfaces=InterfaceChoice.All if self.host in WILDCARDS else ips)
            with self._zc_lock:
                if self._closing:
                    zc.close()
                    return
                self._zc = zc
            for info in infos:
                zc.register_service(info, allow_name_change=True)
                with self._zc_lock:
                    self._infos.append(info)
            log.info("OSCQuery announced on zeroconf as %s (%s)", self.name, ", ".join(ips))
        except Exception as e:  # noqa: BLE001 - no multicast, no network: discovery is optional
            log.warning(
                "zeroconf registration failed (%s); OSCQuery still at http://%s:%d/",
                e,
                self.host,
                self.port,
            )

    def close(self) -> None:
        with self._zc_lock:
            self._closing = True
            zc, infos = self._zc, list(self._infos)
        if zc is not None:
            try:
                for info in infos:
                    zc.unregister_service(info)
                zc.close()
            except Exception:  # noqa: BLE001
                log.debug("zeroconf close failed", exc_info=True)
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=2)


class _Handler(BaseHTTPRequestHandler):
    svc: OscQueryService
    server_version = "dreamdeck-oscquery/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("OSCQuery %s: " + format, self.client_address[0], *args)

    def _send(self, code: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(code)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, reason: str) -> None:
        self._send(code, {"error": reason})

    def _host_ok(self) -> bool:
        if host_allowed(self.headers.get("Host"), self.svc.allowed_hosts):
            return True
        self._error(403, "unknown Host header (DNS rebinding protection)")
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        try:
            if not self._host_ok():
                return
            self._get()
        except Exception:  # noqa: BLE001 - a bad request must not kill the service thread
            log.exception("OSCQuery request failed")
            try:
                self._error(500, "internal error")
            except OSError:
                pass

    do_HEAD = do_GET  # noqa: N815

    def _refuse(self) -> None:
        self._error(405, "read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _get(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parts.query
        if not path.startswith("/") or "\\" in path or "\x00" in path:
            return self._error(400, "bad path")
        segments = [s for s in path.split("/") if s]
        if any(s in (".", "..") for s in segments) or "//" in path:
            return self._error(400, "bad path")
        if query == "HOST_INFO":
            return self._send(200, self.svc.host_info(self.connection.getsockname()[0]))
        status = None
        if self.svc.status is not None:
            try:
                status = self.svc.status()
            except Exception:  # noqa: BLE001
                status = None
        node = build_tree(self.svc.registry, status)
        for s in segments:
            contents = node.get("CONTENTS", {})
            if s not in contents:
                return self._error(404, "no such node")
            node = contents[s]
        if not query:
            return self._send(200, node)
        if query not in ATTRIBUTES:
            return self._error(400, f"unknown attribute {query[:64]!r}")
        if query not in node:
            return self._send(204)
        return self._send(200, {query: node[query]})
