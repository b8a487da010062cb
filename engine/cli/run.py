"""`dreamdeck run`: the live engine with its outputs, recording and control bridges.

Bridges plug in through hooks: every importable ``bridges.<name>.run_hook`` module with
``add_arguments(parser)`` and ``start(args, engine) -> object with .close() | None``.
Their flags join this command's; they start after the engine is built and before
generation begins, and close on shutdown. The engine itself never imports a bridge.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.cli import T_START as _T_IMPORT
from engine.cli import UsageError

log = logging.getLogger("dreamdeck.run")

DEFAULT_PRESET = "h100-832x480"
# preset `ports` keys -> the OSC bridge's flag destinations (defaults only: flags win)
PORT_DESTS = {
    "host": "osc_host",
    "osc": "osc_port",
    "oscquery": "oscquery_port",
    "feedback": "osc_feedback_port",
}


# -- shared with `dreamdeck render` -----------------------------------------------------------


def add_preset_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and preset (presets/engine/README.md)")
    g.add_argument(
        "--preset",
        help=f"engine preset name or YAML file (default {DEFAULT_PRESET}; tiny with --model tiny)",
    )
    g.add_argument(
        "--model",
        choices=("14b", "1.3b", "tiny"),
        help="tiny: random weights on the CPU, no download",
    )
    g.add_argument(
        "--models-dir",
        help="models folder (default $DREAMDECK_MODELS or ~/.cache/dreamdeck/models)",
    )
    g.add_argument("--height", type=int, help="output height (multiple of 16)")
    g.add_argument("--width", type=int, help="output width (multiple of 16)")
    g.add_argument("--steps", help="step list, e.g. 1000,750,500,250, or quality|balanced|fast")
    g.add_argument("--seed", type=int, help="noise seed")
    g.add_argument("--prompt", help="prompt at start")
    g.add_argument("--decoder", choices=("wan", "tae"), help="frame decoder")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), help="where the model runs")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model dtype")
    g.add_argument(
        "--kv-cache", choices=("bf16", "fp8"), help="context K/V cache: model dtype or float8"
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights at full size, nothing downloaded (frames are noise; for timing)",
    )


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from engine.stream.schedule import STEP_PRESETS, StepsError, validate_steps

    try:
        if text.strip() in STEP_PRESETS:
            return list(STEP_PRESETS[text.strip()])
        return list(validate_steps([int(x) for x in text.replace(",", " ").split()]))
    except (StepsError, ValueError) as e:
        raise UsageError(f"--steps {text!r}: {e}") from None


def preset_from_args(args: argparse.Namespace, **defaults: Any) -> Any:
    """The preset named by the flags, with the flags' overrides. `defaults` (e.g. a timeline's
    resolution) apply where no flag was given."""
    from engine.runtime.presets import PresetError, load_preset

    name = args.preset or ("tiny" if args.model == "tiny" else DEFAULT_PRESET)
    overrides = {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "steps": _parse_steps(args.steps),
        "seed": args.seed,
        "prompt": args.prompt,
        "decoder": args.decoder,
        "device": args.device,
        "dtype": args.dtype,
        "kv_cache": getattr(args, "kv_cache", None),
    }
    for k, v in defaults.items():
        if overrides.get(k) is None:
            overrides[k] = v
    try:
        return load_preset(name).replace(**overrides)
    except PresetError as e:
        raise UsageError(str(e)) from None


def build_or_explain(
    preset: Any, models_dir: str | None, random_weights: bool = False, phases: Any = None
) -> Any:
    """Build the pipeline; on missing weights print which files and the download command."""
    from engine.runtime.pipeline import PipelineError, build_pipeline
    from engine.weights.checkpoint import WeightsError

    if preset.model == "tiny" or random_weights:
        print(
            f"dreamdeck: {'--model tiny' if preset.model == 'tiny' else '--random-weights'}:"
            " random weights, the frames are noise. Use it to wire up TouchDesigner, OSC and"
            " MIDI; `dreamdeck download` fetches the real model.",
            file=sys.stderr,
        )
    try:
        return build_pipeline(
            preset, models_dir=models_dir, random_weights=random_weights, phases=phases
        )
    except (PipelineError, WeightsError) as e:
        print(f"dreamdeck: {e}", file=sys.stderr)
        return None


def _fall_back_to_tiny(preset: Any, models_dir: str | None) -> bool:
    """Plain `dreamdeck run` (no --preset, no --model) starts the default preset when it can
    and the tiny model when it cannot (no GPU, or weights not downloaded), saying why and how
    to get the real thing, so the first command on a fresh machine always runs."""
    import torch

    from engine.weights.catalog import download_command, missing_files

    reasons = []
    if preset.device in ("auto", "cuda") and not torch.cuda.is_available():
        reasons.append("there is no CUDA GPU here")
    missing = missing_files(preset, models_dir)
    if missing:
        reasons.append("its weights are not downloaded:")
    lines = [f"dreamdeck: the default preset {preset.name} cannot run: {' and '.join(reasons)}"]
    lines += [f"  missing: {m}" for m in missing]
    if not reasons:
        return False
    if missing:
        lines.append(f"dreamdeck: fetch them with: {download_command(preset, models_dir)}")
    lines.append(
        "dreamdeck: starting the tiny model instead (random weights on the CPU: the frames are"
        " noise; wire up TouchDesigner, OSC and MIDI with it)"
    )
    print("\n".join(lines), file=sys.stderr)
    return True


def _warmup_blocks(args: argparse.Namespace, preset: Any, cache: Any) -> int:
    """How many throwaway warm-up blocks run before the show: `--warmup-blocks`, else none
    when this preset's compile cache is warm (engine/runtime/startup.py), else the
    preset's own count."""
    from engine.runtime.startup import is_warm

    if args.warmup_blocks is not None:
        if args.warmup_blocks < 0:
            raise UsageError(f"--warmup-blocks {args.warmup_blocks}: must be 0 or more")
        return args.warmup_blocks
    want = int(preset.warmup_blocks)
    if want > 0 and is_warm(cache, preset.name, want):
        log.info(
            "warm start: %s holds this preset's compiled blocks; the show starts without"
            " warm-up blocks (its first blocks load compiled code; --warmup-blocks N forces"
            " a warm-up)",
            cache,
        )
        return 0
    return want


