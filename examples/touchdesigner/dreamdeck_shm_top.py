"""dreamdeck frames in TouchDesigner: Script TOP callbacks reading the shared-memory ring.

Paste this file into the callbacks DAT of a Script TOP (or point the DAT at this file).
It needs only numpy and the standard library, both in TouchDesigner's Python. The ring
format is specified in dreamdeck's docs/shared-memory.md; this is an independent,
self-contained reader of it.

Needs a TouchDesigner build with Python 3.9 or newer (the file is checked for 3.9 syntax
by dreamdeck's tests). Problems show on the operator: a warning while the ring does not
exist yet, an error for a ring of another format version.

The reading core (``RingReader``) is plain Python, usable and tested outside TD:

    reader = RingReader("dreamdeck")
    got = reader.read(flip=True)   # None, or (info dict, [H, W, 4] uint8 array)

TouchDesigner's image origin is bottom-left, so the TOP gets rows bottom-up (flip=True).
The reader never blocks the engine: it copies the newest complete slot and checks the
slot's seqlock counters; a frame overwritten during the copy is discarded.
"""

import os
import struct
import sys
import time

import numpy as np

MAGIC = b"DDRG"
VERSION = 1
HEADER_SIZE = 128
SLOT_HEADER_SIZE = 64
FLAG_SUPERSEDED = 1
FLAG_CLOSED = 2
_HEADER = struct.Struct("<4sHHIIIIIIQIIQI4sQd")  # docs/shared-memory.md, "Header"
_SLOT = struct.Struct("<QQdqQII")  # docs/shared-memory.md, "Slot header"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Mapping:
    """A read-write mapping of an existing named segment, never registered with Python's
    resource tracker (which would unlink the engine's segment when TD exits)."""

    def __init__(self, name):
        if os.name == "nt":
            from multiprocessing import shared_memory

            self._shm = shared_memory.SharedMemory(name)
            self.buf = self._shm.buf
        elif sys.version_info >= (3, 13):
            from multiprocessing import shared_memory

            self._shm = shared_memory.SharedMemory(name, track=False)
            self.buf = self._shm.buf
        else:
            import _posixshmem
            import mmap

            self._shm = None
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
            try:
                self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self.buf = memoryview(self._mmap)

    def close(self):
        if self.buf is None:
            return
        if self._shm is not None:
            self.buf = None
            self._shm.close()
        else:
            self.buf.release()
            self.buf = None
            self._mmap.close()


def _header(buf):
    f = _HEADER.unpack_from(buf, 0)
    if f[0] != MAGIC:
        return None  # not (yet) a ring
    keys = (
        "magic version header_size width height channels slot_count slot_header_size "
        "row_bytes slot_stride generation flags write_seq writer_pid pixel_format "
        "segment_id created"
    ).split()
    h = dict(zip(keys, f))  # noqa: B905 - no strict= in Python 3.9 (older TD builds)
    if h["version"] != VERSION or h["pixel_format"] != b"RGBA":
        v, fmt = h["version"], h["pixel_format"]
        raise RuntimeError(f"dreamdeck ring: unsupported version {v} or format {fmt!r}")
    return h


