"""Flow-matching step math and step lists (docs/streaming-model.md §3).

The model sees t in [0, 1000]; sigma = t / 1000 and x_t = (1 - sigma)·x0 + sigma·noise. It
predicts the velocity v = noise - x0, so x0 = x_t - sigma·v.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the step lists are checked without importing torch
    from torch import Tensor

# quality: the usual 4-step default. balanced: 3 steps, 3/4 of the cost (Krea's own
# 4-step list [1000, 937, 833, 625] costs the same as quality, so it is not "balanced";
# pass it explicitly when wanted). fast: the 2 steps of the published timelines.
STEP_PRESETS: dict[str, tuple[int, ...]] = {
    "quality": (1000, 750, 500, 250),
    "balanced": (1000, 750, 500),
    "fast": (1000, 750),
}

MAX_T = 1000
# Krea Realtime is distilled for 1-4 steps; a few more are allowed for experiments. A longer
# list is never useful and slows the engine in proportion (820 steps: 107 -> 1.6 fps on tiny).
MAX_STEPS = 8


class StepsError(ValueError):
    """A step list that the sampler cannot use; the message says what is wrong."""


def validate_steps(steps: Sequence[int] | str) -> tuple[int, ...]:
    """A preset name or a list of 1..MAX_STEPS strictly decreasing integers in 1..1000."""
    if isinstance(steps, str):
        if steps in STEP_PRESETS:
            return STEP_PRESETS[steps]
        raise StepsError(f"unknown step preset {steps!r}; choose one of {', '.join(STEP_PRESETS)}")
    try:
        items = list(steps)
    except TypeError:
        raise StepsError(f"steps must be a list of integers, got {steps!r}") from None
    if not items:
        raise StepsError("steps must not be empty")
    if len(items) > MAX_STEPS:
        raise StepsError(
            f"{len(items)} steps is too many: at most {MAX_STEPS} (the model is distilled for"
            " 1-4 steps; more cost time in proportion and do not help)"
        )
    out = []
    for s in items:
        if isinstance(s, bool):
            raise StepsError(f"step {s!r} is not an integer")
        if isinstance(s, float) and s.is_integer():
            s = int(s)
        try:
            s = operator.index(s)
        except TypeError:
            raise StepsError(f"step {s!r} is not an integer") from None
        if not 1 <= s <= MAX_T:
            raise StepsError(f"step {s} is outside 1..{MAX_T}")
        out.append(s)
    for a, b in zip(out, out[1:], strict=False):
        if b >= a:
            raise StepsError(f"steps must be strictly decreasing, got {a} then {b} in {out}")
    return tuple(out)


def sigma(t: float) -> float:
    return t / MAX_T


def x0_from_velocity(x: Tensor, v: Tensor, sigma_t: float) -> Tensor:
    """The clean estimate from a velocity prediction at noise level sigma_t."""
    return x - sigma_t * v


def renoise(x0: Tensor, noise: Tensor, sigma_t: float) -> Tensor:
    """Back onto the flow path at noise level sigma_t."""
    return (1.0 - sigma_t) * x0 + sigma_t * noise
