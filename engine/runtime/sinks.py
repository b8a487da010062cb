"""Frame sinks: where presented frames go (shared memory, NDI, Spout, recorders).

The contract (``docs/interfaces.md``): the frame path's publisher thread calls
``open(width, height)`` before the first frame and again whenever the size changes, then
``send(rgba, meta)`` per presented frame, and ``close()`` once. ``send`` must not block:
the array is only valid during the call (it views a reused pinned buffer), so a sink
either copies it right away (shared memory: one memcpy) or hands a copy to its own
thread through a :class:`LatestFrameMailbox` (NDI, Spout), where latest frame wins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "FrameMeta",
    "FrameSink",
    "LatestFrameMailbox",
    "WorkerSink",
    "SinkError",
    "parse_sink_spec",
    "make_sinks",
    "SINK_KINDS",
]


@dataclass(frozen=True)
class FrameMeta:
    """Carried by every presented frame."""

    block: int  # generation block the frame came from
    index: int  # frame counter since start (presented frames)
    timestamp: float  # time.time() when presented


@runtime_checkable
class FrameSink(Protocol):
    name: str

    def open(self, width: int, height: int) -> None: ...
    def send(self, rgba: np.ndarray, meta: FrameMeta) -> None: ...
    def close(self) -> None: ...


class SinkError(RuntimeError):
    """A sink that cannot work here (missing library, wrong platform, bad spec)."""


class LatestFrameMailbox:
    """A triple buffer between one producer and one consumer thread; latest frame wins.

    ``put`` copies into a buffer the consumer is not using and never waits on the
    consumer; ``take`` hands the consumer the newest frame, which stays valid until its
    next ``take``. Frames the consumer did not get to are overwritten (counted in
    ``dropped``). Buffers are reallocated only when the frame shape changes.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._bufs: list[np.ndarray] = []
        self._meta: list[FrameMeta | None] = [None, None, None]
        self._ready: int | None = None  # index of the newest unread frame
        self._reading: int | None = None  # index the consumer holds
        self._closed = False
        self.dropped = 0

    def put(self, rgba: np.ndarray, meta: FrameMeta) -> None:
        with self._cond:
            if self._closed:
                return
            if not self._bufs or self._bufs[0].shape != rgba.shape:
                # New shape: fresh buffers; the one the consumer reads stays alive
                # through its own reference.
                self._bufs = [np.empty_like(rgba) for _ in range(3)]
                self._ready, self._reading = None, None
            busy = {self._ready, self._reading}
            i = next(k for k in range(3) if k not in busy)
            if self._ready is not None:
                self.dropped += 1
            buf = self._bufs[i]
        np.copyto(buf, rgba)  # outside the lock: the consumer may take meanwhile
        with self._cond:
            if self._bufs and self._bufs[i] is buf:
                self._meta[i] = meta
                self._ready = i
                self._cond.notify()

    def take(self, timeout: float | None = None) -> tuple[np.ndarray, FrameMeta] | None:
        """The newest frame not yet taken, waiting up to ``timeout``; None on timeout or
        when closed."""
        with self._cond:
            if self._ready is None and not self._closed:
                self._cond.wait(timeout)
            if self._ready is None or self._closed:
                return None
            i, self._ready = self._ready, None
            self._reading = i
            return self._bufs[i], self._meta[i]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class WorkerSink:
    """A sink whose real output runs on its own thread (setup, emit and teardown all on
    that thread: GL contexts and some SDKs must stay on one thread).

    ``send`` only copies into the mailbox, so a blocking SDK call (NDI clocking, a GPU
    upload, a stalled network) never reaches the publisher thread, let alone generation.
    Subclasses implement ``_setup``, ``_emit`` and ``_teardown``.
    """

    name = "worker"

    def __init__(self) -> None:
        self._mailbox = LatestFrameMailbox()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.sent = 0

    def open(self, width: int, height: int) -> None:
        if self._thread is not None:
            return  # size changes arrive with the frames themselves
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise SinkError(f"{self.name}: could not start: {self._error}") from self._error

    def send(self, rgba: np.ndarray, meta: FrameMeta) -> None:
        if self._thread is None:
            self.open(rgba.shape[1], rgba.shape[0])
        self._mailbox.put(rgba, meta)

    def close(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    @property
    def dropped(self) -> int:
        return self._mailbox.dropped

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # reported by open() in the caller's thread
            self._error = e
            self._ready.set()
            try:
                self._teardown()  # release whatever setup got as far as creating
            except Exception:
                log.exception("%s: teardown after a failed setup failed", self.name)
            return
        self._ready.set()
        failures = 0
        try:
            while not self._stop.is_set():
                got = self._mailbox.take(timeout=0.1)
                if got is None:
                    continue
                try:
                    self._emit(*got)
                    self.sent += 1
                    failures = 0
                except Exception:
                    failures += 1
                    if failures in (1, 10, 100) or failures % 1000 == 0:
                        log.exception(
                            "%s: sending a frame failed (%d in a row)", self.name, failures
                        )
        finally:
            try:
                self._teardown()
            except Exception:
                log.exception("%s: teardown failed", self.name)

    def _setup(self) -> None:  # pragma: no cover - interface
        pass

    def _emit(self, rgba: np.ndarray, meta: FrameMeta) -> None:  # pragma: no cover
        raise NotImplementedError

    def _teardown(self) -> None:  # pragma: no cover - interface
        pass


SINK_KINDS = ("shm", "ndi", "spout")


def parse_sink_spec(spec: str) -> tuple[str, str]:
    """``"kind"`` or ``"kind:name"`` -> (kind, name); the name defaults to ``dreamdeck``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SinkError(f"bad output spec {spec!r}: expected KIND or KIND:NAME")
    kind, _, name = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in SINK_KINDS:
        raise SinkError(f"unknown output {kind!r} in {spec!r}: choose from {', '.join(SINK_KINDS)}")
    return kind, (name or "dreamdeck")


def make_sinks(specs: Iterable[str], *, shm_slots: int = 3) -> list[FrameSink]:
    """Build sinks from specs such as ``["shm", "ndi:stage-left", "spout"]``.

    Every spec is checked (and every platform/library requirement) before any sink is
    built, so a bad one changes nothing. Sinks are returned unopened.
    """
    parsed = [parse_sink_spec(s) for s in specs]
    seen: set[tuple[str, str]] = set()
    for p in parsed:
        if p in seen:
            raise SinkError(f"output {p[0]}:{p[1]} given twice")
        seen.add(p)
    if any(k == "spout" for k, _ in parsed):
        from engine.runtime.spout_out import check_spout_available

        check_spout_available()
    if any(k == "ndi" for k, _ in parsed):
        from engine.runtime.ndi_out import check_ndi_available

        check_ndi_available()
    sinks: list[FrameSink] = []
    for kind, name in parsed:
        if kind == "shm":
            from engine.runtime.shm_ring import ShmRingSink

            try:
                sinks.append(ShmRingSink(name, slots=shm_slots))
            except ValueError as e:
                raise SinkError(str(e)) from e
        elif kind == "ndi":
            from engine.runtime.ndi_out import NdiSink

            sinks.append(NdiSink(name))
        else:
            from engine.runtime.spout_out import SpoutSink

            sinks.append(SpoutSink(name))
    return sinks
