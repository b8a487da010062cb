"""Audio analysis at a fixed hop: RMS, log-spaced band energies, spectral-flux onsets per
band, and beat tracking (streaming for live input, whole-file for `dreamdeck audio analyze`).

Why numpy and not aubio or librosa: everything here is one real FFT per hop plus a few
vector operations, which numpy (already a dependency) does in well under a millisecond at
100 hops a second. aubio needs a C build that has no wheels for every platform we ship
on, and librosa pulls in scipy, numba and soundfile for features we would not use and is
built for whole files, not a causal stream. Keeping it in numpy also keeps the live and
the offline paths one piece of code, which is what makes `render --audio` match a show.

Conventions:
- hop = 10 ms (``rate // 100`` samples), window = the next power of two >= 4 hops, Hann.
- A frame's time is the start of the newest hop in its window: log-magnitude flux jumps
  as soon as an attack enters the window, so that is where the onset is (measured on
  clicks: within a hop; the window's centre would be two hops early).
- Band and RMS levels are mapped from -60..0 dBFS to 0..1 (meters and modulation depth
  then mean the same thing for every band and every track).
- Onsets: positive log-magnitude flux per band, picked causally one hop late (a peak is
  a peak once the next hop is lower) over an adaptive threshold (median + 4 x MAD of the
  last 0.6 s plus a floor), at most one per 50 ms per band, and only in bands within
  20 dB of the loudest band at that moment (leakage of a loud neighbour is no attack).
- Tempo: autocorrelation of the full-band onset envelope over 60..200 BPM; of two
  candidates an octave apart, the faster wins when it has at least 70 % of the slower
  one's support (a click track at 174 is 174, not 87). Offline, beats come from dynamic
  programming over the envelope (the Ellis 2007 formulation) and the reported tempo is a
  least-squares line through the beat times, which is far finer than one hop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BANDS = (30.0, 150.0, 800.0, 4000.0)  # lower edges in Hz; the last band ends at Nyquist
BAND_NAMES_4 = ("low", "lowmid", "highmid", "high")
HOP_SECONDS = 0.010
MAX_HOP_SECONDS = 0.012
MIN_BPM, MAX_BPM = 60.0, 200.0
DB_FLOOR = -60.0
ONSET_GAP_S = 0.05
MIN_STRENGTH = 0.3  # periodicity below this is no beat (white noise measures about 0.16)
THRESH_WINDOW_S = 0.6
DOMINANCE = 20.0 / -DB_FLOOR  # 20 dB on the 0..1 level scale


class AnalysisError(ValueError):
    """Bad analysis settings (bands, rate): names what was wrong."""


def band_names(n: int) -> tuple[str, ...]:
    return BAND_NAMES_4 if n == 4 else tuple(f"band{i}" for i in range(1, n + 1))


def check_bands(edges: Sequence[float], rate: int) -> tuple[float, ...]:
    """Lower band edges: at least 4, strictly increasing, positive, below Nyquist."""
    try:
        e = tuple(float(x) for x in edges)
    except (TypeError, ValueError):
        raise AnalysisError(f"bands must be numbers (Hz), got {edges!r}") from None
    if len(e) < 4 or len(e) > 16:
        raise AnalysisError(f"bands: give 4 to 16 lower edges in Hz, got {len(e)}")
    if not all(math.isfinite(x) and x > 0 for x in e):
        raise AnalysisError(f"bands: edges must be positive, finite Hz, got {list(e)}")
    if any(b <= a for a, b in zip(e, e[1:], strict=False)):
        raise AnalysisError(f"bands: edges must increase, got {list(e)}")
    if e[-1] >= rate / 2:
        raise AnalysisError(f"bands: edge {e[-1]} Hz is not below Nyquist ({rate / 2} Hz)")
    return e


def hop_for(rate: int) -> int:
    if not isinstance(rate, int) or not 4000 <= rate <= 384000:
        raise AnalysisError(f"sample rate {rate!r}: expected an integer in 4000..384000")
    hop = max(1, round(rate * HOP_SECONDS))
    assert hop / rate <= MAX_HOP_SECONDS
    return hop


@dataclass
class Frame:
    """One hop of analysis."""

    time: float  # seconds from the start of the stream (window centre)
    rms: float  # linear RMS of the hop's samples
    level: float  # RMS, -60..0 dBFS -> 0..1
    bands: np.ndarray  # band levels 0..1
    flux: np.ndarray  # onset strength per band
    onsets: np.ndarray  # bool per band
    onset: bool  # full-band onset
    envelope: float  # full-band onset strength (the beat tracker's input)


class _Pickers:
    """Causal peak picking for several onset-strength series at once (the bands and the
    full band): one vectorised median per hop instead of one per series."""

    def __init__(self, series: int, window: int, gap: int, floor: float):
        self.hist = np.zeros((series, window))
        self.filled = 0
        self.pos = 0
        self.gap = gap
        self.floor = floor
        self.prev2 = np.zeros(series)
        self.prev = np.zeros(series)
        self.since = np.full(series, gap)
        self.thr: np.ndarray | None = None  # recomputed every 4 hops: it moves slowly

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed the newest values; True where the previous value was an onset."""
        cand = self.prev
        self.since += 1
        hit = np.zeros(cand.shape, bool)
        if self.filled:
            if self.thr is None or self.pos % 4 == 0:
                h = self.hist[:, : self.filled]
                med = np.median(h, axis=1)
                mad = np.median(np.abs(h - med[:, None]), axis=1)
                self.thr = med + 4.0 * mad + self.floor
            thr = self.thr
            hit = (cand > self.prev2) & (cand >= x) & (cand > thr) & (self.since > self.gap)
            self.since[hit] = 0
        w = self.hist.shape[1]
        self.hist[:, self.pos] = cand
        self.pos = (self.pos + 1) % w
        self.filled = min(self.filled + 1, w)
        self.prev2, self.prev = self.prev, x.copy()
        return hit


