"""TouchDesigner frames *into* dreamdeck: write a TOP into a shared-memory ring that the
engine reads as a VACE control video (`/dd/vace/source shm:td_in`).

Use in TouchDesigner: put this file in an Execute DAT and turn on "Frame End". On its
first frame the DAT gets a *Dreamdeck* page of custom parameters: **Source TOP** (the TOP
to send, default ``null_to_dreamdeck`` next to the DAT), **Ring Name** (``td_in``: the
engine reads it as ``shm:td_in``), **Active** and **Clamp**. Settings live on the DAT and
its state in the DAT's ``storage``, so several writers (one per ring) can share this file.
The writer never waits for the engine. The TOP's alpha channel can serve as the VACE
mask (engine option ``mask=alpha``).

Cost on TouchDesigner's main thread: TOP.numpyArray gives float32 pixels; they are scaled
and rounded in one reused float buffer (the flip to top-row-first folded into the first
pass, no new arrays per frame) and cast straight into the ring's slot: two float passes
(three with Clamp, which keeps out-of-range values of float TOPs from wrapping) and one
write into shared memory, instead of four float passes, four new full-frame arrays and
an extra copy. Feed it an 8-bit TOP at the engine's resolution to keep it cheap.

It needs only numpy and the standard library (both in TD's Python). The byte layout is
the one of dreamdeck's output ring (docs/shared-memory.md; reference code
engine/runtime/shm_ring.py): this file is a small independent writer of that layout, so
the engine's reader (ShmRingReader) reads it as it reads its own rings.

Outside TD (tests, other hosts):

    w = RingWriter("td_in")
    w.write(rgba)                    # [H, W, 4] uint8, top row first
    w.close()

or ``python dreamdeck_shm_writer.py --name td_in --width 64 --height 32 --fps 30``, which
writes a test pattern (frame counter in the red channel of pixel (0, 0)).
"""

import mmap
import os
import secrets
import struct
import sys
import time

import numpy as np

RING_NAME = "td_in"  # the engine reads it as `shm:td_in`
SOURCE_TOP = "null_to_dreamdeck"  # the TOP to send (path relative to this DAT)

MAGIC = b"DDRG"
VERSION = 1
HEADER_SIZE = 128
SLOT_HEADER_SIZE = 64
FLAG_SUPERSEDED = 1
FLAG_CLOSED = 2
_HEADER = struct.Struct("<HHIIIIIIQIIQI4sQd")  # after the magic, at offset 4
_SLOT_META = struct.Struct("<dqQII")  # timestamp, block, index, width, height at offset 16
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OFF_FLAGS, _OFF_GENERATION, _OFF_WRITE_SEQ = 44, 40, 48


class _Segment:
    """A named shared-memory mapping never registered with Python's resource tracker
    (inside TD that tracker would spawn TD itself, and unlink segments at exit)."""

    def __init__(self, name, create=False, size=0):
        self.name = name
        if os.name == "nt" or sys.version_info >= (3, 13):
            from multiprocessing import shared_memory

            kw = {} if os.name == "nt" else {"track": False}
            self._shm = shared_memory.SharedMemory(name, create=create, size=size, **kw)
            self.buf = self._shm.buf
        else:
            import _posixshmem

            self._shm = None
            flags = os.O_RDWR | ((os.O_CREAT | os.O_EXCL) if create else 0)
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
            try:
                if create:
                    os.ftruncate(fd, size)
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

    def unlink(self):
        if os.name == "nt":
            return  # Windows frees a mapping with its last handle
        if self._shm is not None:
            self._shm.unlink()
            return
        import _posixshmem

        try:
            _posixshmem.shm_unlink("/" + self.name)
        except FileNotFoundError:
            pass