class RingReader:
    """Newest-frame reader of the ring ``name``; reattaches on resolution changes and
    writer restarts by itself."""

    def __init__(self, name="dreamdeck"):
        self.name = name
        self.map = None
        self.hdr = None
        self.last_seq = 0
        self._last_new = time.monotonic()
        self._last_check = 0.0
        self.frame = None  # the last frame read (what a Script TOP shows until a new one)

    def __reduce__(self):
        # TouchDesigner pickles operator storage with the .toe: save the ring name only
        # (as a plain string: the class lives in a DAT, not an importable module), no
        # mapping and no frame; the next cook makes a new reader
        return (str, (self.name,))

    def _attach(self):
        self.close()
        try:
            m = _Mapping(self.name)
        except (FileNotFoundError, OSError, ValueError):
            return False
        try:
            h = _header(m.buf)
        except RuntimeError:
            m.close()  # another version: say so (the caller shows it), keep nothing open
            raise
        if h is None:
            m.close()
            return False
        self.map, self.hdr, self.last_seq = m, h, 0
        self._last_new = time.monotonic()
        return True

    def close(self):
        if self.map is not None:
            self.map.close()
        self.map = self.hdr = None

    def _moved(self):
        try:
            m = _Mapping(self.name)
        except (FileNotFoundError, OSError, ValueError):
            return False
        try:
            h = _header(m.buf)
            return h is not None and h["segment_id"] != self.hdr["segment_id"]
        finally:
            m.close()

    def read(self, out=None, flip=True):
        """(info, pixels) of the newest complete frame newer than the last one returned,
        else None. ``out`` is reused when its shape fits."""
        if self.map is None and not self._attach():
            return None
        buf = self.map.buf
        if _U32.unpack_from(buf, 44)[0] & (FLAG_SUPERSEDED | FLAG_CLOSED):
            if not self._attach():  # drops the old mapping first: Windows needs that
                return None
            buf = self.map.buf
        h = self.hdr
        now = time.monotonic()
        if _U64.unpack_from(buf, 48)[0] == self.last_seq:
            if now - self._last_new > 1.0 and now - self._last_check > 0.5:
                self._last_check = now
                if self._moved():
                    self._attach()
            return None
        width, height, stride = h["width"], h["height"], h["slot_stride"]
        slots = []
        for i in range(h["slot_count"]):
            base = HEADER_SIZE + i * stride
            slots.append((_U64.unpack_from(buf, base + 8)[0], base))
        slots.sort(reverse=True)
        if out is None or out.shape != (height, width, 4):
            out = np.empty((height, width, 4), np.uint8)
        for seq_end, base in slots:
            if seq_end == 0 or seq_end <= self.last_seq:
                break
            _, _, ts, block, index, w, hh = _SLOT.unpack_from(buf, base)
            if (w, hh) != (width, height):
                continue
            src = np.frombuffer(buf, np.uint8, w * hh * 4, base + SLOT_HEADER_SIZE)
            src = src.reshape(hh, w, 4)
            np.copyto(out, src[::-1] if flip else src)
            del src
            if _U64.unpack_from(buf, base)[0] == seq_end:  # seq_begin unchanged: intact
                self.last_seq = seq_end
                self._last_new = now
                info = {
                    "sequence": seq_end,
                    "block": block,
                    "index": index,
                    "timestamp": ts,
                    "width": w,
                    "height": hh,
                    "generation": h["generation"],
                }
                return info, out
        return None


# ---- TouchDesigner Script TOP callbacks ------------------------------------------------
# State lives on each operator (``scriptOp.storage``), never in module globals: two Script
# TOPs sharing this callbacks DAT each keep their own reader and last frame. The reader
# pickles as its ring name only, so saving the .toe stores no frames and no mappings.

_KEY = "dreamdeck"


def _reader(scriptOp, name):
    """This operator's reader of ring `name` (in its storage; a new one after a reload of
    the .toe, a rename of the ring, or an edit of this DAT)."""
    reader = scriptOp.storage.get(_KEY)
    if isinstance(reader, str) or not hasattr(reader, "read"):
        reader = None  # what a saved .toe brings back: the old ring name
    if reader is not None and reader.name != name:
        reader.close()
        reader = None
    if reader is None:
        reader = scriptOp.storage[_KEY] = RingReader(name)
    return reader


def onSetupParameters(scriptOp):
    page = scriptOp.appendCustomPage("Dreamdeck")
    p = page.appendStr("Ringname", label="Ring Name")
    p[0].default = "dreamdeck"
    p[0].val = "dreamdeck"
    page.appendToggle("Active", label="Active")[0].val = True
    page.appendPulse("Reconnect", label="Reconnect")
    if "CookLevel" not in globals():
        # Builds without the cook-level callback: a parameter that changes every frame
        # makes the TOP cook every frame.
        p = page.appendFloat("Tick", label="Tick (cooks each frame)")
        p[0].expr = "absTime.frame"
        p[0].readOnly = True


def onGetCookLevel(scriptOp):
    """Cook every frame: new frames arrive from outside TouchDesigner, which no input or
    parameter change would signal. (Called by builds that have Script OP cook levels.)"""
    return CookLevel.ALWAYS  # noqa: F821 - TouchDesigner's global


def onPulse(par):
    if par.name == "Reconnect":
        reader = par.owner.storage.get(_KEY)
        if hasattr(reader, "close"):
            reader.close()  # reattaches at the next read, keeping the last frame


def onCook(scriptOp):
    name = scriptOp.par.Ringname.eval() or "dreamdeck"
    reader = _reader(scriptOp, name)
    if scriptOp.par.Active.eval():
        try:
            # Read into a fresh array: TD copies it, and the previous one stays valid to
            # show again while no new frame has arrived.
            got = reader.read(flip=True)
        except RuntimeError as e:  # a ring of another version or pixel format
            scriptOp.addError(f"{e}: use the dreamdeck_shm_top.py of the engine's version")
            got = None
        else:
            if reader.map is None:
                scriptOp.addWarning(
                    f"dreamdeck: no ring {name!r} yet (start `dreamdeck run --shm {name}`)"
                )
        if got is not None:
            reader.frame = got[1]
            scriptOp.store("dreamdeck_info", got[0])
    if reader.frame is not None:
        scriptOp.copyNumpyArray(reader.frame)
