"""The live parameters of dreamdeck, declared once.

OSC addresses, MIDI targets, timeline keys, OSCQuery and docs/osc.md all come from this
list. To add a parameter, add one `Param` here (and use it where the engine builds a
block).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from engine.runtime.input_names import FIT_MODES, MASK_MODES, SOURCE_KINDS
from engine.runtime.registry import ControlError, Param, Registry
from engine.stream.schedule import STEP_PRESETS, validate_steps

PROMPT_SLOTS = 8
TRANSITION_METHODS = ("linear", "slerp")
DECODERS = ("wan", "tae")
SEED_MAX = 2**31 - 1


def _steps(value: list[int]) -> list[int]:
    return list(validate_steps(value))


def _prompt_action(text: str, get: Callable[[str], Any]) -> dict[str, Any]:
    """One prompt, weight 1, every other slot muted (via the current transition)."""
    changes: dict[str, Any] = {"prompt/1/text": text, "prompt/1/weight": 1.0}
    for n in range(2, PROMPT_SLOTS + 1):
        changes[f"prompt/{n}/weight"] = 0.0
    return changes


def _solo(n: int) -> Callable[[Any, Callable[[str], Any]], dict[str, Any]]:
    def expand(_: Any, get: Callable[[str], Any]) -> dict[str, Any]:
        return {f"prompt/{m}/weight": 1.0 if m == n else 0.0 for m in range(1, PROMPT_SLOTS + 1)}

    return expand


def _prompts_action(value: Any, get: Callable[[str], Any]) -> dict[str, Any]:
    """The whole set at once: ``[["a forest", 1.0], ["fog", 0.5]]`` or
    ``[{"text": "a forest", "weight": 1.0}]``; slots past the list are emptied."""
    if not isinstance(value, list) or not value:
        raise ControlError("prompts", "expected a non-empty JSON list of [text, weight] pairs")
    if len(value) > PROMPT_SLOTS:
        raise ControlError("prompts", f"{len(value)} prompts, at most {PROMPT_SLOTS}")
    changes: dict[str, Any] = {}
    for i, item in enumerate(value, start=1):
        if isinstance(item, dict):
            text, weight = item.get("text"), item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) in (1, 2):
            text, weight = item[0], (item[1] if len(item) == 2 else 1.0)
        elif isinstance(item, str):
            text, weight = item, 1.0
        else:
            raise ControlError("prompts", f"item {i} is not [text, weight]")
        if not isinstance(text, str):
            raise ControlError("prompts", f"item {i}: text must be a string")
        changes[f"prompt/{i}/text"] = text
        changes[f"prompt/{i}/weight"] = weight
    for n in range(len(value) + 1, PROMPT_SLOTS + 1):
        changes[f"prompt/{n}/text"] = ""
        changes[f"prompt/{n}/weight"] = 0.0
    return changes


def _steps_preset(name: str, get: Callable[[str], Any]) -> dict[str, Any]:
    return {"steps": list(STEP_PRESETS[name])}


def _random_seed(_: Any, get: Callable[[str], Any]) -> dict[str, Any]:
    return {"seed": random.randint(0, SEED_MAX)}


def standard_params(
    *,
    default_prompt: str = "",
    default_steps: list[int] | None = None,
    assets_dir: str | None = None,
    lora_check: Callable[[str], Any] | None = None,
) -> list[Param]:
    params = [
        Param(
            "prompt",
            "str",
            description="One prompt at weight 1; mutes the other slots (via the current transition)",
            expand=_prompt_action,
        ),
        Param(
            "prompts",
            "json",
            description='The whole prompt set as JSON: [["text", weight], ...]; empties the slots past it',
            expand=_prompts_action,
            max_len=32768,
        ),
    ]
    for n in range(1, PROMPT_SLOTS + 1):
        params += [
            Param(
                f"prompt/{n}/text",
                "str",
                default_prompt if n == 1 else "",
                f"Text of prompt slot {n}",
            ),
            Param(
                f"prompt/{n}/weight",
                "float",
                1.0 if n == 1 else 0.0,
                f"Blend weight of prompt slot {n} (normalised over slots)",
                range=(0.0, 1.0),
            ),
            Param(
                f"prompt/{n}/solo",
                "trigger",
                description=f"Only slot {n}: weight 1, the others 0",
                expand=_solo(n),
            ),
        ]
    params += [
        Param(
            "transition/blocks",
            "int",
            4,
            "Blocks a prompt change takes to arrive (0 = cut)",
            range=(0, 64),
            unit="blocks",
        ),
        Param(
            "transition/method",
            "str",
            "slerp",
            "Shape of prompt moves: linear or slerp",
            choices=TRANSITION_METHODS,
        ),
        Param(
            "seed",
            "int",
            42,
            "Noise seed; each block draws from seed + its first latent index",
            range=(0, SEED_MAX),
        ),
        Param("seed/random", "trigger", description="Pick a new random seed", expand=_random_seed),
        Param(
            "steps",
            "int_list",
            list(default_steps or STEP_PRESETS["quality"]),
            "Denoising step list: 1 to 8 strictly decreasing timesteps in 1..1000 (the model is"
            " distilled for 1-4)",
            validate=_steps,
        ),
        Param(
            "steps/preset",
            "str",
            description="Step list by name: " + ", ".join(STEP_PRESETS),
            choices=tuple(STEP_PRESETS),
            expand=_steps_preset,
        ),
        Param(
            "kv_bias",
            "float",
            0.3,
            "KV-cache attention bias on the past context (1 = off); fights drift and repetition",
            range=(0.01, 1.0),
        ),
        Param(
            "reset",
            "trigger",
            description="Restart the stream from block 0 (same seed, same start)",
        ),
        Param(
            "pause", "bool", False, "Hold the stream: no new blocks while on", applies="immediate"
        ),
        Param(
            "record",
            "bool",
            False,
            "Record the output and the control log: on starts a new dated mp4 in the"
            " recordings folder, off finalises it",
            applies="immediate",
        ),
        Param(
            "decoder",
            "str",
            "tae",
            "Frame decoder: wan (Wan VAE, sharper) or tae (TAEHV, fast)",
            choices=DECODERS,
            applies="reload",
        ),
    ]
    params += tempo_params()
    params += vace_params(assets_dir)
    params += lora_params(assets_dir, lora_check)
    params += output_params()
    params += mod_params(lambda: params)  # the list as finally built: its numeric targets
    return params


# -- output rate and interpolation: owned by the interpolation helper (engine/runtime/frame_path.py)
OUTPUT_SPEEDS = ("fit", "real")


def _output_fps(value: float) -> float:
    from engine.runtime.frame_path import check_output_fps

    f = check_output_fps(value)  # ValueError names the range; never clamped
    return 0.0 if f is None else f


def output_params() -> list[Param]:
    """The rate frames are presented at and whether frames between generated ones are
    interpolated. Immediate: they change the frame path, not the next block."""
    return [
        Param(
            "output/fps",
            "float",
            0.0,
            "Output frame rate: 0 follows generation; 1..240 presents at that rate"
            " (30 or 60 for a display), interpolating when output/interpolate is on",
            unit="fps",
            applies="immediate",
            validate=_output_fps,
        ),
        Param(
            "output/interpolate",
            "bool",
            False,
            "Interpolate between generated frames at each presentation time (RIFE; needs"
            " its weights and an output/fps)",
            applies="immediate",
        ),
        Param(
            "output/speed",
            "str",
            "fit",
            "Playback speed with a fixed output rate: fit (motion stretched to the"
            " generation rate, never starves) or real (the video's own 16 fps motion)",
            choices=OUTPUT_SPEEDS,
            applies="immediate",
        ),
    ]


# -- tempo and quantise: owned by the tempo bridge (bridges/tempo) -------------------
QUANTIZE_MODES = ("off", "beat", "bar", "2bar", "4bar")


def tempo_params() -> list[Param]:
    """Tempo, quantise and beat actions. All apply immediately: they steer *when* other
    changes land, so waiting for a block boundary would be one block late."""
    return [
        Param(
            "quantize",
            "str",
            "off",
            "Land performer changes (OSC, MIDI, timeline) on the next beat, bar, 2 or 4 bars",
            choices=QUANTIZE_MODES,
            applies="immediate",
        ),
        Param(
            "tempo/bpm",
            "float",
            120.0,
            "Tempo when no Link or MIDI clock leads (shows the followed tempo when one does)",
            range=(20.0, 300.0),
            unit="bpm",
            applies="immediate",
        ),
        Param(
            "tempo/tap",
            "trigger",
            description="Tap tempo: taps set the tempo and put the beat on the last tap",
            applies="immediate",
        ),
        Param(
            "beat/cycle_bars",
            "int",
            0,
            "Solo the next non-empty prompt slot every N bars (0 = off)",
            range=(0, 64),
            unit="bars",
            applies="immediate",
        ),
        Param(
            "beat/seed_on_bar",
            "bool",
            False,
            "Pick a new random seed on every bar",
            applies="immediate",
        ),
    ]


# -- VACE, live input and V2V: owned by the VACE helper (engine/stream/vace_context.py) ----
REF_SLOTS = 3
REF_FROM_INPUT = "@input"  # vace/ref/{n} value: the slot holds a frame grabbed from the input


def check_source_spec(spec: Any, assets_dir: str | None) -> str:
    """A `vace/source` spec, normalised (stripped; "" and "off" -> "none"), or ValueError.

    Only the form is checked here (sources that are not there yet are fine: the input
    waits for them and says so), except `file:` paths, which come over the network and
    must name a file inside the assets folder, and `camera:` devices, which must be real
    video-capture devices (camera_input.py says why)."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a source like shm:NAME, got {type(spec).__name__}")
    s = spec.strip()
    if s.lower() in ("", "none", "off"):
        return "none"
    kind, sep, arg = s.partition(":")
    if not sep or kind.lower() not in SOURCE_KINDS or not arg.strip():
        raise ValueError(
            f"{s[:60]!r}: use shm:NAME, file:PATH, ndi:NAME, spout:NAME, camera:DEVICE or none"
        )
    kind = kind.lower()
    if kind == "shm":
        from engine.runtime.shm_ring import _valid_name

        _valid_name(arg)  # ValueError names the problem
    if kind == "file":
        _check_asset(arg, assets_dir, "video file")
    if kind == "camera":
        from engine.runtime.inputs.camera_input import resolve_camera

        resolve_camera(arg)  # only real capture devices (InputError is a ValueError)
    return f"{kind}:{arg}"


