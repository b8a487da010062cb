"""The live engine: the block loop on its own generation thread, frames out to the frame
path and the recorder, a status line once a second.

Threads (all bounded, none can slow the generation thread):

- generation: ``registry.begin_block`` -> `BlockDriver.step` -> ``frame_path.submit_block``
  (returns at once) and ``recorder.submit`` (never blocks; drops when behind);
- status: logs fps, block time, latency and VRAM once a second;
- the frame path's publisher, the recorder's encoder and the text encoder's worker belong
  to their own modules.

Controls arrive only through the registry (bridges, the command line, tests). ``pause``
holds the loop at once; ``reset`` restarts the stream at the next block; ``decoder``
reloads the decoder between blocks. The registry's ``lookahead`` follows the measured
time from a block's start to its frames, so beat-quantised changes land on the beat.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.runtime.block_driver import BlockDriver, BlockResult
from engine.runtime.control_log import HISTORY_COMPLETE, ControlHistory
from engine.runtime.controls import make_registry
from engine.runtime.registry import Change, Registry
from engine.runtime.startup import ready_line

log = logging.getLogger(__name__)

MAX_BLOCK_FAILURES = 3  # in a row; fewer are reported and the stream restarts

STATES = ("starting", "running", "paused", "stopped")


class Engine:
    """``Engine(pipeline, frame_path=..., recorder=...)``; ``start()``, ``stop()``,
    ``status()``, ``wait_frames(n, timeout)``; controls through ``engine.registry``."""

    def __init__(
        self,
        pipeline: Any,
        *,
        registry: Registry | None = None,
        frame_path: Any = None,
        recorder: Any = None,
        record_dir: str | Path | None = None,
        max_blocks: int | None = None,
        duration: float | None = None,
        status_interval: float | None = 1.0,
        on_block: Callable[[BlockResult], None] | None = None,
        phases: Any = None,
        record_clock: str = "wall",
        warmup_blocks: int | None = None,
        on_warm: Callable[[int], None] | None = None,
    ):
        preset = pipeline.preset
        self.phases = phases  # engine.runtime.startup.Phases from the launch, or None
        # throwaway blocks before the show (0: a warm compile cache, see startup.py). Once
        # the preset's warm-up count of blocks ran (throwaway or, without a warm-up, the
        # show's own), on_warm(n) is told, once: run marks the compile cache warm
        self.warmup_blocks = preset.warmup_blocks if warmup_blocks is None else warmup_blocks
        if self.warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {self.warmup_blocks}")
        self.on_warm = on_warm
        self.pipeline = pipeline
        self.preset = preset
        self.registry = registry or make_registry(
            default_prompt=preset.prompt,
            default_steps=preset.steps,
            assets_dir=preset.vace.assets_dir,  # network paths (vace/ref, file:) stay inside
            lora_check=_lora_check(pipeline),
        )
        self.frame_path = frame_path
        self.recorder = recorder
        # `/dd/record 1` starts a new file here; `--record FILE` starts with FILE.
        self.record_dir = (
            Path(record_dir)
            if record_dir
            else (recorder.path.parent if recorder is not None else Path("recordings"))
        )
        if record_clock not in ("wall", "model"):
            raise ValueError(f"record_clock must be 'wall' or 'model', got {record_clock!r}")
        self.record_clock = record_clock  # for recordings /dd/record starts (see Recorder)
        # every block since the stream last started afresh: a recording that starts later
        # carries it, so `render` can replay it exactly (control_log.py)
        self.history = ControlHistory()
        self._recorder_started: Any = None  # the recorder whose first block went out
        self._closing: list[threading.Thread] = []  # recordings being finalised
        self.max_blocks = max_blocks
        self.duration = duration
        self.status_interval = status_interval
        self.on_block = on_block
        self.driver = BlockDriver(pipeline, registry=self.registry)
        self.state = "stopped"
        self.error: BaseException | None = None
        self.block = 0  # the next block's index (registry numbering: counts on across resets)
        self.frames_out = 0
        self.block_ms: float | None = None
        self.latency_ms: float | None = None
        self._block_ema: float | None = None  # seconds
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)  # (time, frames_out)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._stopped = False
        # the preset's values for controls whose registry defaults are fixed (seed, ...)
        self.registry.set_many(preset.control_defaults())
        if "record" in self.registry:
            # `/dd/record 1` into a folder that cannot be written is refused as it arrives
            # (the sender gets /dd/error with the reason and /dd/record 0), not accepted and
            # then silently dropped.
            p = self.registry.param("record")
            self.registry.declare(dataclasses.replace(p, validate=self._check_record), replace=True)
        if recorder is not None and "record" in self.registry:
            self.registry.set("record", True)
        self._unsubscribe = self.registry.subscribe(self._on_change)
        if recorder is not None:
            recorder.resample = self._recording_resampler()
        out = getattr(frame_path, "output", None)
        if isinstance(out, dict) and "output/fps" in self.registry:
            # the registry shows what the frame path was built with (--fps ...); a pacer
            # outside the registry's range (tests' unpaced fps=inf) keeps the default
            from engine.runtime.registry import ControlError

            try:
                self.registry.set_many(
                    {
                        "output/fps": out["fps"] or 0.0,
                        "output/interpolate": bool(out["interpolate"]),
                        "output/speed": out["speed"],
                    }
                )
            except ControlError as e:
                log.debug("output settings not shown in the registry: %s", e)
        for sink in getattr(frame_path, "sinks", ()):
            if hasattr(sink, "on_problem"):  # an output that lost its target says so
                sink.on_problem = self._output_problem

    def _output_problem(self, message: str) -> None:
        """An output's problem (the ring unlinked by a reader...), from its thread: shown as
        the engine's last error (/dd/status/last_error); the output logs it itself."""
        self.driver.last_error = message

    def _on_change(self, change: Change) -> None:
        if change.path == "pause":
            self._wake.set()
        elif change.path == "record":
            self._record(bool(change.value))
        elif change.path.startswith("output/"):
            self._output(change)

    def _output(self, change: Change) -> None:
        """/dd/output/*: reconfigure the frame path. One it cannot take (interpolation
        without weights, without a rate) is reported and undone; the stream goes on."""
        fp = self.frame_path
        if fp is None or not hasattr(fp, "configure"):
            return
        key = change.path.removeprefix("output/")
        value = change.value
        try:
            if key == "fps":
                fp.configure(fps=value)
            elif key == "interpolate":
                fp.configure(interpolate=bool(value))
            elif key == "speed":
                fp.configure(speed=value)
        except ValueError as e:
            log.error("%s: %s", change.path, e)
            self.driver.last_error = f"{change.path}: {e}"
            current = fp.output.get(key)
            if key == "fps":
                current = current or 0.0
            self.registry.set(change.path, current)  # back to what is in effect
            return
        with self._cond:
            recorder = self.recorder
        if recorder is not None:
            recorder.resample = self._recording_resampler()

    def _recording_resampler(self) -> Any:
        """With interpolation on, the recording gets the interpolated stream too: a
        resampler at the output rate, run on the recorder's thread (its own copy of the
        interpolator: the publisher's is not shared across threads)."""
        fp = self.frame_path
        out = getattr(fp, "output", None)
        if not isinstance(out, dict) or not out.get("interpolate") or fp.interpolator is None:
            return None
        from engine.runtime.interpolator import BlockResampler, Interpolator
        from engine.runtime.pacer import NATIVE_FPS

        it = fp.interpolator
        twin = Interpolator(
            it.net, it.device, dtype=it.dtype, scale=it.scale, downscale=it.downscale, name=it.name
        )
        fps = float(out["fps"])

        def step() -> float:
            rate = getattr(fp.pacer, "source_rate", None)
            return (rate or NATIVE_FPS) / fps

        return BlockResampler(twin, step)

    def _check_record(self, value: Any) -> Any:
        """The `record` parameter's check: turning it on needs a folder we can write."""
        if value is True and self.recorder is None:
            try:
                check_writable_folder(self.record_dir)
            except OSError as e:
                reason = f"cannot record into {self.record_dir}: {e.strerror or e}"
                self.driver.last_error = f"record: {reason}"
                log.error("record: %s", reason)
                self.registry.echo("record")  # the sender's toggle goes back to 0
                raise ValueError(reason) from None
        return value

    def _record(self, on: bool) -> None:
        """Start a new recording (a dated file in `record_dir`) or finalise the current one.
        Runs on the sender's thread; the generation thread only ever sees a swapped
        reference, and finalising happens on a thread of its own."""
        from engine.runtime.recorder import NATIVE_FPS, Recorder, RecorderError

        with self._cond:
            current = self.recorder
        if on and current is None:
            path = self.record_dir / time.strftime("dreamdeck-%Y%m%d-%H%M%S.mp4")
            n = 1
            while path.exists():
                n += 1
                path = self.record_dir / time.strftime(f"dreamdeck-%Y%m%d-%H%M%S-{n}.mp4")
            try:
                self.record_dir.mkdir(parents=True, exist_ok=True)
                rec = Recorder(
                    path,
                    width=self.preset.width,
                    height=self.preset.height,
                    fps=None if self.record_clock == "wall" else NATIVE_FPS,
                    header={"model": self.preset.model, "preset": self.preset.name, "mode": "live"},
                )
            except (RecorderError, OSError) as e:
                log.error("record: cannot start %s: %s", path, e)
                self.driver.last_error = f"record: {e}"
                self.registry.set("record", False)
                return
            rec.resample = self._recording_resampler()
            with self._cond:
                self.recorder = rec
            log.info("recording to %s", path)
        elif not on and current is not None:
            with self._cond:
                self.recorder = None
            closing = threading.Thread(target=current.close, name="dreamdeck-record-close")
            closing.start()
            self._closing = [t for t in self._closing if t.is_alive()] + [closing]
            log.info("recording finalised: %s", current.path)

    # -- control --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self.state = "starting"
        self._thread = threading.Thread(target=self._run, name="dreamdeck-generation", daemon=True)
        self._thread.start()
        if self.status_interval:
            self._status_thread = threading.Thread(
                target=self._status_loop, name="dreamdeck-status", daemon=True
            )
            self._status_thread.start()

    def pause(self, on: bool = True) -> None:
        self.registry.set("pause", on)

    def reset(self) -> None:
        self.registry.set("reset", 1)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop generating, then close the outputs and finalise the recording. Idempotent;
        safe from a signal handler's thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("generation thread did not stop within %ss", timeout)
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
        self._unsubscribe()
        for name, part in (("frame path", self.frame_path), ("recorder", self.recorder)):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - close the rest anyway
                    log.exception("closing the %s failed", name)
        for closing in list(self._closing):  # `/dd/record 0` just before the stop
            closing.join(timeout)
        self.pipeline.close()
        self.state = "stopped"
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the generation thread to end (max blocks, duration, an error, stop)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_frames(self, n: int, timeout: float | None = None) -> bool:
        """Block until `n` frames in all have gone out (or the engine stopped, or timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.frames_out < n:
                if self.error is not None or (
                    self._thread is not None and not self._thread.is_alive()
                ):
                    return self.frames_out >= n
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
            return True

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        vram = None
        if self.pipeline.device.type == "cuda":
            vram = torch.cuda.memory_reserved(self.pipeline.device) / 2**20
        added = 0.0
        if self.frame_path is not None and hasattr(self.frame_path, "added_latency_ms"):
            added = self.frame_path.added_latency_ms()
        return {
            "fps": self._fps(),
            "block_ms": self.block_ms,
            # + interpolation's wait for the next generated frame (0 without it)
            "latency_ms": None if self.latency_ms is None else self.latency_ms + added,
            "interp_latency_ms": added,
            "block": self.block,
            "vram_mb": vram,
            "state": self.state,
            "frames": self.frames_out,
            # the input video's state for feedback: "none", or e.g. "input shm:td: live"
            "vace_input": self.pipeline.input_status()
            if hasattr(self.pipeline, "input_status")
            else None,
            "last_error": self.driver.last_error,  # the last control that could not be applied
        }

    def _fps(self) -> float | None:
        with self._cond:
            if len(self._rate) < 2:
                return None
            now = time.monotonic()
            recent = [r for r in self._rate if now - r[0] <= 5.0] or list(self._rate)[-2:]
            if len(recent) < 2:
                # one block in the last seconds: rate since the previous one
                recent = list(self._rate)[-2:]
            (t0, f0), (t1, f1) = recent[0], recent[-1]
            return (f1 - f0) / (t1 - t0) if t1 > t0 else None

    def status_line(self) -> str:
        s = self.status()

        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        return (
            f"{s['state']:8s} block {s['block']:6d}  {f(s['fps'], '5.1f')} fps  "
            f"block {f(s['block_ms'], '6.1f')} ms  latency {f(s['latency_ms'], '6.1f')} ms  "
            f"VRAM {f(s['vram_mb'], '.0f')} MB"
        )

    def _status_loop(self) -> None:
        behind = False
        while not self._stop.wait(self.status_interval):
            if self.state in ("running", "paused"):
                log.info("%s", self.status_line())
            fp = self.frame_path
            if self.state == "running" and hasattr(fp, "output_status"):
                out = fp.output_status()
                if out["falling_behind"] and not behind:
                    log.warning(
                        "output: generation (%s fps) is slower than the motion shown (speed %s):"
                        " holding frames; /dd/output/speed fit never starves",
                        "-" if self._fps() is None else f"{self._fps():.1f}",
                        out["speed"],
                    )
                behind = out["falling_behind"]

    # -- generation thread ----------------------------------------------------------------
    def _run(self) -> None:
        # The OS thread id: `dreamdeck soak` reads this thread's CPU time from /proc.
        log.info("generation thread: native id %d", threading.get_native_id())
        try:
            t_warm = time.perf_counter()
            n_warm = self.warmup_blocks
            bar = None
            if self.phases is not None and n_warm > 0:
                bar = self.phases.bar("warm-up (compile, autotune)", n_warm)
            try:
                self.driver.warmup(
                    self.registry.snapshot(),
                    n_warm,
                    self._stop.is_set,
                    on_block=None if bar is None else bar.update,
                )
            finally:
                if bar is not None:
                    bar.close()
            if self.phases is not None and n_warm > 0:
                self.phases.add(
                    f"compile + warm-up ({n_warm} blocks)", time.perf_counter() - t_warm
                )
            if n_warm > 0 and not self._stop.is_set():
                self._tell_warm(n_warm)
            t_end = None if self.duration is None else time.monotonic() + self.duration
            # Changes that arrived during warm-up count from here: latency is what a
            # performer waits for, not how long the compile took.
            self._live_since = time.time()
            self.state = "running"
            log.info(
                "engine running: %s %dx%d", self.preset.name, self.preset.width, self.preset.height
            )
            failures = 0
            while not self._stop.is_set():
                if self.max_blocks is not None and self.block >= self.max_blocks:
                    break
                if t_end is not None and time.monotonic() >= t_end:
                    break
                if self.registry.applied("pause"):
                    self.state = "paused"
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                self.state = "running"
                try:
                    self._one_block()
                    failures = 0
                except Exception as e:  # noqa: BLE001 - the show goes on (see below)
                    # A block that fails (a CUDA out-of-memory spike, a decoder error...)
                    # must not end the show: report it, restart the stream from a clean
                    # state (the failed block may have half-updated the caches) and go on.
                    # Only repeated failures in a row stop the engine.
                    failures += 1
                    log.exception("block %d failed (%d in a row)", self.block, failures)
                    self.driver.last_error = f"block failed: {type(e).__name__}: {e}"[:300]
                    if failures >= MAX_BLOCK_FAILURES:
                        raise
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self.registry.set("reset", 1)
        except BaseException as e:  # noqa: BLE001 - reported to the caller through .error
            self.error = e
            log.exception("generation stopped by an error")
        finally:
            self.state = "stopped"
            with self._cond:
                self._cond.notify_all()

    def _tell_warm(self, blocks: int) -> None:
        on_warm, self.on_warm = self.on_warm, None  # once
        if on_warm is None:
            return
        try:
            on_warm(blocks)
        except Exception as e:  # noqa: BLE001 - a marker is an optimisation
            log.warning("warm-up marker: %s", e)

    def _one_block(self) -> None:
        t0 = time.perf_counter()
        controls = self.registry.begin_block(self.block)
        result = self.driver.step(controls)
        if self.frame_path is not None:
            self.frame_path.submit_block(result.rgba, result.block)
        recorder = self.recorder  # swapped by /dd/record from another thread
        if recorder is not None:
            history = None
            if recorder is not self._recorder_started:
                # its first block: the blocks before it since the last clean one go first
                # (none needed when this block is clean itself)
                self._recorder_started = recorder
                history = ([], HISTORY_COMPLETE) if result.clean else self.history.preamble()
            recorder.submit(result.rgba, result.record, history=history)
        self.history.add(result.record, clean=result.clean, rest_prompt=result.rest_prompt)
        if result.rgba.is_cuda:
            # The one host sync per block, on purpose: it keeps the CPU from queuing blocks
            # ahead of the GPU (a control applied at begin_block must not wait behind
            # them), and makes block_ms and the lookahead GPU time, not launch time.
            torch.cuda.current_stream(result.rgba.device).synchronize()
        done = time.time()
        dt = time.perf_counter() - t0
        self._block_ema = dt if self._block_ema is None else 0.8 * self._block_ema + 0.2 * dt
        # A change applied at a block boundary shows up when that block's frames come out.
        self.registry.lookahead = self._block_ema
        with self._cond:
            self.block_ms = dt * 1e3
            # the newest change this block carries: a prompt that joined it in flight, else
            # the block's own controls
            got = result.late_received
            if got is None and not result.echo_only:
                got = controls.received
            if got is not None:
                received = max(got, getattr(self, "_live_since", got))
                self.latency_ms = (done - received) * 1e3
            if self.frames_out == 0 and self.phases is not None:
                self.phases.add("first block", dt)
                log.info(
                    "start-up: first frames %.1f s after launch (%s)",
                    self.phases.elapsed(),
                    ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.times.items()),
                )
                attn = getattr(getattr(self.pipeline.model, "attn", None), "backend", None)
                log.info("%s", ready_line(self.phases.elapsed(), self.pipeline.device, attn))
            self.frames_out += result.frames
            self._rate.append((time.monotonic(), self.frames_out))
            self.block += 1
            self._cond.notify_all()
        if self.on_warm is not None and self.block >= max(1, self.preset.warmup_blocks):
            self._tell_warm(self.block)  # no warm-up ran: the show's first blocks compiled
        if self.on_block is not None:
            self.on_block(result)


def _lora_check(pipeline: Any) -> Callable[[str], Any] | None:
    """The header check of `lora/{n}/file` values (engine.runtime.lora_loader)."""
    loader = getattr(pipeline, "lora_loader", None)
    return loader.check if loader is not None else None


def check_writable_folder(folder: Path) -> None:
    """Make `folder` if needed and create (and delete) a file in it: the only test that also
    holds for root, read-only file systems and full disks. Raises OSError."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def tiny_engine(*, height: int = 64, width: int = 64, **engine_kwargs: Any) -> Engine:
    """A tiny random-weights engine on the CPU, built in about a second: for tests of the
    bridges and tools that need a real engine producing frames (not started)."""
    from engine.runtime.pipeline import build_pipeline
    from engine.runtime.presets import load_preset

    preset = load_preset("tiny").replace(height=height, width=width)
    return Engine(build_pipeline(preset), **engine_kwargs)
