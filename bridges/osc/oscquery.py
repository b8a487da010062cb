"""OSCQuery: the address space as an HTTP JSON tree, announced on zeroconf.

Hosts that speak OSCQuery (TouchDesigner's OSCQuery COMP, Chataigne, Vezér, ossia score)
discover the engine (``_oscjson._tcp``) and build their controls from the tree: every
registry parameter with FULL_PATH, TYPE (OSC type tags), RANGE, VALUE, DESCRIPTION and
ACCESS, plus the bridge's read-only status addresses. Read-only: only GET/HEAD, only
nodes that exist (anything else, traversal attempts included, is a 404 or 400). The tree
is built from the registry on every request, so VALUE is always current.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
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
    ):
        self.registry = registry
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

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return self.httpd.server_address[1]

    def host_info(self) -> dict[str, Any]:
        return {
            "NAME": self.name,
            "OSC_IP": self.host,
            "OSC_PORT": self.osc_port,
            "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": dict(EXTENSIONS),
        }

    def start(self) -> OscQueryService:
        service = self

        class Handler(_Handler):
            svc = service

        server_cls = ThreadingHTTPServer
        if ":" in self.host:

            class server_cls(ThreadingHTTPServer):  # noqa: N801 - a local subclass
                address_family = socket.AF_INET6

        try:
            self.httpd = server_cls((self.host, self.requested_port), Handler)
        except OSError as e:
            raise OSError(
                f"OSCQuery: cannot listen on {self.host}:{self.requested_port}: {e.strerror or e}"
            ) from e
        self.httpd.daemon_threads = True
        t = threading.Thread(target=self.httpd.serve_forever, name="oscquery-http", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("OSCQuery on http://%s:%d/", self.host, self.port)
        if self.use_zeroconf:
            z = threading.Thread(target=self._register, name="oscquery-zeroconf", daemon=True)
            z.start()
            self._threads.append(z)
        return self

    def _register(self) -> None:
        try:
            from zeroconf import ServiceInfo, Zeroconf, get_all_addresses

            if self.host in ("0.0.0.0", "::", ""):
                ips = [ip for ip in get_all_addresses() if not ip.startswith("127.")]
            else:
                ips = [self.host]
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
            zc = Zeroconf()
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

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        try:
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
            return self._send(200, self.svc.host_info())
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
