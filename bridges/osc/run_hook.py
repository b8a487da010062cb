"""`dreamdeck run` integration: the OSC flags and starting the bridge on the engine."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any

log = logging.getLogger(__name__)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), _port(port)


def _port(text: str) -> int:
    try:
        p = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= p < 65536:
        raise argparse.ArgumentTypeError(f"port {p} out of range 0..65535")
    return p


def _allow(text: str) -> frozenset[str]:
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            out.add(str(ipaddress.ip_address(part)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an IP address: {part!r}") from None
    return frozenset(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OSC control (docs/osc.md)")
    g.add_argument("--no-osc", action="store_true", help="no OSC server")
    g.add_argument(
        "--osc-host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)",
    )
    g.add_argument(
        "--osc-port", type=_port, default=9137, help="UDP port for OSC in (default 9137)"
    )
    g.add_argument(
        "--osc-feedback",
        type=_host_port,
        metavar="HOST:PORT",
        help="send feedback here (default: the last sender's host)",
    )
    g.add_argument(
        "--osc-feedback-port",
        type=_port,
        default=9139,
        help="feedback port on the last sender's host (default 9139)",
    )
    g.add_argument(
        "--osc-feedback-numeric",
        type=_host_port,
        metavar="HOST:PORT",
        help="also send the feedback whose arguments are all numbers here (values, fps,"
        " latency...): for a TouchDesigner OSC In CHOP, which cannot hold the strings"
        " (state, prompts, errors) the main feedback target gets",
    )
    g.add_argument(
        "--no-osc-feedback", action="store_true", help="send no feedback, errors or status"
    )
    g.add_argument(
        "--osc-allow",
        type=_allow,
        metavar="IP,IP",
        help="only accept OSC from these addresses (loopback always)",
    )
    g.add_argument(
        "--oscquery-port", type=_port, default=9138, help="OSCQuery HTTP port (default 9138)"
    )
    g.add_argument("--no-oscquery", action="store_true", help="no OSCQuery service")
    g.add_argument(
        "--oscquery-allow-host",
        type=lambda v: frozenset(h.strip() for h in v.split(",") if h.strip()),
        metavar="NAME,NAME",
        help="extra host names OSCQuery answers to (IP addresses, localhost and this"
        " machine's name always; others get 403: DNS rebinding)",
    )
    g.add_argument("--no-zeroconf", action="store_true", help="do not announce on zeroconf/Bonjour")
    g.add_argument(
        "--osc-ignore-timetags",
        action="store_true",
        help="apply bundles on arrival, ignoring their timetags (for hosts whose clocks are off)",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    from bridges.osc.server import OscConfig

    return OscConfig(
        host=args.osc_host,
        port=args.osc_port,
        feedback=args.osc_feedback,
        feedback_port=args.osc_feedback_port,
        feedback_enabled=not args.no_osc_feedback,
        feedback_numeric=args.osc_feedback_numeric,
        allow=args.osc_allow or frozenset(),
        oscquery_port=None if args.no_oscquery else args.oscquery_port,
        zeroconf=not args.no_zeroconf,
        oscquery_hosts=getattr(args, "oscquery_allow_host", None) or frozenset(),
        timetags=not args.osc_ignore_timetags,
    )


def start(args: argparse.Namespace, engine: Any) -> Any:
    """Start the bridge on ``engine.registry``; None when ``--no-osc``."""
    if args.no_osc:
        return None
    from bridges.osc.server import OscBridge

    status = getattr(engine, "status", None)
    return OscBridge(engine.registry, config_from_args(args), status=status).start()
