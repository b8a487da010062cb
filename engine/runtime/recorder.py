"""Recording a show: H.264 in a fragmented mp4 plus the control log next to it.

The generation thread hands whole blocks to `Recorder.submit`, which never blocks: a
bounded queue (a few blocks) feeds an encoder thread; when the queue is full the block is
dropped from the recording (logged, and recorded as ``frames: 0`` in the control log) so
a slow disk can never slow the show. The host copy of GPU frames happens on that thread
too, not in the generation loop.

Crash safety: the mp4 is fragmented (``movflags frag_keyframe+empty_moov+
default_base_moof``, plus ``frag_every_frame`` and ``flush_packets``) and each block
starts with a keyframe, so a killed engine leaves a file that plays up to (nearly) its
last frame: the muxer holds back only the newest packet, whose duration it cannot know
yet. The header is written when the recorder opens, so the file exists from the start.
x264 runs with ``tune=zerolatency`` (no lookahead, no B-frames: every frame leaves the
encoder at once) and ``threads=1`` (deterministic bytes for the same frames).

Time: ``fps`` set gives a constant rate (offline render: the model's 16 fps). ``fps``
None stamps frames with the live output times: a block's frames are spread evenly over
the time since the previous block (a pause shows as a held frame), so the file plays
back the way the show looked.
"""

from __future__ import annotations

import collections
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.control_log import ControlLogWriter, log_path_for

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 48000)  # divisible by the usual frame rates; fine enough for live stamps
MOVFLAGS = "frag_keyframe+frag_every_frame+empty_moov+default_base_moof"
NATIVE_FPS = 16.0

_STOP = object()


class RecorderError(RuntimeError):
    """The recording cannot be written (bad path, odd size, encoder missing)."""


