"""The live parameters of dreamdeck, declared once.

OSC addresses, MIDI targets, timeline keys, OSCQuery and docs/osc.md all come from this
list. To add a parameter, add one `Param` here (and use it where the engine builds a
block).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

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
    *, default_prompt: str = "", default_steps: list[int] | None = None
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
            "Denoising step list: strictly decreasing timesteps in 1..1000",
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
            "decoder",
            "str",
            "tae",
            "Frame decoder: wan (Wan VAE, sharper) or tae (TAEHV, fast)",
            choices=DECODERS,
            applies="reload",
        ),
    ]
    params += tempo_params()
    return params


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


def make_registry(**kwargs: Any) -> Registry:
    return Registry(standard_params(**kwargs))
