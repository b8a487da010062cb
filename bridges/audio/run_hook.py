"""`dreamdeck run` flags for audio input and modulation presets."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def _bands(text: str) -> tuple[float, ...]:
    from bridges.audio.analysis import AnalysisError, check_bands

    try:
        edges = [float(x) for x in text.replace(",", " ").split()]
        return check_bands(edges, 384000)
    except (ValueError, AnalysisError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _pcm(text: str) -> Any:
    from bridges.audio.sources import AudioSourceError, parse_pcm_format

    try:
        return parse_pcm_format(text)
    except AudioSourceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mod_file(text: str) -> dict[str, Any]:
    """A preset file (or a shipped name), checked now: a bad one stops the launch with
    file:line, before anything starts."""
    from pathlib import Path

    from engine.runtime.controls import mod_targets, standard_params
    from engine.runtime.modulation import ModPresetError, preset_path, read_preset

    params = standard_params()
    try:
        path = Path(text) if Path(text).is_file() else preset_path(text)
        return read_preset(path, {p.path: p for p in params}, lambda: mod_targets(params))
    except ModPresetError as e:
        raise argparse.ArgumentTypeError("\n  ".join(e.problems)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("audio and modulation (docs/osc.md: mod/*)")
    g.add_argument(
        "--audio",
        metavar="SOURCE",
        help="audio input: - (raw PCM on stdin, see --audio-format), file:PATH (loops), or an"
        " input device name/index (`dreamdeck audio devices`)",
    )
    g.add_argument(
        "--audio-format",
        type=_pcm,
        default=None,
        metavar="FMT[:RATE[:CH]]",
        help="PCM on stdin: s16le, s32le, f32le, f64le or u8, rate, channels (default s16le:48000:2)",
    )
    g.add_argument(
        "--audio-bands",
        type=_bands,
        default=None,
        metavar="HZ,HZ,...",
        help="lower edges of the analysis bands, 4 to 16 (default 30,150,800,4000: low,"
        " lowmid, highmid, high)",
    )
    g.add_argument("--audio-once", action="store_true", help="play an audio file once, no loop")
    g.add_argument(
        "--audio-tempo",
        action="store_true",
        help="the audio's beat leads the tempo grid (when no Link or MIDI clock does)",
    )
    g.add_argument(
        "--mod",
        type=_mod_file,
        metavar="FILE",
        help="modulation preset (YAML file, or a name in presets/mod); live: /dd/mod/load NAME",
    )


class _Audio:
    def __init__(self, inp: Any):
        self.inp = inp

    def close(self) -> None:
        if self.inp is not None:
            self.inp.close()


def start(args: argparse.Namespace, engine: Any) -> Any:
    registry = engine.registry
    if getattr(args, "mod", None):
        registry.set_many(args.mod)
    spec = getattr(args, "audio", None)
    if not spec:
        return None
    from bridges.audio.analysis import DEFAULT_BANDS
    from bridges.audio.live import AudioInput
    from bridges.audio.sources import PcmFormat, open_source

    fmt = args.audio_format or PcmFormat()
    loop = not args.audio_once

    def opener() -> Any:
        return open_source(spec, fmt, loop=loop)

    def report(message: str) -> None:
        engine.driver.last_error = f"audio: {message}"[:300]

    inp = AudioInput(
        opener,
        registry,
        bands=args.audio_bands or DEFAULT_BANDS,
        lead_tempo=args.audio_tempo,
        on_error=report,
    ).start()
    log.info("audio input: %s", spec)
    return _Audio(inp)