# -- bridge hooks -----------------------------------------------------------------------------


def discover_hooks() -> list[ModuleType]:
    """Every importable ``bridges.<name>.run_hook``. A hook that fails to import is reported
    and skipped: one broken bridge must not take the show down."""
    try:
        import bridges
    except ImportError:
        return []
    hooks = []
    for info in sorted(pkgutil.iter_modules(bridges.__path__), key=lambda m: m.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        name = f"bridges.{info.name}.run_hook"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            log.warning("bridge hook %s cannot be imported: %s", name, e)
            continue
        except Exception as e:  # noqa: BLE001 - report and run without that bridge
            log.warning("bridge hook %s cannot be imported: %s", name, e)
            continue
        if callable(getattr(module, "add_arguments", None)) and callable(
            getattr(module, "start", None)
        ):
            hooks.append(module)
    return hooks


# -- the command ------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the live engine",
        description="Run the live engine: frames to TouchDesigner (shared memory, NDI, Spout),"
        " control over OSC/MIDI, optional recording.",
    )
    add_preset_arguments(p)
    g = p.add_argument_group("outputs")
    g.add_argument(
        "--shm", metavar="NAME", help="shared-memory ring name (default from the preset: dreamdeck)"
    )
    g.add_argument("--no-shm", action="store_true", help="no shared-memory output")
    g.add_argument(
        "--ndi",
        nargs="?",
        const="dreamdeck",
        metavar="NAME",
        help="NDI source (default name dreamdeck)",
    )
    g.add_argument(
        "--spout", nargs="?", const="dreamdeck", metavar="NAME", help="Spout sender (Windows)"
    )
    g.add_argument(
        "--fps",
        metavar="30|60|display|N",
        help="output rate: frames are presented at this rate, interpolated between generated"
        " ones (RIFE; `dreamdeck download --rife`); display = 60. Default: follow generation",
    )
    g.add_argument(
        "--no-interpolate",
        action="store_true",
        help="with --fps: present at that rate by showing the nearest generated frame",
    )
    g.add_argument(
        "--interp-compile",
        choices=("off", "default", "cudagraphs"),
        default="off",
        help="compile the interpolation network for the frame size at start (Inductor;"
        " cudagraphs adds CUDA graphs). Default off: eager batched frames already take"
        " 1.9-3.4 ms at 832x480 on an H100; compiling is not measured on the device yet",
    )
    g.add_argument(
        "--speed",
        choices=("fit", "real"),
        default="fit",
        help="with --fps: fit stretches motion to the generation rate (never starves); real"
        " plays the video's own 16 fps motion (needs generation >= 16 fps)",
    )
    g.add_argument(
        "--record", metavar="FILE.mp4", help="record H.264 + the control log (FILE.controls.jsonl)"
    )
    g.add_argument(
        "--record-clock",
        choices=("wall", "model"),
        default="wall",
        help="time stamps of recordings: wall (default) plays back as the audience saw it, at"
        " the generation rate; model gives one frame every 1/16 s of video, as `dreamdeck"
        " render` makes it (written in the control log's header)",
    )
    p.add_argument(
        "--record-dir",
        metavar="DIR",
        default=None,
        help="where /dd/record 1 starts new dated recordings (default: ./recordings, or the"
        " folder of --record)",
    )
    g = p.add_argument_group("input video: VACE and V2V (docs/osc.md: vace/*, v2v/*)")
    g.add_argument(
        "--vace", action="store_true", help="load the VACE module (input video, references)"
    )
    g.add_argument(
        "--vace-source",
        metavar="SPEC",
        help="input at start: shm:NAME (TouchDesigner), file:PATH (inside --assets), ndi:NAME,"
        " spout:NAME, camera:DEVICE; live: /dd/vace/source",
    )
    g.add_argument(
        "--assets",
        metavar="DIR",
        help="assets folder: reference images and video files named over OSC must lie inside",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="load a LoRA at start (repeatable, up to 4; FILE inside --assets; SCALE -2..2,"
        " default 1); live: /dd/lora/{n}/file, /dd/lora/{n}/scale",
    )
    g = p.add_argument_group("run length (tests, soak runs)")
    g.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this many seconds")
    g.add_argument("--blocks", type=int, metavar="N", help="stop after N blocks")
    g.add_argument(
        "--warmup-blocks",
        type=int,
        metavar="N",
        help="throwaway warm-up blocks before the show (default: the preset's warmup_blocks,"
        " or none when the preset's compile cache is warm from an earlier run or"
        " `dreamdeck warmup`)",
    )
    g.add_argument(
        "--memory-cap-gb",
        type=float,
        metavar="GB",
        help="cap this process's GPU memory (PyTorch's allocator) to check that a preset for a "
        "smaller card fits, on a bigger one; the peak is logged at the end",
    )
    g = p.add_argument_group("several GPUs (engine/parallel: sequence parallelism)")
    g.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="split each block over N GPUs (N gloo processes on a CPU; N divides the heads);"
        " default: the preset's gpus (1)",
    )
    g.add_argument(
        "--rank-timeout",
        type=float,
        metavar="SECONDS",
        help="a rank silent this long ends the run (default 120 on GPUs, 30 on a CPU)",
    )
    hooks = discover_hooks()
    for hook in hooks:
        try:
            hook.add_arguments(p)
        except Exception as e:  # noqa: BLE001
            log.warning("bridge hook %s: add_arguments failed: %s", hook.__name__, e)
    p.set_defaults(func=lambda args: run(args, p, hooks))