class RingWriter:
    """Writes [H, W, 4] uint8 frames (top row first) into the ring ``name``."""

    def __init__(self, name=RING_NAME, slots=3):
        if not name or "/" in name or "\\" in name or len(name) > 30:
            raise ValueError(f"bad ring name {name!r}: 1-30 characters, no slashes")
        self.name, self.slots = name, slots
        self.seg = None
        self.size = (0, 0)
        self.sequence = 0
        self.generation = 0
        self._pixels = []

    def _publish(self, width, height):
        self._retire(FLAG_SUPERSEDED)
        row = width * 4
        stride = (SLOT_HEADER_SIZE + row * height + 63) // 64 * 64
        size = HEADER_SIZE + self.slots * stride
        try:
            seg = _Segment(self.name, create=True, size=size)
        except FileExistsError:
            if os.name == "nt":
                return False  # a reader still holds the old one; retry next frame
            # Left by an earlier writer (e.g. TD crashed): tell its readers to move on.
            try:
                old = _Segment(self.name)
                if bytes(old.buf[0:4]) == MAGIC:
                    self.generation = max(
                        self.generation, _U32.unpack_from(old.buf, _OFF_GENERATION)[0]
                    )
                    flags = _U32.unpack_from(old.buf, _OFF_FLAGS)[0]
                    _U32.pack_into(old.buf, _OFF_FLAGS, flags | FLAG_SUPERSEDED)
                old.unlink()
                old.close()
            except (FileNotFoundError, ValueError, OSError):
                pass
            seg = _Segment(self.name, create=True, size=size)
        self.generation += 1
        _HEADER.pack_into(
            seg.buf, 4, VERSION, HEADER_SIZE, width, height, 4, self.slots, SLOT_HEADER_SIZE,
            row, stride, self.generation, 0, self.sequence, os.getpid() & 0xFFFFFFFF, b"RGBA",
            secrets.randbits(64), time.time(),
        )  # fmt: skip
        seg.buf[0:4] = MAGIC  # last: a reader that sees the magic sees a whole header
        self.seg, self.size, self.stride = seg, (width, height), stride
        self._pixels = [
            np.frombuffer(seg.buf, np.uint8, row * height, HEADER_SIZE + i * stride + SLOT_HEADER_SIZE)
            .reshape(height, width, 4)
            for i in range(self.slots)
        ]  # fmt: skip
        return True

    def _retire(self, flag):
        seg, self.seg = self.seg, None
        self._pixels = []
        if seg is None:
            return
        flags = _U32.unpack_from(seg.buf, _OFF_FLAGS)[0]
        _U32.pack_into(seg.buf, _OFF_FLAGS, flags | flag)
        seg.unlink()
        seg.close()

    def __reduce__(self):
        # TouchDesigner pickles operator storage with the .toe: save the ring name only
        # (a plain string: this class lives in a DAT), never the mapping
        return (str, (self.name,))

    def write(self, rgba, timestamp=None, index=None):
        """Copy one frame in; returns its sequence number (0: dropped, ring being replaced)."""
        if (
            not isinstance(rgba, np.ndarray)
            or rgba.dtype != np.uint8
            or rgba.ndim != 3
            or rgba.shape[2] != 4
        ):
            raise ValueError("frame must be a uint8 [H, W, 4] array")
        h, w = rgba.shape[:2]
        return self.write_with(w, h, lambda px: np.copyto(px, rgba), timestamp, index)

    def write_with(self, w, h, fill, timestamp=None, index=None):
        """Like `write`, but `fill(pixels)` writes the frame straight into the slot's
        uint8 [h, w, 4] view (no frame of its own in between)."""
        if w < 1 or h < 1:
            raise ValueError(f"frame size {w}x{h}: both must be at least 1")
        if self.seg is None or (w, h) != self.size:
            if not self._publish(w, h):
                return 0
        seq = self.sequence + 1
        slot = seq % self.slots
        base = HEADER_SIZE + slot * self.stride
        buf = self.seg.buf
        _U64.pack_into(buf, base, seq)  # seq_begin: being written
        ts = time.time() if timestamp is None else float(timestamp)
        _SLOT_META.pack_into(buf, base + 16, ts, -1, seq if index is None else int(index), w, h)
        fill(self._pixels[slot])
        _U64.pack_into(buf, base + 8, seq)  # seq_end: complete
        _U64.pack_into(buf, _OFF_WRITE_SEQ, seq)
        self.sequence = seq
        return seq

    def close(self):
        self._retire(FLAG_CLOSED)


