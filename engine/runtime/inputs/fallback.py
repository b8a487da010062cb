"""What a block does when its input stops: keep going, say so, recover by itself.

States, decided once per block at its start from the age of the newest frame:
- "live": a frame newer than one block span (or `stale_s`, whichever is longer);
- "holding": no fresh frame, for at most `hold_s`: the block uses the last frames again
  (sample and hold over the buffer gives the last frame repeated), so a short hiccup
  (a dropped NDI packet, TD busy for a moment) does not change the picture;
- "text_only": longer than that, or never a frame: no VACE context (the block runs on the
  prompt alone), and the context encoder restarts when frames come back;
- back to "live" as soon as a fresh frame arrives.
So a source that dies is held within the next block and dropped after `hold_s`, and one
that returns is used at the first block after its first frame. Each change calls
`on_change(state, message)` once (for `/dd/status` feedback and the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LIVE, HOLDING, TEXT_ONLY = "live", "holding", "text_only"


class InputFallback:
    def __init__(
        self,
        name: str,
        *,
        hold_s: float = 1.0,
        stale_s: float = 0.25,
        on_change: Callable[[str, str], None] | None = None,
    ):
        if hold_s < 0 or stale_s <= 0:
            raise ValueError(f"hold_s must be >= 0 and stale_s > 0, got {hold_s}, {stale_s}")
        self.name = name
        self.hold_s, self.stale_s = hold_s, stale_s
        self.on_change = on_change
        self.state = TEXT_ONLY
        self.message = f"{name}: waiting for frames"
        self.changes = 0

    def update(self, now: float, last_frame: float | None, span: float, detail: str = "") -> str:
        """The state for the block starting at `now` (time.time()); `last_frame`: newest
        frame timestamp or None; `span`: the block's duration in seconds."""
        if last_frame is None:
            return self._set(TEXT_ONLY, f"{self.name}: no frames yet{_why(detail)}")
        age = now - last_frame
        fresh = max(span, self.stale_s)
        if age <= fresh:
            return self._set(LIVE, f"{self.name}: live")
        if age <= fresh + self.hold_s:
            return self._set(
                HOLDING,
                f"{self.name}: no frames for {age:.1f} s, holding the last frame{_why(detail)}",
            )
        return self._set(
            TEXT_ONLY, f"{self.name}: no frames for {age:.1f} s, text only{_why(detail)}"
        )

    def _set(self, state: str, message: str) -> str:
        self.message = message  # always current (ages, reasons); the callback only on change
        if state != self.state:
            self.state = state
            self.changes += 1
            log.info("input %s", message)
            if self.on_change is not None:
                try:
                    self.on_change(state, message)
                except Exception:  # feedback must never stop generation
                    log.exception("input status callback failed")
        return state


def _why(detail: str) -> str:
    return f" ({detail})" if detail else ""