def _apply_port_defaults(
    args: argparse.Namespace, parser: argparse.ArgumentParser, ports: Any
) -> None:
    """The preset's ports become the OSC flags' values where the flag was not given."""
    for key, dest in PORT_DESTS.items():
        if hasattr(args, dest) and getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, getattr(ports, key))


def _output_specs(args: argparse.Namespace, preset: Any) -> list[str]:
    specs = []
    shm = args.shm or preset.outputs.shm
    if shm and not args.no_shm:
        specs.append(f"shm:{shm}")
    ndi = args.ndi or preset.outputs.ndi
    if ndi:
        specs.append(f"ndi:{ndi}")
    spout = args.spout or preset.outputs.spout
    if spout:
        specs.append(f"spout:{spout}")
    return specs


def _vace_from_args(args: argparse.Namespace, preset: Any) -> Any:
    """--vace, --vace-source and --assets over the preset's `vace` section."""
    import dataclasses

    from engine.runtime.presets import PresetError

    v = preset.vace
    changes: dict[str, Any] = {}
    if args.vace:
        changes["enabled"] = True
    if args.assets is not None:
        folder = Path(args.assets).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--assets {args.assets}: not a folder")
        changes["assets_dir"] = str(folder.resolve())
    if args.vace_source is not None:
        changes["source"] = args.vace_source
    if not changes:
        return preset
    try:
        return preset.replace(vace=dataclasses.replace(v, **changes))
    except PresetError as e:
        raise UsageError(str(e).replace("overrides: vace.source", "--vace-source")) from None


