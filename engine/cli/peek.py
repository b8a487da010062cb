"""``dreamdeck peek``: look into a running engine's output from another process.

Reads frames from the shared-memory ring and prints one JSON line per new frame, so a
VJ (or a test) can check that frames flow without TouchDesigner: sequence, block,
size, timestamp, and a crc32 of the pixels (equal frames, equal checksums).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "peek",
        help="print one JSON line per new frame of a shared-memory output",
        description="Read frames from a running engine's shared-memory ring (dreamdeck run "
        "--shm NAME) and print one JSON line per frame.",
    )
    p.add_argument(
        "--shm", default="dreamdeck", metavar="NAME", help="ring name (default: %(default)s)"
    )
    p.add_argument(
        "--count", type=int, default=10, metavar="N", help="frames to read (default: %(default)s)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up after S seconds without a new frame (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    import zlib

    from engine.cli import UsageError
    from engine.runtime.shm_ring import RingError, ShmRingReader

    if args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    try:
        reader = ShmRingReader(args.shm)
    except ValueError as e:
        raise UsageError(str(e)) from e
    n, last = 0, time.monotonic()
    buf = None
    try:
        while n < args.count:
            try:
                got = reader.read(buf)
            except RingError as e:
                print(f"dreamdeck peek: ring {args.shm!r}: {e}", file=sys.stderr)
                return 1
            if got is None:
                if time.monotonic() - last > args.timeout:
                    state = "no ring" if reader.header is None else "no new frame"
                    print(
                        f"dreamdeck peek: {state} on {args.shm!r} for {args.timeout:g}s "
                        f"({n} of {args.count} frames read)",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.001)
                continue
            info, buf = got
            last = time.monotonic()
            n += 1
            line = {
                "sequence": info.sequence,
                "block": info.block,
                "index": info.index,
                "width": info.width,
                "height": info.height,
                "generation": info.generation,
                "timestamp": info.timestamp,
                "crc32": zlib.crc32(buf),
            }
            print(json.dumps(line), flush=True)
    finally:
        reader.close()
    return 0
