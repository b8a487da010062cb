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
        "--midi-optional",
        action="store_true",
        help="start without MIDI when a --midi-map cannot be loaded or MIDI is unavailable"
        " (default: that is an error at start, exit 2, like a bad preset)",
    )
    g.add_argument(
        "--no-midi-feedback", action="store_true", help="send nothing back to controllers"
    )


def check(args: argparse.Namespace) -> None:
    """Before the model loads: every --midi-map must load and MIDI must be available, or
    `dreamdeck run` stops with exit 2 (UsageError), as for a bad preset. With
    --midi-optional the show starts without MIDI instead, saying why."""
    maps = getattr(args, "midi_map", None) or []
    if not maps or getattr(args, "no_midi", False):
        return
    from bridges.midi.maps import MapError, duplicates, load_map, resolve_map_path
    from bridges.midi.ports import MidiUnavailable, input_names
    from engine.cli import UsageError
    from engine.runtime.controls import make_registry

    registry = make_registry()
    problems: list[str] = []
    for m in maps:
        try:
            loaded = load_map(resolve_map_path(m), registry)
        except MapError as e:
            problems += e.problems
            continue
        except Exception as e:  # noqa: BLE001 - a binary or odd file: one line, no traceback
            problems.append(f"{m}: cannot load: {type(e).__name__}: {str(e)[:200]}")
            continue
        dup, _ = duplicates(loaded)
        for line in dup[:5]:
            log.warning("%s", line)
        if len(dup) > 5:
            log.warning("... and %d more duplicate mappings", len(dup) - 5)
    if not problems:
        try:
            input_names()
        except MidiUnavailable as e:
            problems.append(f"MIDI is unavailable: {e}")
    if not problems:
        return
    shown = "\n  ".join(problems[:10]) + (
        f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    )
    if getattr(args, "midi_optional", False):
        log.error("MIDI disabled (--midi-optional):\n  %s", shown)
        args.no_midi = True
        return
    raise UsageError(f"--midi-map:\n  {shown}\n(--midi-optional starts without MIDI instead)")


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
        # checked at start (check()); reaching here means it went away since: say so
        log.error("MIDI disabled: %s", e)
        return None
    return MidiBridge(
        engine.registry,
        loaded,
        port=args.midi,
        feedback=not getattr(args, "no_midi_feedback", False),
    ).start()