class FloatToRing:
    """Float [0, 1] RGBA pixels (bottom row first, as TOP.numpyArray gives them) into a
    ring slot as uint8, top row first, rounded: round(255 * x), reusing one buffer."""

    def __init__(self):
        self._f = None

    def __reduce__(self):
        return (str, ("",))  # the buffer is remade on the next frame, not saved

    def convert(self, a, out, clamp=True):
        """Write `a` (float32 [H, W, 4], bottom row first) into `out` (uint8 [H, W, 4])."""
        if self._f is None or self._f.shape != a.shape:
            self._f = np.empty(a.shape, np.float32)
        f = self._f
        np.multiply(a[::-1], 255.0, out=f)  # pass 1: scale (and flip, as it reads)
        if clamp:
            np.clip(f, 0.0, 255.0, out=f)  # only for float TOPs whose values leave 0..1
        np.add(f, 0.5, out=f)  # pass 2: round half up (the cast below truncates)
        np.copyto(out, f, casting="unsafe")  # into the ring: the one write it needs anyway
        return out


def top_to_rgba(top, clamp=True):
    """A TOP's pixels as a new uint8 [H, W, 4] array, top row first (tests, other uses)."""
    a = top.numpyArray(delayed=True)  # float32 [H, W, 4] in 0..1, bottom row first
    if a is None:
        return None
    return FloatToRing().convert(a, np.empty(a.shape, np.uint8), clamp)


def write_top(writer, top, converter, clamp=True):
    """One frame of `top` into `writer`'s ring without an intermediate uint8 frame.
    Returns the sequence number (0: nothing written)."""
    a = top.numpyArray(delayed=True)
    if a is None:
        return 0
    return writer.write_with(a.shape[1], a.shape[0], lambda px: converter.convert(a, px, clamp))


# ---- TouchDesigner Execute DAT callbacks ----------------------------------------------
_KEY = "dreamdeck_writer"


def setup_parameters(dat):
    """The Dreamdeck page on this DAT (made once; the values are the user's after that)."""
    if hasattr(dat.par, "Ringname"):
        return
    page = dat.appendCustomPage("Dreamdeck")
    page.appendTOP("Sourcetop", label="Source TOP")[0].val = SOURCE_TOP
    page.appendStr("Ringname", label="Ring Name")[0].val = RING_NAME
    page.appendToggle("Active", label="Active")[0].val = True
    page.appendToggle("Clamp", label="Clamp 0..1")[0].val = True


def onFrameEnd(frame):
    dat = me  # noqa: F821 - `me` is TouchDesigner's global: this Execute DAT
    setup_parameters(dat)
    st = dat.storage.get(_KEY)
    if not isinstance(st, dict):
        st = dat.storage[_KEY] = {}
    if not hasattr(st.get("writer"), "write_with"):  # new, or strings from a saved .toe
        st["writer"] = None
    if not hasattr(st.get("converter"), "convert"):
        st["converter"] = FloatToRing()
    name = dat.par.Ringname.eval() or RING_NAME
    w = st["writer"]
    if w is not None and (w.name != name or not dat.par.Active.eval()):
        w.close()
        w = st["writer"] = None
    if not dat.par.Active.eval():
        return
    top = dat.par.Sourcetop.eval()
    if top is None:
        return
    if w is None:
        w = st["writer"] = RingWriter(name)
    write_top(w, top, st["converter"], bool(dat.par.Clamp.eval()))


def onExit():
    st = me.storage.get(_KEY)  # noqa: F821
    if isinstance(st, dict) and hasattr(st.get("writer"), "close"):
        st["writer"].close()
        st["writer"] = None


# ---- stand-alone test pattern ---------------------------------------------------------
def _main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="write a test pattern into a dreamdeck ring")
    ap.add_argument("--name", default=RING_NAME)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--frames", type=int, default=0, help="stop after N frames (0: run on)")
    args = ap.parse_args(argv)
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill` closes the ring cleanly too
    w = RingWriter(args.name)
    img = np.zeros((args.height, args.width, 4), np.uint8)
    img[..., 3] = 255
    t0, i = time.time(), 0
    try:
        while not args.frames or i < args.frames:
            img[..., 0] = i % 256
            img[..., 1] = (i // 256) % 256
            w.write(img)
            i += 1
            time.sleep(max(0.0, t0 + i / args.fps - time.time()))
    except KeyboardInterrupt:
        pass
    finally:
        w.close()


if __name__ == "__main__":
    _main()
