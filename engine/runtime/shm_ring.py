"""A ring of RGBA8 frames in named shared memory, for readers in other processes.

The byte layout is specified in ``docs/shared-memory.md``; this module is its reference
implementation. It uses only the standard library and numpy, and imports nothing from
``engine``, so it can be copied as-is into TouchDesigner (a Script TOP writing frames
*into* a ring, e.g. a VACE input) or any other host Python.

Why a seqlock per slot rather than a lock: the writer must never wait for a reader (a
frozen reader must not slow generation), and readers must never see a torn frame. The
writer brackets each slot write with ``seq_begin``/``seq_end``; a reader copies the
pixels and keeps them only when both counters still match afterwards.

Why a new segment on resolution change: a shared-memory segment cannot grow in place on
every platform, and remapping under a reader is not possible. The writer marks the old
segment ``SUPERSEDED`` and publishes a new one under the same name with the generation
counter incremented; readers watching the flag reattach.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "SLOT_HEADER_SIZE",
    "FLAG_SUPERSEDED",
    "FLAG_CLOSED",
    "FrameInfo",
    "RingError",
    "ShmRingWriter",
    "ShmRingReader",
    "ShmRingSink",
]

MAGIC = b"DDRG"
VERSION = 1
HEADER_SIZE = 128
SLOT_HEADER_SIZE = 64
ALIGN = 64
PIXEL_FORMAT = b"RGBA"
FLAG_SUPERSEDED = 1  # a newer segment is (being) published under this name: reattach
FLAG_CLOSED = 2  # the writer stopped cleanly; the last frame stays readable

# Header fields after the magic (offset 4): version, header_size, width, height, channels,
# slot_count, slot_header_size, row_bytes, slot_stride, generation, flags, write_seq,
# writer_pid, pixel_format, segment_id, created.
_HDR = struct.Struct("<HHIIIIIIQIIQI4sQd")
_OFF_FLAGS = 44
_OFF_WRITE_SEQ = 48
_SEQ = struct.Struct("<Q")
_FLAGS = struct.Struct("<I")
# Slot header after seq_begin (offset 8): seq_end, timestamp, block, frame index, width, height.
_SLOT_META = struct.Struct("<dqQII")  # at offset 16
_OFF_SEQ_END = 8


class RingError(RuntimeError):
    """A ring that exists but cannot be used (wrong magic, version or format)."""


@dataclass(frozen=True)
class FrameInfo:
    """What a reader learns about one frame besides its pixels."""

    sequence: int  # 1, 2, ... per writer; increases by 1 per frame written
    block: int  # generation block index (-1 when unknown)
    index: int  # frame counter of the producer
    timestamp: float  # unix seconds when presented
    width: int
    height: int
    generation: int  # segment generation under this name (bumps on resolution change)


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _valid_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or len(name) > 30:
        raise ValueError(
            f"bad shared-memory name {name!r}: use 1-30 characters without slashes "
            "(macOS limits names to 31 bytes)"
        )
    return name


class _Segment:
    """A named shared-memory mapping that can skip Python's resource tracker.

    Why not always ``SharedMemory``: before Python 3.13, attaching registers the segment
    with the resource tracker, which unlinks it when *this* process exits, destroying the
    writer's segment; inside a host like TouchDesigner it may even spawn the host binary
    as a tracker. With ``track=False`` we map POSIX segments directly (what SharedMemory
    does internally) or use ``track=False`` on 3.13+.
    """

    def __init__(self, name: str, *, create: bool = False, size: int = 0, track: bool = True):
        self.name = name
        self._shm = None
        self._mmap = None
        if os.name == "nt" or track or sys.version_info >= (3, 13):
            from multiprocessing import shared_memory

            kw = {}
            if sys.version_info >= (3, 13) and os.name != "nt":
                kw["track"] = track
            self._shm = shared_memory.SharedMemory(name, create=create, size=size, **kw)
            self.buf = self._shm.buf
        else:
            import _posixshmem

            flags = os.O_RDWR | ((os.O_CREAT | os.O_EXCL) if create else 0)
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
            try:
                if create:
                    os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
            except BaseException:
                if create:
                    _posixshmem.shm_unlink("/" + name)
                raise
            finally:
                os.close(fd)
            self.buf = memoryview(self._mmap)
        self.size = len(self.buf)

    def close(self) -> None:
        buf, self.buf = getattr(self, "buf", None), None
        if buf is None:
            return
        if self._shm is not None:
            self._shm.close()
        else:
            buf.release()
            self._mmap.close()

    def unlink(self) -> None:
        if self._shm is not None:
            self._shm.unlink()
        else:
            import _posixshmem

            _posixshmem.shm_unlink("/" + self.name)


def _unlink_name(name: str) -> None:
    """Unlink a POSIX segment by name without touching the resource tracker."""
    if os.name == "nt":
        return  # Windows frees a mapping when its last handle closes
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (names are files there)


def _remove_empty_dir(name: str) -> None:
    """A directory where the segment belongs (a mistake that disables the output for good):
    removed when empty, else a RingError that says what to do."""
    path = os.path.join(SHM_DIR, name)
    try:
        os.rmdir(path)
    except OSError as e:
        raise RingError(
            f"shared-memory name {name!r} is taken by the directory {path}"
            f" ({e.strerror or e}); remove it or pick another name"
        ) from None


def _name_identity(name: str) -> tuple[int, int] | None:
    """(device, inode) of the object under `name` on Linux, None where names are not files."""
    if not os.path.isdir(SHM_DIR):
        return None
    try:
        st = os.stat(os.path.join(SHM_DIR, name))
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def _read_header(buf) -> dict:
    if bytes(buf[0:4]) != MAGIC:
        raise RingError("not a dreamdeck ring (bad magic) or not initialised yet")
    vals = _HDR.unpack_from(buf, 4)
    keys = (
        "version header_size width height channels slot_count slot_header_size row_bytes "
        "slot_stride generation flags write_seq writer_pid pixel_format segment_id created"
    ).split()
    h = dict(zip(keys, vals, strict=True))
    if h["version"] != VERSION:
        raise RingError(f"ring version {h['version']} is not supported (expected {VERSION})")
    if h["pixel_format"] != PIXEL_FORMAT or h["channels"] != 4:
        raise RingError(f"ring pixel format {h['pixel_format']!r}/{h['channels']} is not RGBA8")
    return h


class ShmRingWriter:
    """Writes frames into the ring ``name``; never waits for readers.

    A frame whose shape differs from the ring's publishes a new segment generation
    (see module docstring). ``track`` keeps Python's resource tracker, so a crashed
    writer's segment is removed; pass ``track=False`` inside hosts such as TouchDesigner.
    """

    def __init__(
        self,
        name: str = "dreamdeck",
        width: int = 0,
        height: int = 0,
        *,
        slots: int = 3,
        track: bool = True,
    ):
        self.name = _valid_name(name)
        if not isinstance(slots, int) or not 2 <= slots <= 64:
            raise ValueError(f"slots must be an int in 2..64, got {slots!r}")
        self.slots = slots
        self.track = track
        self.generation = 0
        self.sequence = 0
        self.width = self.height = 0
        self._seg: _Segment | None = None
        self._pixels: list[np.ndarray] = []
        self._pending: tuple[int, int] | None = None  # a size waiting for its segment (Windows)
        self._segment_id = 0
        self._identity: tuple[int, int] | None = None
        if width or height:
            self.resize(width, height)

    # -- segment life cycle -------------------------------------------------------------
    def resize(self, width: int, height: int) -> bool:
        """Publish a new segment for ``width``×``height``. False if it must wait (Windows:
        readers still hold the old one; retried on the next write)."""
        if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
            raise ValueError(f"ring size must be positive ints, got {width!r}x{height!r}")
        if width > 16384 or height > 16384:
            raise ValueError(f"ring size {width}x{height} is larger than 16384x16384")
        if self._seg is not None:
            self._retire(FLAG_SUPERSEDED)
        row = width * 4
        stride = _round_up(SLOT_HEADER_SIZE + row * height)
        size = HEADER_SIZE + self.slots * stride
        try:
            seg = self._create(size)
        except FileExistsError:
            self._pending = (width, height)
            return False
        self._pending = None
        self.generation += 1
        buf = seg.buf
        _HDR.pack_into(
            buf, 4, VERSION, HEADER_SIZE, width, height, 4, self.slots, SLOT_HEADER_SIZE, row,
            stride, self.generation, 0, self.sequence, os.getpid() & 0xFFFFFFFF, PIXEL_FORMAT,
            secrets.randbits(64), time.time(),
        )  # fmt: skip
        buf[0:4] = MAGIC  # last: a reader seeing the magic sees a complete header
        self._seg, self._stride = seg, stride
        self._segment_id = _HDR.unpack_from(buf, 4)[14]
        self._identity = _name_identity(self.name)
        self.width, self.height = width, height
        self._pixels = [
            np.frombuffer(
                buf, np.uint8, row * height, HEADER_SIZE + i * stride + SLOT_HEADER_SIZE
            ).reshape(height, width, 4)
            for i in range(self.slots)
        ]
        return True

    def _create(self, size: int) -> _Segment:
        try:
            return _Segment(self.name, create=True, size=size, track=self.track)
        except FileExistsError:
            if os.name == "nt":
                raise  # still held by a reader; resize() retries later
        # POSIX: a segment left by an earlier writer (crashed, or another process).
        # Tell its readers to move on, continue its generation count, then replace it.
        # Anything else under the name (a stray file, a directory) is never written to.
        try:
            old = _Segment(self.name, track=False)
            try:
                if old.size >= HEADER_SIZE:
                    self.generation = max(self.generation, _read_header(old.buf)["generation"])
                    _set_flag(old.buf, FLAG_SUPERSEDED)
            except RingError:
                pass
            finally:
                old.close()
        except (OSError, ValueError):
            pass
        try:
            _unlink_name(self.name)
        except IsADirectoryError:
            _remove_empty_dir(self.name)
        except OSError as e:
            raise RingError(
                f"shared-memory name {self.name!r} is taken and cannot be freed"
                f" ({e.strerror or e}); remove it or pick another name"
            ) from None
        try:
            return _Segment(self.name, create=True, size=size, track=self.track)
        except FileExistsError:
            raise RingError(
                f"shared-memory name {self.name!r} is taken by something that is not a ring"
                " and cannot be removed; remove it or pick another name"
            ) from None

    def _retire(self, flag: int) -> None:
        seg, self._seg = self._seg, None
        self._pixels = []
        if seg is None:
            return
        _set_flag(seg.buf, flag)
        seg.close()
        if _name_identity(self.name) not in (None, self._identity):
            return  # the name is gone or holds something else now: not ours to remove
        try:
            seg.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Mark the ring closed and remove its name. Readers keep their mapping."""
        self._retire(FLAG_CLOSED)
        self._pending = None

    def lost(self) -> str | None:
        """Why readers can no longer find this ring under its name, or None when they can.

        The name can vanish under a live writer: a reader that unlinks it (Python's
        `SharedMemory` does so on `unlink()`, and its resource tracker at the reader's
        exit before 3.13), or someone replacing it. The mapping keeps working, so nothing
        fails: frames just go nowhere. Cheap (one stat on Linux); call it about once a
        second and `resize` to publish again."""
        if self._seg is None or os.name == "nt":
            return None  # Windows: a name lives as long as any handle, ours included
        ident = _name_identity(self.name)
        if ident is not None:
            if ident == self._identity and ident != (-1, -1):  # (-1, -1): gone before we
                return None  # could even look (unlinked between create and stat)
            return "removed by another process" if ident == (-1, -1) else "replaced"
        try:  # macOS: no files for names; ask the segment under the name who it is
            seg = _Segment(self.name, track=False)
        except (OSError, ValueError):
            return "removed by another process"
        try:
            same = seg.size >= HEADER_SIZE and _read_header(seg.buf)["segment_id"] == (
                self._segment_id
            )
        except RingError:
            same = False
        finally:
            seg.close()
        return None if same else "replaced"

    # -- frames -------------------------------------------------------------------------
    def write(
        self,
        rgba: np.ndarray,
        *,
        block: int = -1,
        index: int | None = None,
        timestamp: float | None = None,
    ) -> int:
        """Copy one [H, W, 4] uint8 frame into the next slot. Returns its sequence number,
        or 0 when it was dropped because a new segment could not be published yet."""
        if not isinstance(rgba, np.ndarray) or rgba.dtype != np.uint8 or rgba.ndim != 3:
            raise ValueError(f"frame must be a uint8 [H, W, 4] array, got {_describe(rgba)}")
        h, w, c = rgba.shape
        if c != 4:
            raise ValueError(f"frame must have 4 channels (RGBA), got {c}")
        if self._pending is not None or (w, h) != (self.width, self.height) or self._seg is None:
            if not self.resize(w, h):
                return 0
        seq = self.sequence + 1
        slot = seq % self.slots
        base = HEADER_SIZE + slot * self._stride
        buf = self._seg.buf
        _SEQ.pack_into(buf, base, seq)  # seq_begin: slot is being written
        _SLOT_META.pack_into(
            buf,
            base + 16,
            time.time() if timestamp is None else float(timestamp),
            int(block),
            seq if index is None else int(index),
            w,
            h,
        )
        np.copyto(self._pixels[slot], rgba)
        _SEQ.pack_into(buf, base + _OFF_SEQ_END, seq)  # seq_end: slot complete
        _SEQ.pack_into(buf, _OFF_WRITE_SEQ, seq)
        self.sequence = seq
        return seq

    def __enter__(self) -> ShmRingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _set_flag(buf, flag: int) -> None:
    (flags,) = _FLAGS.unpack_from(buf, _OFF_FLAGS)
    _FLAGS.pack_into(buf, _OFF_FLAGS, flags | flag)


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {tuple(x.shape)}"
    return type(x).__name__


