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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--controls-only",
        action="store_true",
        help="render a control log that cannot be replayed exactly (recorded without its"
        " history, or made from live input video) anyway: its controls replay, its frames"
        " will differ from the recording",
    )
    p.set_defaults(func=render)


def render(args: argparse.Namespace) -> int:
    from bridges.timeline import FPS, TimelineError, load_show
    from engine.runtime.presets import available_presets
    from engine.runtime.recorder import Recorder, RecorderError

    out = Path(args.output)
    try:
        Recorder.check(out)
    except RecorderError as e:
        raise UsageError(f"-o: {e}") from None
    if args.blocks is not None and args.blocks < 1:
        raise UsageError("--blocks must be at least 1")
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

    pipeline = build_or_explain(preset, args.models_dir, args.random_weights)
    if pipeline is None:
        return 1
    registry = make_registry(default_prompt=preset.prompt, default_steps=preset.steps)
    registry.set_many(preset.control_defaults())
    # Flags beat the file: the paths they set are not replayed.
    skip = frozenset(
        path
        for path, flag in (("steps", args.steps), ("seed", args.seed), ("decoder", args.decoder))
        if flag is not None
    )
    driver = BlockDriver(pipeline, sync_prompts=True)
    blocks = show.blocks if args.blocks is None else min(show.blocks, args.blocks)
    try:
        recorder = Recorder(
            out,
            width=preset.width,
            height=preset.height,
            fps=FPS,
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
        for result in play_show(show, driver, registry, blocks=blocks, skip=skip):
            recorder.submit(result.rgba, result.record, wait=True)
            frames += result.frames
            progress.update()
        progress.close()
    finally:
        recorder.close()
        pipeline.close()
    if recorder.error is not None:
        print(f"dreamdeck render: writing {out} failed: {recorder.error}", file=sys.stderr)
        return 1
    print(
        f"rendered {frames} frames ({blocks} blocks, {frames / FPS:.2f} s) to {out} + {recorder.log_path}",
        file=sys.stderr,
    )
    return 0


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
    show, driver, registry, *, blocks: int | None = None, skip: frozenset[str] = frozenset()
):
    """Yield the `BlockResult` of every block of `show`: its changes applied through the
    registry, then the block made by `driver` (synchronously). Control logs replay the
    prompt targets where the recorded engine started them; the history of a recording
    started mid-show (`show.lead_in` blocks) is run first and not yielded."""
    from bridges.timeline import FPS, first_frame
    from engine.runtime.registry import ControlError

    replay = show.kind == "control-log"
    lead = show.lead_in
    for b in range(lead + (show.blocks if blocks is None else blocks)):
        changes, events = show.changes_at(b, skip=skip, known=registry)
        # Immediate controls (pause, tempo, ...) steer a live show, not its frames.
        items = [(k, v) for k, v in changes.items() if registry.param(k).applies != "immediate"]
        items += [(e, 1) for e in events]
        try:
            registry.set_many(items)
        except ControlError:  # apply what can be applied; report each refusal
            for item in items:
                try:
                    registry.set_many([item])
                except ControlError as e:
                    log.warning("block %d: %s refused: %s", b, item[0], e)
        controls = registry.begin_block(b, now=first_frame(b) / FPS)
        result = driver.step(controls, prompt=show.prompt_at(b), replay=replay)
        if b >= lead:
            yield result
