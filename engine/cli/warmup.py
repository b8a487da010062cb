"""`dreamdeck warmup --preset P`: fill the compile cache for a preset before the doors open.

Builds the preset's pipeline exactly as `run` does, points PyTorch's compile caches at the
models folder (engine.runtime.startup), runs the preset's warm-up blocks (every graph the
show needs compiles, cuDNN and Triton autotune) and saves PyTorch's portable cache
artifacts beside them. The next `run` of the same preset on the same GPU and PyTorch then
finds everything on disk. It prints each phase's time and one line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.cli import T_START as _T_IMPORT
from engine.cli import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engine.cli.run import add_preset_arguments

    p = sub.add_parser(
        "warmup",
        help="compile a preset ahead of a show (fills the on-disk compile cache)",
        description="Build the preset, compile and run its warm-up blocks, and keep what the"
        " compiler learned under the models folder, so `dreamdeck run` of the same preset"
        " starts in seconds.",
    )
    add_preset_arguments(p)
    p.add_argument(
        "--blocks",
        type=int,
        metavar="N",
        help="warm-up blocks (default: the preset's warmup_blocks, at least 1)",
    )
    p.add_argument("--json", action="store_true", help="print the phases as JSON")
    p.set_defaults(func=warmup)


def warmup(args: argparse.Namespace) -> int:
    from engine.cli.run import build_or_explain, preset_from_args
    from engine.runtime.startup import (
        Phases,
        mark_warm,
        save_cache_artifacts,
        use_compile_cache,
    )

    preset = preset_from_args(args)
    if args.blocks is not None and args.blocks < 1:
        raise UsageError(f"--blocks {args.blocks}: at least 1 warm-up block")
    blocks = args.blocks or max(1, int(preset.warmup_blocks))
    phases = Phases(t0=_T_IMPORT)
    phases.add("launch (imports, flags)", time.perf_counter() - _T_IMPORT)
    cache = None
    if preset.compile and preset.device != "cpu":
        cache = use_compile_cache(args.models_dir, preset.name, preset.device)
    else:
        print(
            f"dreamdeck warmup: preset {preset.name} does not compile (compile: false or the"
            " CPU): nothing is cached, the run below only checks that it builds",
            file=sys.stderr,
        )
    pipeline = build_or_explain(preset, args.models_dir, args.random_weights, phases)
    if pipeline is None:
        return 1

    from engine.runtime.block_driver import BlockDriver
    from engine.runtime.controls import make_registry

    registry = make_registry(
        default_prompt=preset.prompt,
        default_steps=preset.steps,
        assets_dir=preset.vace.assets_dir,
    )
    registry.set_many(preset.control_defaults())
    driver = BlockDriver(pipeline, registry=registry)
    with phases.phase(f"compile + warm-up ({blocks} blocks)"):
        driver.warmup(registry.snapshot(), blocks)
    saved = None
    if cache is not None:
        with phases.phase("save cache artifacts"):
            saved = save_cache_artifacts(cache)
        mark_warm(cache, preset.name, blocks)
    pipeline.close()
    summary = {
        "preset": preset.name,
        "blocks": blocks,
        "compile_cache": str(cache) if cache is not None else None,
        "artifacts": str(saved) if saved is not None else None,
        "phases_s": phases.as_dict(),
        "total_s": round(phases.elapsed(), 3),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        where = f"; cache {cache}" if cache is not None else ""
        print(f"dreamdeck warmup: {preset.name} ready in {phases.elapsed():.1f} s{where}")
    return 0
