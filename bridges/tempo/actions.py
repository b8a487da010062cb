"""Performer actions that are more than one registry value: shared by MIDI maps and
the beat scheduler."""

from __future__ import annotations

from engine.runtime.controls import PROMPT_SLOTS
from engine.runtime.registry import Registry


def current_slot(registry: Registry) -> int:
    """The slot in front: the highest weight (the lowest slot on a tie)."""
    weights = [registry.get(f"prompt/{n}/weight") for n in range(1, PROMPT_SLOTS + 1)]
    return 1 + max(range(PROMPT_SLOTS), key=lambda i: (weights[i], -i))


def next_slot(registry: Registry, step: int = 1) -> int | None:
    """The next slot (wrapping, `step` = +1 or -1) that has a prompt, or None when no
    other slot has one: cycling onto an empty prompt would be a jump to nothing."""
    cur = current_slot(registry)
    for k in range(1, PROMPT_SLOTS):
        n = (cur - 1 + k * (1 if step >= 0 else -1)) % PROMPT_SLOTS + 1
        if registry.get(f"prompt/{n}/text").strip():
            return n
    return None


def cycle_path(registry: Registry, step: int = 1) -> str | None:
    """The registry trigger that cycles (``prompt/{n}/solo``), or None."""
    n = next_slot(registry, step)
    return None if n is None else f"prompt/{n}/solo"