def _check_asset(path: str, assets_dir: str | None, what: str) -> None:
    from engine.assets import AssetError, resolve_asset

    if assets_dir is None:
        raise ValueError(
            f"{what} {path[:80]!r}: no assets folder is set (start dreamdeck with --assets DIR);"
            " files named over the network must lie inside it"
        )
    try:
        resolve_asset(path, assets_dir)
    except AssetError as e:
        raise ValueError(f"{what} {e}") from None


def _ref_path(assets_dir: str | None) -> Callable[[str], str]:
    def check(value: str) -> str:
        v = value.strip()
        if v and v != REF_FROM_INPUT:
            _check_asset(v, assets_dir, "reference image")
        return v

    return check


def _clear_refs(_: Any, get: Callable[[str], Any]) -> dict[str, Any]:
    return {f"vace/ref/{n}": "" for n in range(1, REF_SLOTS + 1)}


def vace_params(assets_dir: str | None = None) -> list[Param]:
    """VACE strength, reference images, the live input (source, fit, mask) and plain V2V.

    They exist whether or not the engine loaded VACE (V2V and the input work without it;
    with VACE off, the vace/* strength and references are kept and have no effect).
    Paths are checked against `assets_dir` when set, so a path outside it is refused at
    once and nothing changes."""
    from functools import partial

    params = [
        Param(
            "vace/scale",
            "float",
            1.0,
            "VACE strength: how strongly the input video and references steer (0 = off)",
            range=(0.0, 2.0),
        ),
        Param(
            "vace/source",
            "str",
            "none",
            "Input video: shm:NAME (TouchDesigner ring), file:PATH (assets folder), ndi:NAME,"
            " spout:NAME, camera:DEVICE, or none",
            validate=partial(check_source_spec, assets_dir=assets_dir),
        ),
        Param(
            "vace/fit",
            "str",
            "fill",
            "How the input is sized to the output: fit (bars), fill (crop) or stretch",
            choices=FIT_MODES,
        ),
        Param(
            "vace/mask",
            "str",
            "ones",
            "VACE mask: ones (regenerate all, guided), alpha / inverse_alpha (the input's"
            " alpha: 1 = regenerate), source (luminance of vace/mask_source)",
            choices=MASK_MODES,
        ),
        Param(
            "vace/mask_source",
            "str",
            "none",
            "Second input whose luminance is the mask (with vace/mask source)",
            validate=partial(check_source_spec, assets_dir=assets_dir),
        ),
    ]
    for n in range(1, REF_SLOTS + 1):
        params += [
            Param(
                f"vace/ref/{n}",
                "str",
                "",
                f"Reference image {n}: a file in the assets folder; empty clears;"
                f" {REF_FROM_INPUT} grabs the input's current frame",
                validate=_ref_path(assets_dir),
                max_len=1024,
            ),
            Param(
                f"vace/ref/{n}/grab",
                "trigger",
                description=f"Reference image {n} := the input's current frame",
            ),
        ]
    params += [
        Param(
            "vace/ref/clear",
            "trigger",
            description="Clear every reference image",
            expand=_clear_refs,
        ),
        Param(
            "v2v/enabled",
            "bool",
            False,
            "Plain video-to-video: start each block from the encoded input (needs vace/source)",
        ),
        Param(
            "v2v/strength",
            "float",
            0.7,
            "V2V noise level: 0 = the input as it is, 1 = pure noise; first step at 1000 x strength",
            range=(0.0, 1.0),
        ),
        Param(
            "v2v/auto",
            "bool",
            False,
            "V2V strength follows the input's motion (more motion, less noise; measured one block late)",
        ),
    ]
    return params