def parse_lora_flag(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale); a tail that is not a number belongs to the file."""
    file, sep, tail = text.rpartition(":")
    if sep and file:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not -2.0 <= scale <= 2.0:  # NaN fails too
            raise UsageError(f"--lora {text}: scale {tail} is outside -2..2")
        return file, scale
    return text, 1.0


def _loras_from_args(args: argparse.Namespace, preset: Any) -> Any:
    """--lora flags replace the preset's `loras` list."""
    from engine.runtime.presets import Lora, PresetError

    flags = getattr(args, "lora", None)
    if not flags:
        return preset
    loras = [Lora(*parse_lora_flag(f)) for f in flags]
    try:
        return preset.replace(loras=loras)
    except PresetError as e:
        raise UsageError(str(e).replace("overrides: loras", "--lora")) from None


def check_loras(preset: Any, pipeline: Any) -> None:
    """The start-up LoRAs' headers, before anything runs: UsageError (exit 2) names the file
    and what is wrong."""
    loader = getattr(pipeline, "lora_loader", None)
    for n, lora in enumerate(preset.loras, start=1):
        if loader is None:
            raise UsageError("this pipeline has no LoRA slots")
        try:
            loader.check(lora.file)
        except ValueError as e:
            raise UsageError(f"LoRA {n}: {e}") from None


def _cap_gpu_memory(gb: float) -> None:
    """Limit PyTorch's CUDA allocator to `gb` GiB of the card: a preset meant for a 24 or
    32 GB card runs into the same wall on an 80 GB one. (The CUDA context, about 0.5 GB, is
    outside the allocator: leave that much below the card's size.)"""
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--memory-cap-gb needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    if not 0 < gb * 2**30 <= total:
        raise UsageError(f"--memory-cap-gb must be in (0, {total / 2**30:.1f}] here, got {gb}")
    torch.cuda.set_per_process_memory_fraction(gb * 2**30 / total, 0)
    log.info("GPU memory capped at %.1f GB of %.1f GB", gb, total / 2**30)


def _log_peak_memory(device: Any, engine: Any) -> None:
    import torch

    if getattr(device, "type", None) != "cuda":
        return
    s = engine.status()
    log.info(
        "done: %d blocks, last fps %s, peak GPU memory %.1f GB allocated / %.1f GB reserved",
        s["block"],
        "-" if s["fps"] is None else f"{s['fps']:.2f}",
        torch.cuda.max_memory_allocated(device) / 2**30,
        torch.cuda.max_memory_reserved(device) / 2**30,
    )


DISPLAY_FPS = 60.0  # `--fps display`: the refresh rate of a venue screen / TD project


def parse_fps(text: Any) -> float | None:
    """``--fps``: 30, 60, display or a number in the frame path's range; None when not
    given. UsageError names the problem."""
    from engine.runtime.frame_path import check_output_fps

    if text is None:
        return None
    s = str(text).strip().lower()
    if s == "display":
        return DISPLAY_FPS
    try:
        value = float(s)
    except ValueError:
        raise UsageError(f"--fps {text!r}: use 30, 60, display or a number") from None
    try:
        fps = check_output_fps(value)
    except ValueError as e:
        raise UsageError(f"--fps: {e}") from None
    if fps is None:
        raise UsageError("--fps must be positive (leave it out to follow generation)")
    return fps


