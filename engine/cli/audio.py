"""`dreamdeck audio analyze FILE [--json]` checks a track before a show (tempo, beats,
onsets, band levels); `dreamdeck audio devices` lists the input devices PortAudio sees."""

from __future__ import annotations

import argparse
import json
import sys

from engine.cli import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audio",
        help="analyse an audio file, list audio input devices",
        description="Audio tools: `analyze FILE` prints tempo, beat and onset times and band"
        " levels (the analysis the modulation layer uses); `devices` lists input devices.",
    )
    s = p.add_subparsers(dest="audio_command", metavar="ACTION")
    a = s.add_parser("analyze", help="tempo, beats, onsets and band levels of a file")
    a.add_argument("file", help="an audio file (anything FFmpeg decodes)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.add_argument(
        "--bands", metavar="HZ,HZ,...", help="lower band edges (default 30,150,800,4000)"
    )
    a.set_defaults(func=analyze)
    d = s.add_parser("devices", help="list audio input devices")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=devices)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def analyze(args: argparse.Namespace) -> int:
    from bridges.audio.analysis import DEFAULT_BANDS, AnalysisError
    from bridges.audio.analysis import analyze as run_analysis
    from bridges.audio.sources import AudioSourceError, decode_file

    try:
        bands = (
            tuple(float(x) for x in args.bands.replace(",", " ").split())
            if args.bands
            else DEFAULT_BANDS
        )
    except ValueError:
        raise UsageError(f"--bands {args.bands!r}: expected Hz numbers") from None
    try:
        x, rate, channels = decode_file(args.file)
        summary, _ = run_analysis(x.mean(axis=0), rate, bands)
    except (AudioSourceError, AnalysisError) as e:
        raise UsageError(str(e)) from None
    out = summary.to_json()
    out["file"] = args.file
    out["channels"] = channels
    if args.json:
        print(json.dumps(out))
        return 0
    tempo = "none found" if out["tempo"] is None else f"{out['tempo']:.2f} BPM"
    print(f"{args.file}: {out['duration']:.2f} s, {rate} Hz, {channels} ch")
    print(f"tempo {tempo} (confidence {out['tempo_confidence']:.2f}), {len(out['beats'])} beats")
    print(
        f"onsets: {len(out['onsets'])} in all; "
        + ", ".join(f"{k} {len(v)}" for k, v in out["band_onsets"].items())
    )
    for b in out["bands"]:
        print(
            f"  {b['name']:8s} {b['lo_hz']:7.0f}-{b['hi_hz']:<7.0f} Hz  mean {b['mean']:.2f}"
            f"  p95 {b['p95']:.2f}  max {b['max']:.2f}"
        )
    return 0


def devices(args: argparse.Namespace) -> int:
    from bridges.audio.sources import AudioSourceError, list_devices

    try:
        devs = list_devices()
    except AudioSourceError as e:
        print(f"dreamdeck audio devices: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(devs))
        return 0
    if not devs:
        print("no audio input devices")
    for d in devs:
        print(
            f"{d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['rate']:.0f} Hz, {d['hostapi']})"
        )
    return 0