class Analyzer:
    """Streaming analysis: ``feed(samples)`` with mono float32 in -1..1 returns the
    frames completed by them. Keeps a window's worth of samples, nothing more."""

    def __init__(self, rate: int, bands: Sequence[float] = DEFAULT_BANDS):
        self.rate = int(rate)
        self.hop = hop_for(self.rate)
        self.bands = check_bands(bands, self.rate)
        self.names = band_names(len(self.bands))
        n = 1 << max(8, math.ceil(math.log2(4 * self.hop)))
        self.n_fft = n
        self.window = np.hanning(n).astype(np.float64)
        self._scale = float(self.window.sum() / 2)  # peak bin of a full-scale sine
        freqs = np.fft.rfftfreq(n, 1.0 / self.rate)
        edges = (*self.bands, self.rate / 2 + 1)
        starts, ends = [], []
        for lo, hi in zip(edges, edges[1:], strict=False):
            idx = np.nonzero((freqs >= lo) & (freqs < hi))[0]
            if idx.size == 0:  # a band narrower than a bin: take the nearest bin
                idx = np.array([int(np.argmin(np.abs(freqs - lo)))])
            starts.append(int(idx[0]))
            ends.append(int(idx[-1]) + 1)
        # bands are contiguous bin ranges: sums are differences of one cumulative sum
        self._starts, self._ends = np.array(starts), np.array(ends)
        self._nbins = self._ends - self._starts
        self._first = int(np.nonzero(freqs >= self.bands[0])[0][0])
        self._buf = np.zeros(n, np.float64)
        self._pending = np.zeros(0, np.float64)
        self._prev_log: np.ndarray | None = None
        self._hops = 0
        fps = self.rate / self.hop
        window = max(4, round(THRESH_WINDOW_S * fps))
        gap = max(1, round(ONSET_GAP_S * fps))
        self._pickers = _Pickers(len(self.bands) + 1, window, gap, 0.02)  # bands + full
        self._last: Frame | None = None

    @property
    def fps(self) -> float:
        return self.rate / self.hop

    def feed(self, samples: np.ndarray) -> list[Frame]:
        x = np.asarray(samples, dtype=np.float64).reshape(-1)
        if x.size and not np.all(np.isfinite(x)):
            x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        data = np.concatenate([self._pending, x]) if self._pending.size else x
        h, n = self.hop, self.n_fft
        k = data.size // h
        self._pending = data[k * h :].copy()
        if k == 0:
            return []
        # every hop of this call at once: k windows over (last window's tail + new samples)
        stream = np.concatenate([self._buf[h:], data[: k * h]])
        self._buf = stream[-n:].copy()
        windows = np.lib.stride_tricks.sliding_window_view(stream, n)[::h]
        mag = np.abs(np.fft.rfft(windows * self.window, axis=1)) / self._scale
        chunks = data[: k * h].reshape(k, h)
        rms = np.sqrt(np.mean(chunks * chunks, axis=1))
        level = np.clip((20 * np.log10(rms + 1e-12) - DB_FLOOR) / -DB_FLOOR, 0.0, 1.0)
        zero = np.zeros((k, 1))
        cp = np.concatenate([zero, np.cumsum(mag * mag, axis=1)], axis=1)
        band_power = cp[:, self._ends] - cp[:, self._starts]
        bands = np.clip((10 * np.log10(band_power + 1e-12) - DB_FLOOR) / -DB_FLOOR, 0.0, 1.0)
        lg = np.log1p(1000.0 * mag)
        prev = np.concatenate(
            [(lg[:1] if self._prev_log is None else self._prev_log[None]), lg[:-1]]
        )
        self._prev_log = lg[-1].copy()
        cd = np.concatenate([zero, np.cumsum(np.maximum(lg - prev, 0.0), axis=1)], axis=1)
        flux = (cd[:, self._ends] - cd[:, self._starts]) / self._nbins
        env = (cd[:, -1] - cd[:, self._first]) / (cd.shape[1] - 1 - self._first)
        out = []
        for j in range(k):
            f = self._hop(float(rms[j]), float(level[j]), bands[j], flux[j], float(env[j]))
            if f is not None:
                out.append(f)
        return out

    def _hop(
        self, rms: float, level: float, bands: np.ndarray, flux: np.ndarray, env: float
    ) -> Frame | None:
        self._hops += 1
        # a picker reports the hop before the one just fed: mark it on the previous frame
        hits = self._pickers.push(np.append(flux, env))
        onsets, onset = hits[:-1], bool(hits[-1])
        frame = Frame(
            time=(self._hops - 1) * self.hop / self.rate,
            rms=rms,
            level=level,
            bands=bands,
            flux=flux,
            onsets=np.zeros(len(self.bands), bool),
            onset=False,
            envelope=env,
        )
        last, self._last = self._last, frame
        if last is not None:
            # a band's onset needs the band within 20 dB of the loudest one: the window's
            # leakage from a loud neighbour is not an attack of its own
            last.onsets |= onsets & (last.bands >= last.bands.max() - DOMINANCE)
            last.onset = last.onset or onset
        # Frames go out one hop late so their onset flags are final.
        return last