def _build_output(args: argparse.Namespace, preset: Any, pipeline: Any, sinks: list) -> Any:
    """The frame path: pacer at --fps, with the interpolator when it can be built.
    Interpolation asked for without weights is an error on stderr, and the show runs
    at that rate without it."""
    from engine.runtime.frame_path import FramePath
    from engine.runtime.interpolator import InterpolationUnavailable, build_interpolator
    from engine.runtime.pacer import OutputPacer, Pacer

    fps = parse_fps(args.fps)
    if fps is None and preset.outputs.fps:
        fps = float(preset.outputs.fps)
    interp = None
    mode = getattr(args, "interp_compile", "off")
    try:
        interp = build_interpolator(
            model=preset.model,
            device=pipeline.device,
            models_dir=args.models_dir,
            random_weights=args.random_weights,
            compile=mode,
        )
        if mode != "off":
            # compiled here, with the other start-up compiles, not when the performer
            # first turns interpolation on (that would hold the output for the compile)
            t0 = time.perf_counter()
            try:
                interp.warmup(preset.height, preset.width)
                log.info(
                    "interpolation: %s compile + warm-up %.1f s", mode, time.perf_counter() - t0
                )
            except Exception as e:  # noqa: BLE001 - eager still works: keep the show going
                log.warning("interpolation: %s compile failed (%s); running it eager", mode, e)
                interp = build_interpolator(
                    model=preset.model,
                    device=pipeline.device,
                    models_dir=args.models_dir,
                    random_weights=args.random_weights,
                )
    except InterpolationUnavailable as e:
        if fps is not None and not args.no_interpolate:
            print(
                f"dreamdeck: {e}; presenting at {fps:g} fps without interpolation", file=sys.stderr
            )
    except Exception as e:  # noqa: BLE001 - a broken weights file must not stop the show
        print(f"dreamdeck: interpolation unavailable: {e}", file=sys.stderr)
    interpolate = fps is not None and interp is not None and not args.no_interpolate
    if fps is not None:
        for sink in sinks:
            if getattr(sink, "name", "").startswith("ndi") and hasattr(sink, "fps"):
                sink.fps = fps  # the rate NDI receivers are told (advertised only)
    if fps is not None and (interpolate or args.speed == "real"):
        pacer: Any = OutputPacer(fps, speed=args.speed, interpolate=interpolate)
    else:
        pacer = Pacer(fps=fps)
    return FramePath(sinks, pacer, interpolator=interp)


