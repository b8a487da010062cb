"""`dreamdeck run` flags for MIDI controllers (discovered by engine/cli/run.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MIDI controllers")
    g.add_argument(
        "--midi-map",
        action="append",
        default=[],
        metavar="FILE",
        help="MIDI map YAML, or a shipped map name (apc_mini_mk2, nanokontrol2, "
        "launch_control_xl, midimix); repeat for several controllers",
    )
    g.add_argument(
        "--midi",
        metavar="REGEX",
        default=None,
        help="input port regex, overriding the maps' device: (see `dreamdeck midi ports`)",
    )
    g.add_argument("--no-midi", action="store_true", help="ignore --midi-map")
    g.add_argument(
        "--no-midi-feedback", action="store_true", help="send nothing back to controllers"
    )


def start(args: argparse.Namespace, engine: Any) -> Any:
    maps = getattr(args, "midi_map", None) or []
    if not maps or getattr(args, "no_midi", False):
        return None
    from bridges.midi.bridge import MidiBridge
    from bridges.midi.maps import load_map, resolve_map_path
    from bridges.midi.ports import MidiUnavailable, input_names

    loaded = [load_map(resolve_map_path(m), engine.registry) for m in maps]  # MapError: file:line
    try:
        input_names()
    except MidiUnavailable as e:
        # the show goes on without MIDI (OSC still works); say why, loudly
        log.error("MIDI disabled: %s", e)
        return None
    return MidiBridge(
        engine.registry,
        loaded,
        port=args.midi,
        feedback=not getattr(args, "no_midi_feedback", False),
    ).start()
