"""OSCQuery: the HTTP JSON tree carries every address with its attributes; read-only;
traversal refused; zeroconf failure is not fatal."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from bridges.osc.addresses import STATUS_ADDRESSES
from bridges.osc.oscquery import OscQueryService
from bridges.osc.server import OscBridge, OscConfig
from engine.runtime.controls import make_registry


def _status():
    return {
        "fps": 23.0,
        "block_ms": 500.0,
        "latency_ms": 700.0,
        "block": 3,
        "vram_mb": None,
        "state": "running",
        "vace_input": "input shm:td_in: live",
        "last_error": "vace/ref/1: cannot decode cat.png",
    }


@pytest.fixture(scope="module")
def svc():
    reg = make_registry(default_prompt="a forest")
    s = OscQueryService(reg, port=0, osc_port=9137, status=_status, zeroconf=False).start()
    yield s
    s.close()


def _get(svc, path, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=5)
    conn.request(method, path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, (json.loads(body) if body else None)


def _leaves(node):
    if "TYPE" in node:
        yield node
    for child in node.get("CONTENTS", {}).values():
        yield from _leaves(child)


def test_tree_has_every_address_with_required_fields(svc):
    status, root = _get(svc, "/")
    assert status == 200 and root["FULL_PATH"] == "/"
    leaves = {n["FULL_PATH"]: n for n in _leaves(root)}
    reg = svc.registry
    for p in reg:
        n = leaves[p.address]
        assert {"FULL_PATH", "TYPE", "DESCRIPTION", "ACCESS"} <= set(n), p.address
        assert n["DESCRIPTION"] == p.description
        if p.stateful:
            assert n["ACCESS"] == 3
            value = reg.get(p.path)
            assert n["VALUE"] == (list(value) if isinstance(value, list) else [value])
        else:
            assert n["ACCESS"] == 2 and "VALUE" not in n
        if p.type == "trigger":
            assert n["TYPE"] in ("N", "I")
        elif p.type == "bool":
            assert n["TYPE"] in ("T", "F")
        elif p.type == "int_list":
            assert set(n["TYPE"]) == {"i"} and len(n["TYPE"]) == len(reg.get(p.path))
        else:
            assert n["TYPE"] == {"float": "f", "int": "i", "str": "s", "json": "s"}[p.type]
        if p.range:
            assert n["RANGE"] == [{"MIN": p.range[0], "MAX": p.range[1]}]
        if p.choices:
            assert n["RANGE"] == [{"VALS": list(p.choices)}]
    for b in STATUS_ADDRESSES:
        n = leaves[b.address]
        assert n["ACCESS"] == 1 and n["TYPE"] == b.args
        if _status()[b.status_key] is not None:
            assert n["VALUE"] == [_status()[b.status_key]]
    # Every node's FULL_PATH is the path that serves it.
    for path in list(leaves)[:10]:
        assert _get(svc, path)[1]["FULL_PATH"] == path


def test_value_is_live_and_attribute_queries(svc):
    svc.registry.set("kv_bias", 0.55)
    assert _get(svc, "/dd/kv_bias?VALUE") == (200, {"VALUE": [0.55]})
    assert _get(svc, "/dd/kv_bias?RANGE") == (200, {"RANGE": [{"MIN": 0.01, "MAX": 1.0}]})
    assert _get(svc, "/dd/reset?VALUE")[0] == 204  # a trigger has no value
    assert _get(svc, "/dd/kv_bias?BOGUS")[0] == 400


def test_host_info(svc):
    status, info = _get(svc, "/?HOST_INFO")
    assert status == 200
    assert info["OSC_PORT"] == 9137 and info["OSC_TRANSPORT"] == "UDP"
    ext = info["EXTENSIONS"]
    for key in ("ACCESS", "VALUE", "RANGE", "DESCRIPTION"):
        assert ext[key] is True


@pytest.mark.parametrize(
    "path, code",
    [
        ("/../etc/passwd", 400),
        ("/dd/../../etc/passwd", 400),
        ("/dd/%2e%2e/%2e%2e/etc/passwd", 400),
        ("/dd/..%2f..%2fetc", 400),
        ("/dd//seed", 400),
        ("/dd/seed%00", 400),
        ("/dd\\seed", 400),
        ("/etc/passwd", 404),
        ("/dd/nope", 404),
        ("/dd/prompt/9/text", 404),
    ],
)
def test_traversal_and_unknown_paths_refused(svc, path, code):
    assert _get(svc, path)[0] == code


def test_read_only(svc):
    for method in ("POST", "PUT", "DELETE"):
        assert _get(svc, "/dd/seed", method)[0] == 405
    assert svc.registry.get("seed") == 42


def test_bridge_serves_oscquery_and_survives_zeroconf_failure(monkeypatch):
    """Zeroconf raising (as with no multicast) is logged; HTTP and OSC keep working."""
    import zeroconf

    class Broken:
        def __init__(self, *a, **k):
            raise OSError("no multicast here")  # stands in for a network without multicast

    monkeypatch.setattr(zeroconf, "Zeroconf", Broken)
    reg = make_registry()
    # Beyond loopback: on loopback nothing is announced at all (test_oscquery_exposure).
    cfg = OscConfig(host="0.0.0.0", port=0, oscquery_port=0, zeroconf=True)
    with OscBridge(reg, cfg).start() as bridge:
        q = bridge.oscquery
        deadline = time.monotonic() + 3
        while q._threads[-1].is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not q._threads[-1].is_alive()
        status, info = _get(q, "/?HOST_INFO")
        assert status == 200 and info["OSC_PORT"] == bridge.port
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        from bridges.osc.wire import encode_message

        c.sendto(encode_message("/dd/seed", [9]), ("127.0.0.1", bridge.port))
        deadline = time.monotonic() + 2
        while reg.get("seed") != 9 and time.monotonic() < deadline:
            time.sleep(0.005)
        c.close()
        assert reg.get("seed") == 9


def test_zeroconf_announces_both_services():
    """The real zeroconf, on this machine: `_oscjson._tcp` (HTTP port) and `_osc._udp`
    (OSC port) resolve. Skipped where multicast does not work."""
    from zeroconf import Zeroconf

    reg = make_registry()
    cfg = OscConfig(host="0.0.0.0", port=0, oscquery_port=0)  # loopback is not announced
    with OscBridge(reg, cfg).start() as bridge:
        zc = Zeroconf()
        try:
            found = {}
            deadline = time.monotonic() + 6
            while len(found) < 2 and time.monotonic() < deadline:
                for kind in ("_oscjson._tcp.local.", "_osc._udp.local."):
                    if kind not in found:
                        info = zc.get_service_info(kind, "dreamdeck." + kind, timeout=300)
                        if info is not None:
                            found[kind] = info.port
        finally:
            zc.close()
        if not found:
            pytest.skip("zeroconf/multicast not available here")
        assert found == {
            "_oscjson._tcp.local.": bridge.oscquery.port,
            "_osc._udp.local.": bridge.port,
        }