def _db01(db: float) -> float:
    return min(max((db - DB_FLOOR) / -DB_FLOOR, 0.0), 1.0)


# -- tempo --------------------------------------------------------------------------------
def _autocorr(env: np.ndarray) -> np.ndarray:
    e = env - env.mean()
    n = e.size
    f = np.fft.rfft(e, 2 * n)
    ac = np.fft.irfft(f * np.conj(f))[:n]
    # unbiased: each lag has fewer overlapping samples
    return ac / np.maximum(n - np.arange(n), 1)


def tempo_period(
    env: np.ndarray, fps: float, min_bpm: float = MIN_BPM, max_bpm: float = MAX_BPM
) -> tuple[float, float] | None:
    """(period in hops, fractional; strength 0..1) of the onset envelope, or None when
    there is no periodicity to speak of (silence, noise, too short)."""
    lo = max(2, math.floor(60.0 * fps / max_bpm))
    hi = math.ceil(60.0 * fps / min_bpm)
    if env.size < 2 * hi + 2 or not np.any(env > 0):
        return None
    # high-pass: minus a 0.5 s moving average, so a step (silence -> noise) or a slow
    # swell is not mistaken for a periodicity; attacks stand out, level does not
    w = max(3, round(0.5 * fps))
    trend = np.convolve(np.pad(env, (w // 2, w - 1 - w // 2), mode="edge"), np.ones(w) / w, "valid")
    env = np.maximum(env - trend, 0.0)
    if not np.any(env > 0):
        return None
    ac = _autocorr(env)
    if ac[0] <= 0:
        return None
    seg = ac[lo : hi + 1]
    k = int(np.argmax(seg)) + lo
    if ac[k] <= 0:
        return None

    def half(k: int) -> tuple[float, int]:
        """Support at half the lag: an odd lag's half falls between two lags, whose
        autocorrelation shares the peak, so the two are summed."""
        i = k // 2
        if k % 2 == 0:
            return float(ac[i]), i
        return float(ac[i] + ac[i + 1]), (i if ac[i] >= ac[i + 1] else i + 1)

    # prefer the faster of two octave-related candidates when both are supported
    while k // 2 >= lo and half(k)[0] >= 0.7 * ac[k]:
        k = half(k)[1]
    lag = float(k)
    if lo < k < ac.size - 1:
        a, b, c = ac[k - 1], ac[k], ac[k + 1]
        den = a - 2 * b + c
        if den < 0:
            lag = k + 0.5 * (a - c) / den
    return lag, float(min(1.0, ac[k] / ac[0]))


def track_beats(env: np.ndarray, period: float, tightness: float = 100.0) -> np.ndarray:
    """Beat positions (hop indices) by dynamic programming: each beat scores its onset
    strength plus the best earlier beat, penalised by how far the interval is from
    `period` (log-ratio squared)."""
    n = env.size
    if n == 0:
        return np.zeros(0, int)
    e = env / (env.std() + 1e-12)
    score = e.copy()
    back = np.full(n, -1)
    lo, hi = max(1, int(round(period / 2))), int(round(2 * period))
    for t in range(lo, n):
        a = max(0, t - hi)
        b = t - lo
        if b < a:
            continue
        taus = np.arange(a, b + 1)
        pen = -tightness * np.log((t - taus) / period) ** 2
        cand = score[a : b + 1] + pen
        j = int(np.argmax(cand))
        if cand[j] > 0:
            score[t] = e[t] + cand[j]
            back[t] = taus[j]
    # end on the best-scoring beat within the last period
    tail = max(0, n - int(round(period)) - 1)
    t = tail + int(np.argmax(score[tail:]))
    beats = []
    while t >= 0:
        beats.append(t)
        t = back[t]
    return np.array(beats[::-1], int)


@dataclass
class Summary:
    """What `dreamdeck audio analyze` reports."""

    rate: int
    duration: float
    hop: float
    bands: list[dict]
    tempo: float | None
    tempo_confidence: float
    beats: list[float]
    onsets: list[float]
    band_onsets: dict[str, list[float]]
    rms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "rate": self.rate,
            "duration": round(self.duration, 4),
            "hop_s": self.hop,
            "tempo": None if self.tempo is None else round(self.tempo, 3),
            "tempo_confidence": round(self.tempo_confidence, 3),
            "beats": [round(b, 4) for b in self.beats],
            "onsets": [round(o, 4) for o in self.onsets],
            "band_onsets": {k: [round(o, 4) for o in v] for k, v in self.band_onsets.items()},
            "bands": self.bands,
            "rms": self.rms,
        }


def analyze(
    samples: np.ndarray, rate: int, bands: Sequence[float] = DEFAULT_BANDS
) -> tuple[Summary, list[Frame]]:
    """Whole-signal analysis: the streaming analyzer over all of it, then tempo and beats."""
    a = Analyzer(rate, bands)
    x = np.asarray(samples, np.float64).reshape(-1)
    frames = a.feed(np.concatenate([x, np.zeros(a.n_fft)]))  # flush the last window
    dur = x.size / rate
    frames = [f for f in frames if f.time <= dur]
    env = np.array([f.envelope for f in frames])
    tempo, conf, beats = None, 0.0, []
    tp = tempo_period(env, a.fps)
    if tp is not None and tp[1] >= MIN_STRENGTH:
        period, conf = tp
        idx = track_beats(env, period)
        beat_t = np.array([frames[i].time for i in idx])
        tempo = 60.0 * a.fps / period
        if beat_t.size >= 4:
            # a line through the beat times: the period, far finer than one hop
            k = np.arange(beat_t.size)
            slope = np.polyfit(k, beat_t, 1)[0]
            if slope > 0 and abs(60.0 / slope - tempo) < 0.1 * tempo:
                tempo = 60.0 / slope
        beats = [float(t) for t in beat_t]
    names = a.names
    B = np.array([f.bands for f in frames]) if frames else np.zeros((0, len(names)))
    edges = (*a.bands, rate / 2)
    band_rows = []
    for i, nm in enumerate(names):
        col = B[:, i] if B.size else np.zeros(1)
        band_rows.append(
            {
                "name": nm,
                "lo_hz": edges[i],
                "hi_hz": edges[i + 1],
                "mean": round(float(col.mean()), 4),
                "p95": round(float(np.percentile(col, 95)), 4),
                "max": round(float(col.max()), 4),
            }
        )
    lv = np.array([f.level for f in frames]) if frames else np.zeros(1)
    summary = Summary(
        rate=rate,
        duration=dur,
        hop=a.hop / rate,
        bands=band_rows,
        tempo=tempo,
        tempo_confidence=conf,
        beats=beats,
        onsets=[f.time for f in frames if f.onset],
        band_onsets={nm: [f.time for f in frames if f.onsets[i]] for i, nm in enumerate(names)},
        rms={"mean_level": round(float(lv.mean()), 4), "max_level": round(float(lv.max()), 4)},
    )
    return summary, frames


class BeatTracker:
    """Causal beat tracking for live input: every quarter second the last 6 s of onset
    envelope give a period (autocorrelation) and a phase (a comb over the last 4 s);
    beats are then predicted one period ahead and reported as the stream reaches them.
    Not locked (no beats) while the periodicity is weak: silence and noise have no beat."""

    def __init__(self, fps: float, *, history_s: float = 6.0, min_strength: float = MIN_STRENGTH):
        self.fps = fps
        self.env: deque[float] = deque(maxlen=int(history_s * fps))
        self.min_strength = min_strength
        self.period: float | None = None  # hops
        self.strength = 0.0
        self.next_beat: float | None = None  # hop index
        self.count = 0
        self._n = 0
        self._every = max(1, round(fps / 4))
        self._last_beat = -(10**9)

    @property
    def bpm(self) -> float | None:
        return None if self.period is None else 60.0 * self.fps / self.period

    @property
    def locked(self) -> bool:
        return self.period is not None and self.strength >= self.min_strength

    def push(self, envelope: float) -> bool:
        """Feed one hop; True when a beat falls on it."""
        self.env.append(float(envelope))
        n = self._n
        self._n += 1
        if self._n % self._every == 0 and len(self.env) >= 3 * self.fps:
            self._estimate()
        if not self.locked or self.next_beat is None:
            return False
        if n + 0.5 >= self.next_beat:
            while self.next_beat <= n + 0.5:
                self.next_beat += self.period
            if n - self._last_beat < 0.5 * self.period:
                return False  # a phase correction moved a beat onto the one just given
            self._last_beat = n
            self.count += 1
            return True
        return False

    def _estimate(self) -> None:
        env = np.fromiter(self.env, float)
        tp = tempo_period(env, self.fps)
        if tp is None:
            self.period, self.strength, self.next_beat = None, 0.0, None
            return
        period, self.strength = tp
        if self.period is not None:
            for f in (2.0, 0.5):  # an octave flip of the same pulse: keep the tempo we follow
                if abs(period * f - self.period) < 0.04 * self.period:
                    period *= f
        if self.period is None or abs(self.period - period) > 0.1 * period:
            self.period = period  # a new tempo: jump to it
        else:
            self.period = 0.7 * self.period + 0.3 * period
        p = self.period
        span = min(env.size, int(4 * self.fps))
        recent = env[-span:]
        best, best_phi = -1.0, 0
        for phi in range(int(p)):
            pos = recent.size - 1 - phi - np.arange(0, recent.size, p)
            pos = pos[pos >= 0].astype(int)
            s = float(recent[pos].sum())
            if s > best:
                best, best_phi = s, phi
        cand = self._n - 1 - best_phi + p  # the next beat: in (now, now + one period]
        if self.next_beat is None:
            self.next_beat = cand
        else:  # a phase correction, taken modulo the period (a beat is never skipped)
            d = (cand - self.next_beat + p / 2) % p - p / 2
            self.next_beat += d if abs(d) > 0.25 * p else 0.5 * d
