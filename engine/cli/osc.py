"""`dreamdeck osc`: the OSC address reference, and small send/dump tools.

    dreamdeck osc --list                 every address with type, range, description
    dreamdeck osc --markdown > docs/osc.md
    dreamdeck osc --html osc.html
    dreamdeck osc --send /dd/prompt "a forest at night"   (to 127.0.0.1:9137; --to HOST:PORT)
    dreamdeck osc --dump                 print the feedback arriving on port 9139

The command line is where things are wired together, so it may import the bridge.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("osc", help="OSC address reference; send and dump tools")
    p.add_argument(
        "--list", action="store_true", help="print every address with type, range and description"
    )
    p.add_argument(
        "--markdown", action="store_true", help="print the reference as Markdown (docs/osc.md)"
    )
    p.add_argument("--html", metavar="FILE", help="write the reference as an HTML page")
    p.add_argument(
        "--send",
        nargs="+",
        metavar=("ADDRESS", "ARG"),
        help="send one message (numbers are sent as int/float)",
    )
    p.add_argument(
        "--to",
        default="127.0.0.1:9137",
        metavar="HOST:PORT",
        help="where --send goes (default 127.0.0.1:9137)",
    )
    p.add_argument(
        "--dump",
        nargs="?",
        const=9139,
        type=int,
        metavar="PORT",
        help="print OSC arriving on PORT (default 9139: feedback)",
    )
    p.set_defaults(func=run)


def _arg(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run(args: argparse.Namespace) -> int:
    from bridges.osc import reference
    from engine.runtime.controls import make_registry

    if not (args.list or args.markdown or args.html or args.send or args.dump):
        raise UsageError(
            "say what to do: --list, --markdown, --html FILE, --send ADDRESS ..., or --dump"
        )
    registry = make_registry()
    if args.list:
        sys.stdout.write(reference.render_text(registry))
    if args.markdown:
        sys.stdout.write(reference.render_markdown(registry))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(reference.render_html(registry))
        except OSError as e:
            raise UsageError(f"--html {args.html}: {e.strerror}") from None
    if args.send:
        _send(args.send, args.to)
    if args.dump:
        _dump(args.dump)
    return 0


def _send(words: list[str], to: str) -> None:
    import socket

    from bridges.osc.wire import encode_message

    host, sep, port = to.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--to: expected HOST:PORT, got {to!r}")
    address = words[0]
    if not address.startswith("/"):
        raise UsageError(f"--send: an OSC address starts with '/', got {address!r}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(
            encode_message(address, [_arg(w) for w in words[1:]]), (host.strip("[]"), int(port))
        )


def _dump(port: int) -> None:
    import socket

    from bridges.osc.wire import OscDecodeError, decode

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("0.0.0.0", port))
    except OSError as e:
        raise UsageError(f"--dump: cannot listen on port {port}: {e.strerror}") from None
    print(f"listening on UDP {port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            data, addr = s.recvfrom(65536)
            try:
                for m in decode(data):
                    print(m.address, *[repr(a) for a in m.args], flush=True)
            except OscDecodeError as e:
                print(f"! from {addr[0]}: {e}", flush=True)
    finally:
        s.close()