def _start_ranks(args: argparse.Namespace, preset: Any, gpus: int) -> Any:
    """--gpus N: check N and start ranks 1..N-1 (engine/parallel/launch.py); they build
    their share of the transformer while this process builds the rest."""
    from engine.parallel.launch import World, spec_for_preset
    from engine.parallel.ulysses import ParallelConfigError
    from engine.runtime.pipeline import PipelineError

    if args.rank_timeout is not None and not args.rank_timeout > 0:
        raise UsageError(f"--rank-timeout must be positive, got {args.rank_timeout}")
    try:
        spec = spec_for_preset(
            preset,
            models_dir=args.models_dir,
            random_weights=args.random_weights,
            timeout_s=args.rank_timeout,
        )
        return World.start(spec, gpus)
    except (ParallelConfigError, PipelineError) as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, hooks: list[ModuleType]) -> int:
    if args.blocks is not None and args.blocks < 1:
        raise UsageError("--blocks must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    parse_fps(args.fps)  # a bad rate is refused before anything is loaded
    preset = _loras_from_args(args, _vace_from_args(args, preset_from_args(args)))
    if args.memory_cap_gb is not None:
        _cap_gpu_memory(args.memory_cap_gb)
    if args.preset is None and args.model is None and not args.random_weights:
        if _fall_back_to_tiny(preset, args.models_dir):
            args.model = "tiny"
            preset = _loras_from_args(args, _vace_from_args(args, preset_from_args(args)))
    _apply_port_defaults(args, parser, preset.ports)
    for hook in hooks:  # a bridge's bad flags (a MIDI map that does not load) stop us here
        if callable(getattr(hook, "check", None)):
            hook.check(args)  # raises UsageError: exit 2 before the model loads
    record = Path(args.record) if args.record else None

    from engine.runtime.engine import Engine
    from engine.runtime.recorder import NATIVE_FPS, Recorder, RecorderError
    from engine.runtime.sinks import SinkError, make_sinks

    try:
        if record is not None:
            Recorder.check(record, preset.width, preset.height)
    except RecorderError as e:
        raise UsageError(f"--record: {e}") from None
    try:
        sinks = make_sinks(_output_specs(args, preset), shm_slots=preset.outputs.shm_slots)
    except SinkError as e:
        raise UsageError(str(e)) from None

    from engine.runtime.startup import Phases, is_warm, mark_warm, use_compile_cache

    phases = Phases(t0=_T_IMPORT)
    phases.add("launch (imports, flags, outputs)", time.perf_counter() - _T_IMPORT)
    cache = None
    if preset.compile and preset.device != "cpu":
        cache = use_compile_cache(args.models_dir, preset.name, preset.device)
    warmup_blocks = _warmup_blocks(args, preset, cache)
    gpus = args.gpus if args.gpus is not None else preset.gpus
    world = _start_ranks(args, preset, gpus) if gpus != 1 else None
    pipeline = build_or_explain(preset, args.models_dir, args.random_weights, phases)
    if pipeline is None:
        if world is not None:
            world.close()
        return 1
    try:
        check_loras(preset, pipeline)
    except UsageError:
        pipeline.close()
        if world is not None:
            world.close()
        raise
    leader = None
    if world is not None:
        from engine.parallel.plane import RankLost

        try:
            leader = world.attach(pipeline.session)
        except RankLost as e:
            world.close()
            pipeline.close()
            print(f"dreamdeck run: {e}", file=sys.stderr)
            return 1
    recorder = None
    if record is not None:
        try:
            recorder = Recorder(
                record,
                width=preset.width,
                height=preset.height,
                # wall: live time stamps, the file plays back the way the show ran
                fps=None if args.record_clock == "wall" else NATIVE_FPS,
                header={"model": preset.model, "preset": preset.name, "mode": "live"},
            )
        except RecorderError as e:
            pipeline.close()
            raise UsageError(f"--record: {e}") from None
    frame_path = _build_output(args, preset, pipeline, sinks)
    engine = Engine(
        pipeline,
        frame_path=frame_path,
        recorder=recorder,
        record_dir=args.record_dir,
        max_blocks=args.blocks,
        duration=args.duration,
        phases=phases,
        record_clock=args.record_clock,
        warmup_blocks=warmup_blocks,
        on_warm=None
        if cache is None or is_warm(cache, preset.name, max(1, preset.warmup_blocks))
        else lambda n: mark_warm(cache, preset.name, n),
    )
    if preset.vace.enabled or preset.vace.source != "none":
        log.info(
            "input video: %s, VACE %s, assets %s",
            preset.vace.source,
            "on" if preset.vace.enabled else "off (V2V only)",
            preset.vace.assets_dir or "none (no file paths over the network)",
        )
    log.info(
        "preset %s: %s %dx%d, steps %s, decoder %s, outputs %s%s",
        preset.name,
        preset.model,
        preset.width,
        preset.height,
        preset.steps,
        preset.decoder,
        ", ".join(s.name for s in sinks) or "none",
        f", recording {record}" if record else "",
    )

    stop = threading.Event()
    from engine.runtime.shutdown import RECORDING_S, ShutdownWatchdog, install_test_hang

    install_test_hang(engine)  # DREAMDECK_TEST_HANG: tests only

    def _abandon_parts() -> list[tuple[Any, ...]]:
        rec = engine.recorder  # the one in use now (/dd/record may have swapped it)
        parts: list[tuple[Any, ...]] = []
        if rec is not None:  # its queued blocks are encoded first: the longer time
            parts.append(("recording", rec.close, RECORDING_S))
        if frame_path is not None:
            parts.append(("outputs", frame_path.close))
        return parts

    watchdog = ShutdownWatchdog(_abandon_parts)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()
        watchdog.arm()  # the orderly stop below gets a few seconds, then it is forced

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    closers: list[Any] = []
    try:
        for hook in hooks:
            try:
                handle = hook.start(args, engine)
            except Exception as e:  # noqa: BLE001 - a bridge that cannot start is reported
                log.error("bridge %s did not start: %s", hook.__name__.split(".")[1], e)
                continue
            if handle is not None:
                closers.append(handle)
        engine.start()
        while not stop.is_set() and engine.running:
            stop.wait(0.1)
    finally:
        for handle in reversed(closers):
            try:
                handle.close()
            except Exception:  # noqa: BLE001
                log.exception("closing a bridge failed")
        engine.stop()
        if world is not None:
            log.info("ranks: %s", ", ".join(world.close(leader)))
        took = watchdog.done()
        if took is not None:
            log.info("shutdown: finished %.2f s after the signal", took)
        for s, h in previous.items():
            signal.signal(s, h)
    _log_peak_memory(pipeline.device, engine)
    if recorder is not None:
        log.info(
            "recorded %d frames to %s (+ %s)", recorder.frames_written, record, recorder.log_path
        )
    code = 0
    if engine.error is not None:
        print(f"dreamdeck run: stopped by an error: {engine.error}", file=sys.stderr)
        code = 1
    if watchdog.armed:  # stopped by a signal: skip the interpreter's slow teardown
        watchdog.exit_now(code)
    return code