class Recorder:
    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: float | None = NATIVE_FPS,
        header: Mapping[str, Any] | None = None,
        queue_blocks: int = 8,
        crf: int = 18,
        log_path: str | Path | None = None,
    ):
        import av

        self.check(path, width, height)
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.log_path = Path(log_path) if log_path else log_path_for(self.path)
        try:
            self._container = av.open(
                str(self.path),
                "w",
                format="mp4",
                options={"movflags": MOVFLAGS, "flush_packets": "1"},
            )
        except (OSError, av.FFmpegError) as e:
            raise RecorderError(f"{self.path}: cannot open for writing: {e}") from None
        try:
            rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(int(NATIVE_FPS))
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {
                "tune": "zerolatency",
                "preset": "veryfast",
                "crf": str(crf),
                "threads": "1",
            }
            self._stream.codec_context.time_base = TIME_BASE
            # the file and its header now, not at the first frame: an engine that is killed
            # or abandoned before its encoder got to a block still leaves a valid mp4
            self._container.start_encoding()
            self._log = ControlLogWriter(
                self.log_path,
                {
                    "width": width,
                    "height": height,
                    "fps": fps or NATIVE_FPS,
                    # wall: frames at the live output times (what the audience saw); model:
                    # one frame every 1/fps s of video (what `render` makes)
                    "clock": "model" if fps else "wall",
                    **(header or {}),
                },
            )
        except (OSError, av.FFmpegError) as e:
            # e.g. the control log next to it cannot be created: nothing half-made is left
            self._container.close()
            self.path.unlink(missing_ok=True)
            what = getattr(e, "filename", None) or self.path
            raise RecorderError(f"{what}: cannot open for writing: {e.strerror or e}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_blocks))
        # records of dropped blocks, written in block order by the encoder thread
        self._dropped: collections.deque = collections.deque(maxlen=4096)
        self._history: tuple[list[dict[str, Any]], str] | None = None
        self._lock = threading.Lock()
        self._pts = -1
        self._frame_index = 0
        self._last_time: float | None = None
        self._t0 = 0.0
        self._span: float | None = None  # usual seconds per live block
        self._side_stream = None  # CUDA stream for device-to-host copies (made on first use)
        # Optional whole-block frame-rate converter (engine.runtime.interpolator.
        # BlockResampler), run here on the encoder thread: the live recording then holds
        # the interpolated stream the outputs show. Swapped by the engine at any time.
        self.resample: Any = None
        self.frames_written = 0
        self.blocks_dropped = 0
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dreamdeck-recorder", daemon=True)
        self._thread.start()

    @staticmethod
    def check(path: str | Path, width: int | None = None, height: int | None = None) -> None:
        """Refuse what cannot be recorded, before anything (a 28 GB model...) is loaded.
        Sizes are checked when given."""
        path = Path(path)
        if (
            width is not None
            and height is not None
            and (width % 2 or height % 2 or width <= 0 or height <= 0)
        ):
            raise RecorderError(f"{path}: H.264 (yuv420p) needs even sizes, got {width}x{height}")
        if path.suffix.lower() not in (".mp4", ".m4v", ".mov"):
            raise RecorderError(f"{path}: the recording must be an .mp4 file")
        if not path.parent.is_dir():
            raise RecorderError(f"{path}: folder {path.parent} does not exist")
        try:  # a real write: permission bits say nothing for root or a read-only mount
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as e:
            raise RecorderError(
                f"{path}: folder {path.parent} cannot be written: {e.strerror or e}"
            ) from None

    # -- generation side ----------------------------------------------------------------
    def submit(
        self,
        rgba: Any,
        record: Mapping[str, Any],
        when: float | None = None,
        *,
        wait: bool = False,
        history: tuple[list[dict[str, Any]], str] | None = None,
    ) -> bool:
        """Queue one block ([T,H,W,4] uint8, numpy or torch, any device) with its control
        record. Live (`wait` False) it never blocks and returns False when the block had to
        be dropped; the offline render passes `wait` True and loses nothing. `history`, with
        the first block of a recording started mid-show, is (preamble records, status) from
        `ControlHistory.preamble`: written before the block (see control_log.py)."""
        if self._closed:
            raise RecorderError(f"{self.path}: recorder is closed")
        when = time.time() if when is None else when
        if history is not None:
            with self._lock:
                self._history = history
        item = (rgba, dict(record), when, _ready_event(rgba))
        if wait:
            self._queue.put(item)
            return True
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.blocks_dropped += 1
            log.warning("recorder: block %s dropped (encoder behind)", record.get("block"))
            # the log keeps every block so replay stays complete; frames 0 marks the gap
            with self._lock:
                self._dropped.append({**record, "frames": 0})
            return False

    def _write_dropped(self, before: int | None) -> None:
        """Log dropped blocks older than `before` (all when None), keeping block order."""
        with self._lock:
            if self._history is not None:  # header and preamble before any block line
                self._log.begin(*self._history)
                self._history = None
            while self._dropped and (before is None or self._dropped[0].get("block", 0) < before):
                self._log.write_block(self._dropped.popleft())

    def close(self) -> None:
        """Encode what is queued, finish the file and the log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        except Exception as e:  # noqa: BLE001 - report, still close the file
            self.error = self.error or e
        self._container.close()
        self._log.close()
        if self.error is not None:
            log.error("recorder: %s: %s", self.path, self.error)

    def _to_host(self, rgba: Any, ready: Any) -> np.ndarray:
        """The device-to-host copy, here on the recorder thread and on its own CUDA stream
        (waiting for `ready` on the GPU), so the generation stream never carries it."""
        if isinstance(rgba, np.ndarray):
            return rgba
        if ready is None:
            return rgba.detach().numpy()
        import torch

        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(rgba.device)
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_event(ready)
            return rgba.detach().to("cpu").numpy()  # blocks this thread until copied

    # -- encoder thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._write_dropped(None)
                return
            if self.error is not None:
                continue  # keep draining so submit never blocks; nothing more is written
            rgba, record, when, ready = item
            try:
                self._write_dropped(record.get("block"))
                frames = self._to_host(rgba, ready)
                resample = self.resample
                if resample is not None:
                    frames = resample(frames)
                n = self._encode_block(frames, when)
                self._log.write_block({**record, "frames": n})
            except Exception as e:  # noqa: BLE001 - a failing disk must not kill the engine
                self.error = e
                log.error("recorder: %s: %s (recording stopped)", self.path, e)

    def _encode_block(self, rgba: Any, when: float) -> int:
        import av

        frames = rgba
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 4):
            raise RecorderError(
                f"block of shape {tuple(frames.shape)}, expected [T, {self.height}, {self.width}, 4]"
            )
        n = frames.shape[0]
        if self.fps:
            stamps = [(self._frame_index + i) / self.fps for i in range(n)]
        else:
            if self._last_time is None:
                self._t0 = when - n / NATIVE_FPS
                self._last_time = self._t0
            gap = max(when - self._last_time, 1e-3)
            # After a pause (or a stall) the block's frames keep their usual pace and the
            # gap shows as the previous frame held, the way the live output looked.
            typical = self._span if self._span is not None else n / NATIVE_FPS
            span = min(gap, 3 * typical)
            if span == gap:
                self._span = gap if self._span is None else 0.8 * self._span + 0.2 * gap
            start = when - span - self._t0
            stamps = [start + i * span / n for i in range(n)]
            self._last_time = when
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgba")
            pts = max(round(stamps[i] * TIME_BASE.denominator), self._pts + 1)
            frame.pts, frame.time_base = pts, TIME_BASE
            self._pts = pts
            if i == 0:  # a keyframe per block: seekable, and fragments start on blocks
                frame.pict_type = av.video.frame.PictureType.I
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self._frame_index += n
        self.frames_written += n
        return n


def _ready_event(rgba: Any) -> Any:
    """For a CUDA block: an event marking, on the producing stream, where its pixels are
    done. Recording it costs the generation thread nothing (no sync)."""
    if isinstance(rgba, np.ndarray) or not getattr(rgba, "is_cuda", False):
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(rgba.device))
    return event
