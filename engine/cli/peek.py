"""``dreamdeck peek``: look into a running engine's output from another process.

Reads frames from the shared-memory ring and prints one JSON line per new frame, so a
VJ (or a test) can check that frames flow without TouchDesigner: sequence, block,
size, timestamp, and a crc32 of the pixels (equal frames, equal checksums).

``--stats SECONDS`` instead reads for that long and prints one summary: frames seen,
frames missed (sequence gaps: the reader was too slow), distinct frames (by checksum),
the mean and standard deviation of the intervals between consecutive frames, the
largest gap and how many intervals were more than 2 ms off the mean. Intervals come from
the ring's own timestamps (the engine stamps each frame with the wall clock when it
publishes it, after any interpolation), so this reader's polling does not add to them;
the reader's receive-time spread is reported alongside (``recv_std_ms``). An interval
spanning a missed frame is left out. This is how the frame-time jitter target (issue
16: ≤ 2 ms standard deviation over 60 s) is measured from another process.
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
    p.add_argument(
        "--stats",
        type=float,
        default=None,
        metavar="SECONDS",
        help="read for SECONDS (after the first frame) and print frame-time statistics"
        " instead of one line per frame",
    )
    p.add_argument("--json", action="store_true", help="with --stats: one JSON object")
    p.set_defaults(func=run)


def frame_stats(samples: list[tuple[int, float, float, int]]) -> dict:
    """Statistics of ``samples`` = [(sequence, ring timestamp s, receive time s, crc32)]
    in reading order. Intervals are between frames with consecutive sequence numbers."""
    import statistics

    frames = len(samples)
    out: dict = {
        "frames": frames,
        "distinct": len({c for *_, c in samples}),
        "timing": "ring timestamps (publish time, writer's clock)",
    }
    if frames < 2:
        return {**out, "missed": 0, "intervals": 0}
    span_seq = samples[-1][0] - samples[0][0] + 1
    ivs = [
        (b[1] - a[1]) * 1e3 for a, b in zip(samples, samples[1:], strict=False) if b[0] == a[0] + 1
    ]
    recv = [
        (b[2] - a[2]) * 1e3 for a, b in zip(samples, samples[1:], strict=False) if b[0] == a[0] + 1
    ]
    duration = samples[-1][1] - samples[0][1]
    out.update(
        missed=span_seq - frames,
        duration_s=duration,
        fps=(span_seq - 1) / duration if duration > 0 else None,
        distinct_fps=out["distinct"] / duration if duration > 0 else None,
        intervals=len(ivs),
    )
    if len(ivs) >= 2:
        mean = statistics.fmean(ivs)
        out.update(
            mean_ms=mean,
            std_ms=statistics.pstdev(ivs),
            max_gap_ms=max(ivs),
            min_ms=min(ivs),
            p99_ms=sorted(ivs)[min(len(ivs) - 1, int(0.99 * len(ivs)))],
            off_by_2ms=sum(abs(x - mean) > 2.0 for x in ivs),
            recv_std_ms=statistics.pstdev(recv),
        )
    return out


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    import zlib

    from engine.cli import UsageError
    from engine.runtime.shm_ring import RingError, ShmRingReader

    if args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    if args.stats is not None and not 0 < args.stats <= 86400:
        raise UsageError(f"--stats takes seconds in (0, 86400], got {args.stats}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    try:
        reader = ShmRingReader(args.shm)
    except ValueError as e:
        raise UsageError(str(e)) from e
    n, last = 0, time.monotonic()
    buf = None
    samples: list[tuple[int, float, float, int]] = []
    end = None
    try:
        while n < args.count if args.stats is None else end is None or last < end:
            try:
                got = reader.read(buf)
            except RingError as e:
                print(f"dreamdeck peek: ring {args.shm!r}: {e}", file=sys.stderr)
                return 1
            if got is None:
                if time.monotonic() - last > args.timeout:
                    state = "no ring" if reader.header is None else "no new frame"
                    want = f"{args.count}" if args.stats is None else f"{args.stats:g} s of"
                    print(
                        f"dreamdeck peek: {state} on {args.shm!r} for {args.timeout:g}s "
                        f"({n} of {want} frames read)",
                        file=sys.stderr,
                    )
                    if samples:
                        _print_stats(frame_stats(samples), args.json)
                    return 1
                time.sleep(0.001)
                continue
            info, buf = got
            last = time.monotonic()
            n += 1
            if args.stats is not None:
                if end is None:
                    end = last + args.stats
                samples.append((info.sequence, info.timestamp, last, zlib.crc32(buf)))
                continue
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
    if args.stats is not None:
        _print_stats(frame_stats(samples), args.json)
    return 0


def _print_stats(st: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(st), flush=True)
        return
    for k, v in st.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}", flush=True)
