"""Audio for `dreamdeck render --audio`: the track's analysis laid on the video clock, and
the track muxed into the finished mp4.

Determinism: the whole file is analysed up front (the same streaming analyzer as live,
so the numbers are the live ones), and each block is handed the analysis hops of its own
span of video time, [first frame, next block's first frame) at 16 fps, before its
controls are taken. The beats of the whole-file tracker place the LFOs (beat n at the
n-th tracked beat, linear between, the tracked tempo outside), so an LFO in 4 bars lands
on the music's bars. Nothing depends on wall-clock time or thread timing.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridges.audio.analysis import DEFAULT_BANDS, analyze
from bridges.audio.live import Features
from bridges.audio.sources import AudioSourceError, decode_file

log = logging.getLogger(__name__)


class TrackDriver:
    """Feeds a registry's modulation bank block by block from an analysed track."""

    def __init__(self, path: str | Path, bands: Sequence[float] = DEFAULT_BANDS):
        self.path = Path(path)
        self.samples, self.rate, self.channels = decode_file(self.path)
        self.summary, frames = analyze(self.samples.mean(axis=0), self.rate, bands)
        beats = self.summary.beats
        beat_set = set(beats)  # the hop times the beats fell on (the same floats)
        feats = Features(tuple(r["name"] for r in self.summary.bands))
        bpm = self.summary.tempo
        self.frames = [(f.time, feats.values(f, f.time in beat_set, bpm)) for f in frames]
        self._times = [t for t, _ in self.frames]
        self._next = 0
        self._silent_t = -1.0
        self.beats = list(beats)
        self.bpm = bpm or 120.0

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.rate

    def beat_at(self, t: float) -> float:
        """Beat position at track time t, on the tracked beats."""
        b = self.beats
        period = 60.0 / self.bpm
        if len(b) < 2:
            return t / period
        if t <= b[0]:
            return (t - b[0]) / period
        if t >= b[-1]:
            return len(b) - 1 + (t - b[-1]) / period
        i = bisect.bisect_right(b, t) - 1
        return i + (t - b[i]) / (b[i + 1] - b[i])

    def feed_until(self, bank: Any, t_end: float) -> int:
        """Push every analysis hop before `t_end` not pushed yet; returns how many. Past
        the track's end the music has stopped: silent hops (levels and onsets 0, counters
        as they ended), so envelopes fall instead of holding as for a lost device."""
        j = bisect.bisect_left(self._times, t_end, lo=self._next)
        for t, v in self.frames[self._next : j]:
            bank.push(t, v)
        n = j - self._next
        self._next = j
        if j == len(self.frames) and self.frames:
            last_t, last = self.frames[-1]
            hop = self.summary.hop
            silent = {
                k: (v if k.startswith(("audio/count", "audio/beats", "audio/bpm")) else 0.0)
                for k, v in last.items()
            }
            t = max(last_t, self._silent_t) + hop
            while t < t_end:
                bank.push(t, silent)
                self._silent_t = t
                t += hop
                n += 1
        return n


def mux_audio(video: str | Path, audio: str | Path, bitrate: int = 192_000) -> None:
    """Rewrite `video` (an mp4 from the recorder) with `audio` as an AAC stream at the
    track's own sample rate, the video packets copied as they are (the frames do not
    change). Written to a temporary file and moved over `video` only when complete."""
    import av

    video = Path(video)
    tmp = video.with_name(video.stem + ".mux.tmp.mp4")
    x, rate, channels = decode_file(audio)
    layout = "mono" if channels == 1 else "stereo"
    if channels > 2:
        x = x[:2]
    try:
        with av.open(str(video)) as src, av.open(str(tmp), "w", format="mp4") as dst:
            vin = src.streams.video[0]
            vout = dst.add_stream_from_template(vin)
            aout = dst.add_stream("aac", rate=rate, layout=layout)
            aout.bit_rate = bitrate
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                packet.stream = vout
                dst.mux(packet)
            step = 1024
            pts = 0
            for i in range(0, x.shape[1], step):
                chunk = np.ascontiguousarray(x[:, i : i + step], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate = rate
                frame.pts = pts
                pts += chunk.shape[1]
                for p in aout.encode(frame):
                    dst.mux(p)
            for p in aout.encode(None):
                dst.mux(p)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise AudioSourceError(f"muxing {audio} into {video} failed: {e}") from None
    os.replace(tmp, video)
