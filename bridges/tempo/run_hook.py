"""`dreamdeck run` flags for tempo: manual BPM, Ableton Link, MIDI clock, quantise."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tempo and quantise")
    g.add_argument("--bpm", type=float, default=None, help="starting tempo (20..300)")
    g.add_argument(
        "--link", action="store_true", help="follow Ableton Link (needs aalink: pip install aalink)"
    )
    g.add_argument(
        "--midi-clock", metavar="REGEX", default=None, help="follow MIDI clock from ports matching"
    )
    g.add_argument(
        "--quantize",
        choices=("off", "beat", "bar", "2bar", "4bar"),
        default=None,
        help="land performer changes on the beat grid (default off)",
    )
    g.add_argument("--beats-per-bar", type=int, default=4, help="metre (default 4)")


class _Tempo:
    def __init__(self, bridge: Any, watcher: Any):
        self.bridge, self.watcher = bridge, watcher

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self.bridge.close()


def start(args: argparse.Namespace, engine: Any) -> Any:
    """Always on: the quantizer and tap tempo cost nothing until used."""
    from bridges.tempo.bridge import TempoBridge

    bridge = TempoBridge(
        engine.registry,
        bpm=args.bpm,
        beats_per_bar=args.beats_per_bar,
        quantize=args.quantize,
    )
    if args.link:
        from bridges.tempo.link import LinkUnavailable

        try:
            bridge.use_link()
        except LinkUnavailable as e:
            log.error("%s; tempo stays manual", e)
    watcher = None
    if args.midi_clock:
        from bridges.midi.ports import MidiUnavailable, PortWatcher

        bridge.use_midi_clock()
        try:
            watcher = PortWatcher(
                args.midi_clock,
                on_message=lambda name, msg, t: bridge.feed_midi(msg, t),
                clock=engine.registry.clock,
            ).start()
        except MidiUnavailable as e:
            log.error("MIDI clock disabled: %s", e)
    bridge.start()
    return _Tempo(bridge, watcher)
