"""Network exposure of OSCQuery and /dd/get (issue 14 part 8, issue 19 part 5).

Real sockets throughout: idle and slow TCP connections against the bounded HTTP server,
browser-like Host headers, real UDP queries, and the real zeroconf where multicast works.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from osc_helpers import Listener

from bridges.osc.oscquery import (
    OscQueryService,
    announce_addresses,
    host_allowed,
    local_addresses,
)
from bridges.osc.server import OscBridge, OscConfig
from bridges.osc.wire import encode_message
from engine.runtime.controls import make_registry


def _request(port: int, path: str, host_header: str | None, addr: str = "127.0.0.1"):
    """A raw HTTP/1.0 request, so the Host header is exactly what the test says (or none)."""
    with socket.create_connection((addr, port), timeout=5) as s:
        head = f"GET {path} HTTP/1.0\r\n"
        if host_header is not None:
            head += f"Host: {host_header}\r\n"
        s.sendall((head + "\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    return status, (json.loads(body) if body else None)


@pytest.fixture
def svc():
    s = OscQueryService(
        make_registry(),
        port=0,
        zeroconf=False,
        max_connections=4,
        read_timeout=1.0,
        connection_deadline=2.0,
        allowed_hosts=["studio.lan"],
    ).start()
    yield s
    s.close()


@pytest.mark.parametrize(
    "host, ok",
    [
        (None, True),  # not a browser
        ("127.0.0.1", True),
        ("127.0.0.1:9138", True),
        ("[::1]:9138", True),
        ("192.0.2.9:9138", True),  # any IP literal: rebinding needs a name
        ("localhost:9138", True),
        ("LOCALHOST", True),
        ("studio.lan", True),  # --oscquery-allow-host
        ("evil.example", False),
        ("evil.example:9138", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("[::1", False),
        ("[not-an-ip]:80", False),
    ],
)
def test_host_header_decides_who_is_answered(svc, host, ok):
    status, body = _request(svc.port, "/dd/seed?VALUE", host)
    assert status == (200 if ok else 403), body
    if not ok:
        assert "rebinding" in body["error"]


def test_own_machine_names_are_allowed():
    name = socket.gethostname().split(".")[0]
    assert host_allowed(f"{name}.local:9138") and host_allowed(name)
    assert not host_allowed(f"{name}.local.evil.example")


def test_connections_are_bounded_and_idle_ones_time_out():
    """Idle connections hold at most max_connections threads; more are refused with a 503
    at once (no thread); once the idle ones time out, requests are served again."""
    svc = OscQueryService(
        make_registry(), port=0, zeroconf=False, max_connections=4, read_timeout=3.0
    ).start()
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", svc.port), timeout=5) for _ in range(4)]
    extra = []
    try:
        deadline = time.monotonic() + 2
        while svc.httpd.active < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.httpd.active == 4
        for _ in range(20):  # while the four idle ones hold every slot
            s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
            extra.append(s)
            s.settimeout(2)
            assert s.recv(4096).startswith(b"HTTP/1.0 503")
        assert svc.httpd.refused == 20
        assert threading.active_count() - threads_before <= 4
        # The idle ones time out by themselves (3 s per read), freeing their slots.
        deadline = time.monotonic() + 8
        while svc.httpd.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.httpd.active == 0
        assert _request(svc.port, "/dd/seed?VALUE", "localhost")[0] == 200
    finally:
        for s in idle + extra:
            s.close()
        svc.close()


def test_a_slow_sender_is_cut_at_the_connection_deadline(svc):
    """One header byte every 0.3 s keeps each read under the 1 s timeout; the connection
    is cut anyway once its 2 s are up, and its slot comes back."""
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
    start = time.monotonic()
    try:
        s.sendall(b"GET / HTTP/1.0\r\n")
        closed = False
        while time.monotonic() - start < 8:
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            s.settimeout(0.3)
            try:
                if s.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
        assert closed, "the slow connection was never cut"
    finally:
        s.close()
    assert svc.httpd.cut >= 1
    assert _request(svc.port, "/dd/seed?VALUE", None)[0] == 200


def test_host_info_never_says_0_0_0_0():
    svc = OscQueryService(make_registry(), host="0.0.0.0", port=0, zeroconf=False).start()
    try:
        status, info = _request(svc.port, "/?HOST_INFO", "localhost")
        assert status == 200 and info["OSC_IP"] == "127.0.0.1"
        for ip in [a for a in local_addresses() if ":" not in a][:1]:
            status, info = _request(svc.port, "/?HOST_INFO", ip, addr=ip)
            assert info["OSC_IP"] == ip  # the address this client reached us on
    finally:
        svc.close()


def test_what_is_announced_follows_where_osc_listens():
    assert announce_addresses("127.0.0.1") == []
    assert announce_addresses("::1") == []
    assert announce_addresses("localhost") == []
    assert announce_addresses("192.0.2.7") == ["192.0.2.7"]
    every = announce_addresses("0.0.0.0")
    assert every == [a for a in local_addresses() if ":" not in a]
    assert not any(a.startswith("127.") or ":" in a for a in every)


def test_a_loopback_bridge_starts_no_zeroconf_at_all(monkeypatch):
    """With OSC on loopback (the default) zeroconf is never even constructed."""
    import zeroconf

    made = []

    class Spy(zeroconf.Zeroconf):  # the real class, counting constructions
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(zeroconf, "Zeroconf", Spy)
    with OscBridge(make_registry(), OscConfig(port=0, oscquery_port=0)).start() as bridge:
        q = bridge.oscquery
        time.sleep(0.3)
        assert q.announce == [] and q._zc is None and len(q._threads) == 1
    assert made == []


def test_real_zeroconf_announces_only_the_network_facing_service():
    """Two services on this machine, one on loopback and one on every interface: only the
    second can be discovered. Skipped where multicast does not work."""
    from zeroconf import Zeroconf

    reg = make_registry()
    loop = OscQueryService(reg, host="127.0.0.1", port=0, name="dd-loopback").start()
    net = OscQueryService(reg, host="0.0.0.0", port=0, name="dd-network").start()
    zc = Zeroconf()
    try:
        kind = "_oscjson._tcp.local."
        found_net = None
        deadline = time.monotonic() + 6
        while found_net is None and time.monotonic() < deadline:
            found_net = zc.get_service_info(kind, "dd-network." + kind, timeout=300)
        if found_net is None:
            pytest.skip("zeroconf/multicast not available here")
        assert found_net.port == net.port
        assert zc.get_service_info(kind, "dd-loopback." + kind, timeout=1500) is None
        addrs = found_net.parsed_addresses()
        assert addrs and not any(a.startswith("127.") for a in addrs)
    finally:
        zc.close()
        loop.close()
        net.close()


# -- /dd/get beyond loopback -----------------------------------------------------------------
def _bridge(host: str, allow=frozenset(), fixed=True):
    fb = Listener()
    cfg = OscConfig(
        host=host,
        port=0,
        feedback=("127.0.0.1", fb.port) if fixed else None,
        feedback_port=fb.port,
        oscquery_port=None,
        zeroconf=False,
        allow=allow,
    )
    bridge = OscBridge(make_registry(), cfg).start()
    if fixed:  # the fixed target's first full sync is done before the test counts sends
        fb.wait(lambda a, args: a == "/dd/v2v/auto", timeout=5)
        time.sleep(0.1)
    return bridge, fb


def test_get_beyond_loopback_answers_only_allowed_senders():
    """A forged sender (here: handle_datagram with a foreign address, as the receiver
    would see it) gets nothing back; loopback and --osc-allow senders get their answer."""
    bridge, fb = _bridge("0.0.0.0")
    try:
        sent = bridge.feedback.sent
        bridge.handle_datagram(encode_message("/dd/get", ["seed", 9]), ("203.0.113.5", 4000))
        bridge.handle_datagram(encode_message("/dd/get", []), ("203.0.113.5", 4000))
        time.sleep(0.1)
        assert bridge.feedback.sent == sent and bridge.stats.refused == 2
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:  # loopback: answered
            c.sendto(encode_message("/dd/get", ["seed", fb.port]), ("127.0.0.1", bridge.port))
            fb.wait(lambda a, args: a == "/dd/seed" and args == (42,), timeout=5)
    finally:
        bridge.close()
        fb.close()
    bridge, fb = _bridge("0.0.0.0", allow=frozenset({"203.0.113.5"}))
    try:
        sent = bridge.feedback.sent
        bridge.handle_datagram(encode_message("/dd/get", ["seed", 9]), ("203.0.113.5", 4000))
        assert bridge.feedback.sent == sent + 1  # the allowed sender is answered
    finally:
        bridge.close()
        fb.close()


def test_forged_senders_cannot_move_the_feedback_target_quickly():
    """Beyond loopback, the last-sender target (which gets the whole state when it
    changes) moves at most once per RETARGET_INTERVAL; on loopback it follows at once."""
    bridge, fb = _bridge("0.0.0.0", fixed=False)
    try:
        for i in range(50):
            bridge.handle_datagram(encode_message("/dd/seed", [i]), (f"203.0.113.{i}", 4000))
        assert bridge.feedback.target == ("203.0.113.0", fb.port)
    finally:
        bridge.close()
        fb.close()
    bridge, fb = _bridge("127.0.0.1", fixed=False)
    try:
        for i in range(3):
            bridge.handle_datagram(encode_message("/dd/seed", [i]), (f"127.0.0.{i + 1}", 4000))
        assert bridge.feedback.target == ("127.0.0.3", fb.port)
    finally:
        bridge.close()
        fb.close()


def test_get_from_a_real_network_address_is_not_answered():
    """Over real UDP from this machine's own non-loopback address, where it has one."""
    ips = [a for a in local_addresses() if ":" not in a]
    if not ips:
        pytest.skip("no non-loopback IPv4 address here")
    bridge, fb = _bridge("0.0.0.0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.bind((ips[0], 0))
            c.settimeout(1.0)
            c.sendto(encode_message("/dd/get", ["seed", c.getsockname()[1]]), (ips[0], bridge.port))
            with pytest.raises(TimeoutError):
                c.recvfrom(65536)
        assert bridge.stats.refused == 1
    finally:
        bridge.close()
        fb.close()
