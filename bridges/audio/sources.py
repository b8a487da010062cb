"""Where audio comes from: a PortAudio input device (sounddevice), a file (PyAV), or raw
PCM on standard input.

Spec strings (``--audio``): ``-`` (stdin, with ``--audio-format``), ``file:PATH``,
``device:NAME`` or a bare device name/index (``dreamdeck audio devices`` lists them).

Every source gives mono float32 blocks in -1..1 at its own rate through ``read(n)``,
which returns None at the end (a file that does not loop, stdin closed). Errors name what
was wrong: an unknown device, a file that does not decode, PCM that is not what
``--audio-format`` said.

sounddevice is an optional extra (``pip install dreamdeck[audio]``): it needs the
PortAudio library, which servers and CI machines often lack; files and stdin work without
it. PyAV is already a dependency (the recorder), so files need nothing new.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

PCM_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4", "u8": "u1", "f64le": "<f8"}
MAX_CHANNELS = 64
FLOAT_LIMIT = 16.0  # float PCM beyond this is not audio: the format is wrong


class AudioSourceError(ValueError):
    """An audio source that cannot be opened or read; the message names it and why."""


@dataclass(frozen=True)
class PcmFormat:
    sample: str = "s16le"
    rate: int = 48000
    channels: int = 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(PCM_FORMATS[self.sample])

    @property
    def frame_bytes(self) -> int:
        return self.dtype.itemsize * self.channels


def parse_pcm_format(text: str) -> PcmFormat:
    """``s16le:48000:2`` (sample format, rate, channels); parts may be left out from the
    right (``f32le`` = f32le at 48000 Hz, stereo)."""
    parts = [p.strip().lower() for p in str(text).split(":")]
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise AudioSourceError(f"--audio-format {text!r}: expected FORMAT[:RATE[:CHANNELS]]")
    if parts[0] not in PCM_FORMATS:
        raise AudioSourceError(
            f"--audio-format {text!r}: sample format {parts[0]!r} is not one of {', '.join(PCM_FORMATS)}"
        )
    try:
        rate = int(parts[1]) if len(parts) > 1 else 48000
        ch = int(parts[2]) if len(parts) > 2 else 2
    except ValueError:
        raise AudioSourceError(f"--audio-format {text!r}: rate and channels are integers") from None
    if not 4000 <= rate <= 384000:
        raise AudioSourceError(f"--audio-format {text!r}: rate {rate} outside 4000..384000")
    if not 1 <= ch <= MAX_CHANNELS:
        raise AudioSourceError(f"--audio-format {text!r}: channels {ch} outside 1..{MAX_CHANNELS}")
    return PcmFormat(parts[0], rate, ch)


def to_mono_float(raw: np.ndarray, sample: str, channels: int) -> np.ndarray:
    """Interleaved PCM -> mono float32 in -1..1. Raises AudioSourceError on float data
    that cannot be audio (NaN, inf, or far beyond full scale: the wrong format)."""
    if sample == "u8":
        x = (raw.astype(np.float32) - 128.0) / 128.0
    elif sample in ("s16le", "s32le"):
        x = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    else:
        x = raw.astype(np.float32)
        if x.size and not np.all(np.isfinite(x)):
            raise AudioSourceError(f"{sample} PCM contains NaN or infinity: not {sample} audio")
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > FLOAT_LIMIT:
            raise AudioSourceError(
                f"{sample} PCM with values up to {peak:.3g}: not {sample} audio"
                " (check --audio-format: s16le data read as float looks like this)"
            )
    return x.reshape(-1, channels).mean(axis=1) if channels > 1 else x


class StdinSource:
    """Raw interleaved PCM from a binary stream (stdin): ``read(n)`` blocks for n frames
    and returns fewer only at the end. A torn last frame is dropped and reported."""

    kind = "stdin"

    def __init__(self, fmt: PcmFormat, stream: IO[bytes] | None = None):
        self.fmt = fmt
        self.rate = fmt.rate
        self.channels = fmt.channels
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.torn = 0  # bytes of a partial frame at the end
        self.name = "stdin"

    def read(self, n: int) -> np.ndarray | None:
        want = n * self.fmt.frame_bytes
        buf = bytearray()
        while len(buf) < want:
            chunk = self.stream.read(want - len(buf))
            if not chunk:
                break
            buf += chunk
        usable = len(buf) - len(buf) % self.fmt.frame_bytes
        if usable < len(buf):
            self.torn = len(buf) - usable
        if usable == 0:
            return None
        raw = np.frombuffer(bytes(buf[:usable]), dtype=self.fmt.dtype)
        return to_mono_float(raw, self.fmt.sample, self.channels)

    def close(self) -> None:
        pass


def decode_file(path: str | Path) -> tuple[np.ndarray, int, int]:
    """A whole audio file -> (samples [channels, n] float32, rate, channels). For
    analysis and render; the live file source decodes as it plays."""
    import av

    p = Path(path)
    if not p.is_file():
        raise AudioSourceError(f"{p}: no such file")
    chunks = []
    try:
        with av.open(str(p)) as c:
            if not c.streams.audio:
                raise AudioSourceError(f"{p}: no audio stream in the file")
            st = c.streams.audio[0]
            rate = int(st.codec_context.sample_rate or st.rate or 0)
            channels = (
                int(st.codec_context.channels or 0) if hasattr(st.codec_context, "channels") else 0
            )
            channels = channels or len(st.layout.channels)
            resampler = av.AudioResampler(format="fltp", layout=st.layout.name, rate=rate)
            for frame in c.decode(st):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
    except AudioSourceError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise AudioSourceError(f"{p}: cannot decode audio: {e}") from None
    if not chunks or rate <= 0:
        raise AudioSourceError(f"{p}: no audio samples could be decoded")
    x = np.concatenate(chunks, axis=1).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise AudioSourceError(f"{p}: decoded audio contains NaN or infinity")
    return x, rate, x.shape[0]


class FileSource:
    """A file decoded whole at open (a show's track is minutes: tens of MB at most), then
    played in blocks; loops when asked."""

    kind = "file"

    def __init__(self, path: str | Path, loop: bool = True):
        x, self.rate, self.channels = decode_file(path)
        self._x = x.mean(axis=0) if x.shape[0] > 1 else x[0]
        self._i = 0
        self.loop = loop
        self.name = f"file:{path}"

    def read(self, n: int) -> np.ndarray | None:
        if self._i >= self._x.size:
            if not self.loop:
                return None
            self._i = 0
        out = self._x[self._i : self._i + n]
        self._i += out.size
        return out

    def close(self) -> None:
        pass


# -- devices (PortAudio) ----------------------------------------------------------------------
def _sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError as e:
        raise AudioSourceError(
            "audio input devices need sounddevice (pip install 'dreamdeck[audio]'): " + str(e)
        ) from None
    except OSError as e:  # the module is there, the PortAudio library is not
        raise AudioSourceError(f"audio input devices need the PortAudio library: {e}") from None
    return sounddevice


def list_devices() -> list[dict[str, Any]]:
    """Input devices as PortAudio sees them: index, name, channels, default rate, host API."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
    except Exception as e:  # noqa: BLE001 - PortAudio errors have no common base we can import
        raise AudioSourceError(f"cannot list audio devices: {e}") from None
    out = []
    for i, d in enumerate(devices):
        if int(d.get("max_input_channels", 0)) < 1:
            continue
        api = d.get("hostapi")
        out.append(
            {
                "index": i,
                "name": d.get("name", ""),
                "channels": int(d["max_input_channels"]),
                "rate": float(d.get("default_samplerate", 0.0)),
                "hostapi": apis[api]["name"] if isinstance(api, int) and api < len(apis) else "",
            }
        )
    return out


def find_device(spec: str) -> dict[str, Any]:
    """A device by index or by a case-insensitive regex on its name."""
    devices = list_devices()
    s = spec.strip()
    if s.isdigit():
        for d in devices:
            if d["index"] == int(s):
                return d
    else:
        try:
            rx = re.compile(s, re.IGNORECASE)
        except re.error as e:
            raise AudioSourceError(f"audio device {spec!r}: not a valid pattern: {e}") from None
        for d in devices:
            if rx.search(d["name"]):
                return d
    names = ", ".join(f"{d['index']}: {d['name']}" for d in devices) or "none"
    raise AudioSourceError(f"no audio input device {spec!r} (inputs: {names})")


class DeviceSource:
    """A PortAudio input stream. The callback only copies into a bounded deque (it runs on
    PortAudio's real-time thread and must never block); ``read`` takes from it. A device
    that vanishes raises AudioSourceError from ``read``; the caller reopens it."""

    kind = "device"
    MAX_BLOCKS = 256

    def __init__(self, spec: str, block: int = 480):
        sd = _sounddevice()
        d = find_device(spec)
        self.name = f"device:{d['name']}"
        self.rate = int(d["rate"] or 48000)
        self.channels = min(2, d["channels"])
        self._q: collections.deque[np.ndarray] = collections.deque(maxlen=self.MAX_BLOCKS)
        self._ready = threading.Condition()
        self._error: str | None = None
        self.overflows = 0

        def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
            if status and getattr(status, "input_overflow", False):
                self.overflows += 1
            x = np.asarray(indata, np.float32)
            with self._ready:
                self._q.append(x.mean(axis=1) if x.ndim == 2 else x.copy())
                self._ready.notify()

        def finished() -> None:
            with self._ready:
                self._error = self._error or "the input stream stopped (device gone?)"
                self._ready.notify()

        try:
            self._stream = sd.InputStream(
                device=d["index"],
                channels=self.channels,
                samplerate=self.rate,
                blocksize=block,
                dtype="float32",
                callback=callback,
                finished_callback=finished,
            )
            self._stream.start()
        except Exception as e:  # noqa: BLE001 - PortAudioError and friends
            raise AudioSourceError(f"{self.name}: cannot open: {e}") from None

    def read(self, n: int) -> np.ndarray | None:
        with self._ready:
            if not self._q and self._error is None:
                self._ready.wait(0.5)
            if self._error is not None and not self._q:
                raise AudioSourceError(f"{self.name}: {self._error}")
            if not self._q:
                return np.zeros(0, np.float32)
            out = np.concatenate(list(self._q))
            self._q.clear()
        return out

    def close(self) -> None:
        try:
            self._stream.stop()
            self._stream.close()
        except Exception:  # noqa: BLE001 - closing a vanished device may fail; it is gone anyway
            pass


def open_source(spec: str, fmt: PcmFormat | None = None, loop: bool = True) -> Any:
    """The source a ``--audio`` spec names."""
    s = spec.strip()
    if not s:
        raise AudioSourceError("--audio: empty source (use -, file:PATH or a device name)")
    if s == "-":
        return StdinSource(fmt or PcmFormat())
    if s.startswith("file:"):
        return FileSource(s[5:], loop=loop)
    return DeviceSource(s[7:] if s.startswith("device:") else s)
