"""Tap tempo: the average interval of the last few taps, restarted after a pause."""

from __future__ import annotations

from collections import deque


class TapTempo:
    """Feed tap times; get a BPM once there are two taps that make sense.

    The tempo is the span of the kept taps over their count, not a mean of
    per-interval BPMs: one late tap then skews the result by 1/n, not more.
    A gap longer than `reset_after` seconds starts a new series (the performer
    stopped tapping), and a tap that would mean a tempo outside `bpm_range` restarts too.
    """

    def __init__(
        self,
        max_taps: int = 8,
        reset_after: float = 2.0,
        bpm_range: tuple[float, float] = (20.0, 300.0),
    ):
        self.taps: deque[float] = deque(maxlen=max_taps)
        self.reset_after = reset_after
        self.bpm_range = bpm_range

    def tap(self, t: float) -> float | None:
        if self.taps:
            gap = t - self.taps[-1]
            lo, hi = self.bpm_range
            if gap <= 0 or gap > self.reset_after or not lo <= 60.0 / gap <= hi:
                self.taps.clear()
        self.taps.append(t)
        if len(self.taps) < 2:
            return None
        return 60.0 * (len(self.taps) - 1) / (self.taps[-1] - self.taps[0])