class ShmRingReader:
    """Reads the newest complete frame of the ring ``name`` without ever blocking it.

    Polling is cheap: ``read`` returns None when nothing new was written. It reattaches
    by itself when the writer publishes a new generation, restarts, or comes back.
    """

    #: without new frames for this long, check whether the name now holds another segment
    stale_after = 1.0

    def __init__(self, name: str = "dreamdeck"):
        self.name = _valid_name(name)
        self._seg: _Segment | None = None
        self._hdr: dict | None = None
        self.last_sequence = 0
        self._last_new = time.monotonic()
        self._last_check = 0.0

    @property
    def header(self) -> dict | None:
        """The attached segment's header fields (None when not attached)."""
        return self._hdr

    def _attach(self) -> bool:
        try:
            seg = _Segment(self.name, track=False)
        except (FileNotFoundError, ValueError, OSError):
            return False
        try:
            hdr = _read_header(seg.buf)
        except RingError as e:
            seg.close()
            if "bad magic" in str(e):
                return False  # being initialised: try again on the next poll
            raise
        if seg.size < HEADER_SIZE + hdr["slot_count"] * hdr["slot_stride"]:
            seg.close()
            raise RingError(f"ring {self.name!r} is smaller than its header says")
        self._detach()
        self._seg, self._hdr = seg, hdr
        self.last_sequence = 0
        self._last_new = time.monotonic()
        return True

    def _detach(self) -> None:
        seg, self._seg, self._hdr = self._seg, None, None
        if seg is not None:
            seg.close()

    def _name_moved(self) -> bool:
        """True when the name now refers to another, valid segment (writer restarted)."""
        try:
            seg = _Segment(self.name, track=False)
        except (FileNotFoundError, ValueError, OSError):
            return False
        try:
            return _read_header(seg.buf)["segment_id"] != self._hdr["segment_id"]
        except RingError:
            return False
        finally:
            seg.close()

    def read(self, out: np.ndarray | None = None, *, flip: bool = False):
        """Return ``(FrameInfo, pixels)`` for the newest complete frame newer than the last
        one returned, or None. ``pixels`` is ``out`` (resized copy when shapes differ) or a
        new [H, W, 4] array; ``flip`` stores rows bottom-up (TouchDesigner's origin)."""
        if self._seg is None and not self._attach():
            return None
        (flags,) = _FLAGS.unpack_from(self._seg.buf, _OFF_FLAGS)
        if flags & (FLAG_SUPERSEDED | FLAG_CLOSED):
            # Let go of the old segment at once (on Windows the writer cannot publish the
            # new one under the same name while anyone holds the old), then look again.
            self._detach()
            if not self._attach():
                return None
        now = time.monotonic()
        (wseq,) = _SEQ.unpack_from(self._seg.buf, _OFF_WRITE_SEQ)
        if wseq == self.last_sequence:
            if now - self._last_new > self.stale_after and now - self._last_check > 0.5:
                self._last_check = now
                if self._name_moved():
                    self._attach()
            return None
        got = self._read_newest(out, flip)
        if got is not None:
            self.last_sequence = got[0].sequence
            self._last_new = now
        return got

    def _read_newest(self, out, flip):
        h, buf = self._hdr, self._seg.buf
        bases = [HEADER_SIZE + i * h["slot_stride"] for i in range(h["slot_count"])]
        order = sorted(
            ((_SEQ.unpack_from(buf, b + _OFF_SEQ_END)[0], b) for b in bases), reverse=True
        )
        for seq_end, base in order:
            if seq_end == 0 or seq_end <= self.last_sequence:
                return None
            ts, block, index, w, hh = _SLOT_META.unpack_from(buf, base + 16)
            if w != h["width"] or hh != h["height"]:
                continue
            src = np.frombuffer(buf, np.uint8, hh * w * 4, base + SLOT_HEADER_SIZE)
            src = src.reshape(hh, w, 4)
            if out is None or out.shape != (hh, w, 4):
                out = np.empty((hh, w, 4), np.uint8)
            np.copyto(out, src[::-1] if flip else src)
            del src  # no export left behind: the mapping can be closed any time
            (seq_begin,) = _SEQ.unpack_from(buf, base)
            if seq_begin == seq_end:
                info = FrameInfo(seq_end, block, index, ts, w, hh, h["generation"])
                return info, out
        return None

    def close(self) -> None:
        self._detach()

    def __enter__(self) -> ShmRingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShmRingSink:
    """The ring as a frame sink (``docs/interfaces.md``): ``dreamdeck run --shm NAME``.

    ``send`` is one memcpy into shared memory, so it runs inline on the publisher thread.
    ``meta`` is duck-typed (``block``, ``index``, ``timestamp``) to keep this module free
    of engine imports.

    The ring must not vanish silently: about once a second ``send`` checks that readers
    can still find it under its name (`ShmRingWriter.lost`) and publishes it again when
    not; a ring that cannot be published (the name taken by a directory or another user's
    file) is retried once a second instead of disabling the output for the run. Each
    problem is logged once, kept in ``problem`` and passed to ``on_problem`` (the engine
    shows it as its last error on ``/dd/status``).
    """

    check_s = 1.0

    def __init__(
        self,
        name: str = "dreamdeck",
        *,
        slots: int = 3,
        on_problem: Callable[[str], None] | None = None,
    ):
        self.name = f"shm:{_valid_name(name)}"
        self._ring_name = name
        self._slots = slots
        self.writer: ShmRingWriter | None = None
        self.on_problem = on_problem
        self.problem: str | None = None  # what is wrong now; None while publishing
        self.recreated = 0  # times the ring was published again after losing its name
        self._next_check = 0.0
        self._next_retry = 0.0

    @property
    def published(self) -> bool:
        return self.writer is not None and self.writer._seg is not None

    def open(self, width: int, height: int) -> None:
        try:
            if self.writer is None:
                self.writer = ShmRingWriter(self._ring_name, width, height, slots=self._slots)
            elif (width, height) != (self.writer.width, self.writer.height) or not self.published:
                self.writer.resize(width, height)
        except (OSError, RingError) as e:
            self._report(f"{self.name}: cannot publish the ring: {e}; retrying every second")
            return
        self._next_check = time.monotonic() + self.check_s
        if self.problem is not None and self.published:
            _log().warning("%s: publishing again", self.name)
            self.problem = None

    def send(self, rgba: np.ndarray, meta) -> None:
        now = time.monotonic()
        h, w = rgba.shape[:2]
        if not self.published:
            if now < self._next_retry:
                return  # dropped: nothing to publish into yet
            self._next_retry = now + self.check_s
            self.open(w, h)
            if not self.published:
                return
        elif now >= self._next_check:
            self._next_check = now + self.check_s
            why = self.writer.lost()
            if why is not None:
                self._report(f"{self.name}: the ring was {why}; published it again")
                self.recreated += 1
                self._republish(w, h)
                if not self.published:
                    return
        self.writer.write(rgba, block=meta.block, index=meta.index, timestamp=meta.timestamp)

    def _republish(self, width: int, height: int) -> None:
        try:
            self.writer.resize(width, height)
        except (OSError, RingError) as e:
            self._report(f"{self.name}: cannot publish the ring: {e}; retrying every second")
            self._next_retry = time.monotonic() + self.check_s

    def _report(self, message: str) -> None:
        if message != self.problem:
            _log().error("%s", message)
        self.problem = message
        if self.on_problem is not None:
            try:
                self.on_problem(message)
            except Exception:  # noqa: BLE001 - reporting must not stop the output
                _log().exception("on_problem failed")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _log():
    import logging

    return logging.getLogger("engine.runtime.shm_ring")
