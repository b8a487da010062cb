"""`dreamdeck render SHOW -o out.mp4`: a timeline or a recorded control log, offline.

Deterministic: one thread generates (the recorder's encoder thread only encodes what it is
given), prompt encodings are awaited before the block that needs them, and the controls
of each block come from the file alone. Same file, model, settings and machine give the
same frames. Resolution, seed and steps come from the file unless a flag overrides them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.cli import UsageError
from engine.cli.run import DEFAULT_PRESET, add_preset_arguments, build_or_explain, preset_from_args

log = logging.getLogger("dreamdeck.render")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="render a timeline or a recorded control log to mp4",
        description="Render a Daydream v2.0 timeline (.json) or a dreamdeck control log"
        " (.controls.jsonl) to H.264 mp4, offline and reproducibly. Time maps to frames at"
        " 16 fps; block 0 makes 9 frames, every next block 12.",
    )
    p.add_argument("show", help="timeline .json (Daydream v2.0) or control log .controls.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="the video to write")
    add_preset_arguments(p)
    p.add_argument("--blocks", type=int, metavar="N", help="render at most N blocks")
    p.add_argument(
        "--fps",
        type=float,
        metavar="FPS",
        help="output frame rate (e.g. 30 or 60): frames between the model's 16 fps ones are"
        " interpolated with RIFE, deterministically (needs `dreamdeck download --rife`)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--audio",
        metavar="TRACK",
        help="drive the modulations with this audio file at the video clock, and mux it into"
        " the mp4 (with a control log, the recorded values are replayed instead)",
    )
    p.add_argument(
        "--mod", metavar="FILE", help="modulation preset (YAML file, or a name in presets/mod)"
    )
    p.add_argument(
        "--lenient",
        action="store_true",
        help="render even when changes in the file are refused (unknown controls, values out"
        " of bounds), without them; by default that is an error (exit 2) before rendering",
    )
    p.add_argument(
        "--controls-only",
        action="store_true",
        help="render a control log that cannot be replayed exactly (recorded without its"
        " history, or made from live input video) anyway: its controls replay, its frames"
        " will differ from the recording",
    )
    p.set_defaults(func=render)


def render(args: argparse.Namespace) -> int:
    from bridges.timeline import FPS, TimelineError, first_frame, load_show
    from engine.runtime.presets import available_presets
    from engine.runtime.recorder import Recorder, RecorderError

    out = Path(args.output)
    try:
        Recorder.check(out)
    except RecorderError as e:
        raise UsageError(f"-o: {e}") from None
    if args.blocks is not None and args.blocks < 1:
        raise UsageError("--blocks must be at least 1")
    out_fps = None
    if getattr(args, "fps", None) is not None:
        from engine.runtime.frame_path import check_output_fps

        try:
            out_fps = check_output_fps(args.fps)
        except ValueError as e:
            raise UsageError(f"--fps: {e}") from None
        if out_fps is None:
            raise UsageError("--fps must be positive")
    try:
        show = load_show(args.show)
    except TimelineError as e:
        raise UsageError(str(e)) from None
    if Path(args.show).resolve() == out.resolve():
        raise UsageError("the output would overwrite the show file")
    if show.inexact is not None:
        if not args.controls_only:
            raise UsageError(
                f"{show.path}: cannot be replayed exactly: {show.inexact}"
                " (--controls-only renders its controls anyway)"
            )
        log.warning("%s: rendering the controls only: %s", show.path, show.inexact)

    if args.preset is None and args.model is None:
        recorded = show.header.get("preset")
        args.preset = recorded if recorded in available_presets() else DEFAULT_PRESET
    preset = preset_from_args(
        args,
        height=show.height,
        width=show.width,
        seed=show.seed,
        steps=show.steps,
        kv_bias=show.kv_bias,
    )

    preset = _with_quantization(preset, show)

    import tqdm

    from engine.runtime.block_driver import BlockDriver
    from engine.runtime.controls import make_registry

    def fresh_registry(lora_check=None):
        registry = make_registry(
            default_prompt=preset.prompt,
            default_steps=preset.steps,
            assets_dir=preset.vace.assets_dir,
            lora_check=lora_check,
        )
        registry.set_many(preset.control_defaults())
        return registry

    # Flags beat the file: the paths they set are not replayed.
    skip = frozenset(
        path
        for path, flag in (("steps", args.steps), ("seed", args.seed), ("decoder", args.decoder))
        if flag is not None
    )
    if show.kind == "control-log":
        # the log holds the values the blocks used, modulations included: replay them as
        # they are, with no modulation on top
        skip = skip | {p.path for p in fresh_registry() if p.path.startswith("mod/")}
    blocks = show.blocks if args.blocks is None else min(show.blocks, args.blocks)
    # Every change of the file through a scratch registry first (no model): what would be
    # refused stops the render here, before minutes of loading, unless --lenient.
    refused = check_show(show, fresh_registry(), blocks=blocks, skip=skip)
    # A LoRA a timeline names but this machine lacks (Scope timelines carry another
    # machine's paths) is said by name and the show renders without it, as issue 17 asks;
    # every other refusal stops the render unless --lenient.
    for b, path, reason in refused:
        if path.startswith("lora/"):
            log.warning("%s: block %d: %s not loaded: %s", show.path, b, path, reason[:300])
    refused = [r for r in refused if not r[1].startswith("lora/")]
    if refused and not args.lenient:
        b, path, reason = refused[0]
        raise UsageError(
            f"{show.path}: {len(refused)} change(s) would be refused, the first at block {b}:"
            f" {path}: {reason[:300]}. Fix the file, or pass --lenient to render without them"
        )
    pipeline = build_or_explain(preset, args.models_dir, args.random_weights)
    if pipeline is None:
        return 1
    resample = None
    if out_fps is not None and out_fps != FPS:
        from engine.runtime.interpolator import (
            BlockResampler,
            InterpolationUnavailable,
            build_interpolator,
        )

        try:
            interp = build_interpolator(
                model=preset.model,
                device=pipeline.device,
                models_dir=args.models_dir,
                random_weights=args.random_weights,
            )
        except InterpolationUnavailable as e:
            pipeline.close()
            print(f"dreamdeck render: --fps {out_fps:g}: {e}", file=sys.stderr)
            return 1
        resample = BlockResampler(interp, FPS / out_fps)
    from engine.runtime.engine import _lora_check

    registry = fresh_registry(_lora_check(pipeline))
    try:
        track = _audio_and_mod(args, registry)
    except UsageError:
        pipeline.close()
        raise
    driver = BlockDriver(pipeline, sync_prompts=True)
    try:
        recorder = Recorder(
            out,
            width=preset.width,
            height=preset.height,
            fps=out_fps or FPS,
            header={
                "model": preset.model,
                "preset": preset.name,
                "mode": "render",
                "source": str(show.path),
            },
        )
    except RecorderError as e:
        pipeline.close()
        raise UsageError(f"-o: {e}") from None
    log.info(
        "rendering %s (%s, %d blocks) with %s at %dx%d, steps %s",
        show.path,
        show.kind,
        blocks,
        preset.name,
        preset.width,
        preset.height,
        preset.steps,
    )
    if show.lead_in:
        log.info(
            "the recording started mid-show: running its %d blocks of history first (no output)",
            show.lead_in,
        )
    frames = 0
    try:
        progress = tqdm.tqdm(
            total=blocks, desc="render", unit="block", disable=args.no_progress, file=sys.stderr
        )
        before = None
        if track is not None:
            bank = registry.modulator.bank

            def before(b: int) -> None:  # the audio of block b's own span of video time
                track.feed_until(bank, first_frame(b + 1) / FPS)

        for result in play_show(show, driver, registry, blocks=blocks, skip=skip, before=before):
            rgba = result.rgba
            if resample is not None:
                rgba = resample(rgba.cpu().numpy() if hasattr(rgba, "cpu") else rgba)
            recorder.submit(rgba, result.record, wait=True)
            frames += len(rgba)
            progress.update()
        progress.close()
    finally:
        recorder.close()
        pipeline.close()
        assert show.warnings is not None
        show.warnings.summarise()
    if recorder.error is not None:
        print(f"dreamdeck render: writing {out} failed: {recorder.error}", file=sys.stderr)
        return 1
    if track is not None:
        from bridges.audio.offline import mux_audio
        from bridges.audio.sources import AudioSourceError

        try:
            mux_audio(out, track.path)
        except AudioSourceError as e:
            print(f"dreamdeck render: {e}", file=sys.stderr)
            return 1
    print(
        f"rendered {frames} frames ({blocks} blocks, {frames / (out_fps or FPS):.2f} s) to {out}"
        f" + {recorder.log_path}",
        file=sys.stderr,
    )
    return 0


def _audio_and_mod(args: argparse.Namespace, registry):
    """--mod into the registry, --audio analysed (its beats become the LFOs' grid).
    Returns the track driver or None. Errors are usage errors naming the file."""
    from pathlib import Path as _Path

    from engine.runtime.controls import mod_targets
    from engine.runtime.modulation import ModPresetError, preset_path, read_preset

    if args.mod:
        params = list(registry)
        try:
            path = _Path(args.mod) if _Path(args.mod).is_file() else preset_path(args.mod)
            registry.set_many(
                read_preset(path, {p.path: p for p in params}, lambda: mod_targets(params))
            )
        except ModPresetError as e:
            raise UsageError("--mod: " + "\n  ".join(e.problems)) from None
    if not args.audio:
        return None
    from bridges.audio.offline import TrackDriver
    from bridges.audio.sources import AudioSourceError

    try:
        track = TrackDriver(args.audio)
    except (AudioSourceError, ValueError) as e:
        raise UsageError(f"--audio: {e}") from None
    registry.modulator.beat_at = track.beat_at
    log.info(
        "audio %s: %.1f s, %s BPM, %d beats",
        args.audio,
        track.duration,
        "no tempo found, 120" if track.summary.tempo is None else f"{track.summary.tempo:.1f}",
        len(track.beats),
    )
    return track


def _with_quantization(preset, show):
    """A timeline's ``quantization: fp8_e4m3fn`` turns on the preset's float8 weights, where
    they can run (a CUDA GPU); elsewhere it is said and ignored."""
    if getattr(show, "quantization", None) != "fp8" or preset.fp8:
        return preset
    import torch

    if preset.device == "cpu" or (preset.device == "auto" and not torch.cuda.is_available()):
        log.warning(
            "%s: quantization fp8_e4m3fn ignored: float8 weights need a CUDA GPU", show.path
        )
        return preset
    log.info("%s: quantization fp8_e4m3fn: transformer weights in float8", show.path)
    return preset.replace(fp8=True)


def play_show(
    show,
    driver,
    registry,
    *,
    blocks: int | None = None,
    skip: frozenset[str] = frozenset(),
    before=None,
):
    """Yield the `BlockResult` of every block of `show`: its changes applied through the
    registry, then the block made by `driver` (synchronously). Control logs replay the
    prompt targets where the recorded engine started them; the history of a recording
    started mid-show (`show.lead_in` blocks) is run first and not yielded. `before(b)`, when
    given, runs before block b's controls are taken (render --audio feeds the block's audio
    there)."""
    replay = show.kind == "control-log"
    lead = show.lead_in
    for b in range(lead + (show.blocks if blocks is None else blocks)):
        controls = apply_block(show, registry, b, skip=skip, before=before)
        loras = show.records[b].get("lora") if replay and b < len(show.records) else None
        result = driver.step(controls, prompt=show.prompt_at(b), replay=replay, loras=loras)
        if b >= lead:
            yield result


Refusal = tuple[int, str, str]  # (block, path, reason)


def apply_block(
    show,
    registry,
    b: int,
    *,
    skip: frozenset[str] = frozenset(),
    refused: list | None = None,
    before=None,
):
    """Apply the file's changes for block `b` and begin it: what can be applied is, each
    refusal is warned about (summarised per show) and appended to `refused`."""
    from bridges.timeline import FPS, first_frame
    from engine.runtime.registry import ControlError

    changes, events = show.changes_at(b, skip=skip)
    items = []
    for k, v in changes.items():
        if k not in registry:
            _refuse(show, refused, b, k, "unknown control (skipped)")
        elif registry.param(k).applies != "immediate":
            # Immediate controls (pause, tempo, ...) steer a live show, not its frames.
            items.append((k, v))
    for e in events:
        if e in registry:
            items.append((e, 1))
        else:
            _refuse(show, refused, b, e, "unknown trigger (skipped)")
    try:
        registry.set_many(items)
    except ControlError:  # apply what can be applied; report each refusal
        for item in items:
            try:
                registry.set_many([item])
            except ControlError as e:
                _refuse(show, refused, b, item[0], e.reason)
    if before is not None:
        before(b)
    return registry.begin_block(b, now=first_frame(b) / FPS)


def _refuse(show, refused: list | None, b: int, path: str, reason: str) -> None:
    show.warnings.warn(f"{path} refused", f"{show.path}: block {b}: {path} refused: {reason[:300]}")
    if refused is not None:
        refused.append((b, path, reason))


def check_show(
    show, registry, *, blocks: int | None = None, skip: frozenset[str] = frozenset()
) -> list[Refusal]:
    """Every change the show would make, through `registry` (a scratch one), without a
    model: the refusals, in order. Cheap: registry work only."""
    from bridges.timeline import ShowWarnings

    refused: list[Refusal] = []
    quiet = show.warnings
    show.warnings = ShowWarnings(show.path, per_kind=0)  # counted here, logged by the render
    try:
        for b in range(show.lead_in + (show.blocks if blocks is None else blocks)):
            apply_block(show, registry, b, skip=skip, refused=refused)
    finally:
        show.warnings = quiet
    return refused