# -- LoRA slots: owned by the LoRA helper (engine/models/lora.py, engine/runtime/lora_loader.py)
LORA_SLOTS = 4


def lora_params(
    assets_dir: str | None = None, check: Callable[[str], Any] | None = None
) -> list[Param]:
    """LoRA file and strength per slot. `check` (the engine's LoraLoader.check) reads the
    file's header when a file is named, so a wrong file is refused at once with the
    reason and nothing changes; without it only the path is checked."""

    def validate(value: str) -> str:
        v = value.strip()
        if v:
            if check is not None:
                check(v)
            else:
                _check_asset(v, assets_dir, "LoRA file")
        return v

    params = []
    for n in range(1, LORA_SLOTS + 1):
        params += [
            Param(
                f"lora/{n}/file",
                "str",
                "",
                f"LoRA slot {n}: a .safetensors file in the assets folder (read in the"
                " background, in use from the next block after); empty unloads",
                validate=validate,
                max_len=1024,
            ),
            Param(
                f"lora/{n}/scale",
                "float",
                1.0,
                f"Strength of LoRA slot {n} (0 = the base model; negative inverts the style)",
                range=(-2.0, 2.0),
            ),
        ]
    return params


# -- modulation slots: owned by the audio helper (engine/runtime/modulation.py) -------------
def mod_targets(params: list[Param]) -> list[str]:
    """Paths a modulation may move: numeric, stateful, applied per block, not mod/* itself."""
    return [
        p.path
        for p in params
        if p.type in ("float", "int")
        and p.stateful
        and p.applies == "block"
        and not p.path.startswith("mod/")
    ]


def mod_params(all_params: Callable[[], list[Param]]) -> list[Param]:
    """Sixteen modulation slots (engine/runtime/modulation.py says what they do), and
    loading a preset from presets/mod by name. `all_params` gives every declared parameter
    (for the targets and their ranges)."""
    from engine.runtime import modulation as mod

    def targets() -> list[str]:
        return mod_targets(all_params())

    def check_source(v: str) -> str:
        return mod.parse_source(v).spec

    def check_target(v: str) -> str:
        t = v.strip().lower()
        if t.startswith("/dd/"):
            t = t[4:]
        if t in ("", "off", "none"):
            return ""
        if t not in targets():
            raise ValueError(
                f"{v[:60]!r} is not a numeric parameter applied per block"
                " (e.g. prompt/1/weight, kv_bias, seed, vace/scale)"
            )
        return t

    params: list[Param] = []
    for n in range(1, mod.SLOTS + 1):
        params += [
            Param(
                f"mod/{n}/source",
                "str",
                "",
                f"Modulation {n} source: lfo/sine|triangle|saw|square|sh, random,"
                " audio/<feature>, midi/cc/<n>; empty = off",
                validate=check_source,
                max_len=64,
            ),
            Param(
                f"mod/{n}/target",
                "str",
                "",
                f"Modulation {n} target: a numeric parameter path (prompt/1/weight, kv_bias, ...)",
                validate=check_target,
                max_len=64,
            ),
            Param(
                f"mod/{n}/depth",
                "float",
                0.0,
                f"Modulation {n} depth, in the target's units (added: base + offset + depth x source)",
                range=(-(2.0**31), 2.0**31),
            ),
            Param(
                f"mod/{n}/offset",
                "float",
                0.0,
                f"Modulation {n} offset, in the target's units",
                range=(-(2.0**31), 2.0**31),
            ),
            Param(
                f"mod/{n}/curve",
                "str",
                "linear",
                f"Modulation {n} curve on the source (sign kept): " + ", ".join(mod.CURVES),
                choices=mod.CURVES,
            ),
            Param(
                f"mod/{n}/smoothing",
                "float",
                0.0,
                f"Modulation {n} smoothing per block (0 = none, 0.9 = slow)",
                range=(0.0, 0.99),
            ),
            Param(
                f"mod/{n}/rate",
                "float",
                4.0,
                f"Modulation {n} LFO / random walk cycle length, in beats (4 = one bar)",
                range=(1 / 16, 1024.0),
                unit="beats",
            ),
            Param(
                f"mod/{n}/phase",
                "float",
                0.0,
                f"Modulation {n} LFO phase, in cycles",
                range=(0.0, 1.0),
            ),
            Param(
                f"mod/{n}/attack",
                "float",
                0.005,
                f"Modulation {n} envelope attack on audio sources",
                range=(0.0, 10.0),
                unit="s",
            ),
            Param(
                f"mod/{n}/release",
                "float",
                0.25,
                f"Modulation {n} envelope release on audio sources",
                range=(0.0, 10.0),
                unit="s",
            ),
        ]

    def load(name: str, get: Callable[[str], Any]) -> dict[str, Any]:
        from engine.runtime.modulation import ModPresetError, preset_path, read_preset

        try:
            return read_preset(
                preset_path(name.strip()), {p.path: p for p in all_params()}, targets
            )
        except ModPresetError as e:
            raise ControlError("mod/load", str(e)) from None

    def clear(_: Any, get: Callable[[str], Any]) -> dict[str, Any]:
        return {p.path: p.default for p in params}

    return params + [
        Param(
            "mod/load",
            "str",
            description="Load a modulation preset from presets/mod by name (its slots; the"
            " others off)",
            expand=load,
            max_len=64,
        ),
        Param("mod/clear", "trigger", description="Switch every modulation slot off", expand=clear),
    ]


def make_registry(**kwargs: Any) -> Registry:
    from engine.runtime.modulation import Modulation

    registry = Registry(standard_params(**kwargs))
    registry.modulator = Modulation(registry)  # base + modulation, once per block
    return registry
