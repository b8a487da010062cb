"""The TouchDesigner kit's Python outside TouchDesigner: the Script TOP callbacks and the
Execute DAT writer, loaded from examples/touchdesigner/ as TD loads them, on real
shared-memory rings (the engine's own writer and reader on the other side).

Faked, because TouchDesigner cannot run here: the operators TD passes to the callbacks
(a Script TOP and an Execute DAT with `par`, `storage`, `store`, `copyNumpyArray`,
`addWarning`, `addError`, custom pages), a TOP with `numpyArray`, and TD's globals `me`
and `CookLevel`. Everything else is the kit's real code.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pickle
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.shm_ring import ShmRingReader, ShmRingWriter

KIT = Path(__file__).resolve().parents[1] / "examples" / "touchdesigner"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"td_{name}_{uuid.uuid4().hex[:6]}", KIT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rings():
    names: list[str] = []

    def make() -> str:
        names.append("ddk" + uuid.uuid4().hex[:8])
        return names[-1]

    yield make
    if os.name != "nt":
        import _posixshmem

        for n in names:
            try:
                _posixshmem.shm_unlink("/" + n)
            except FileNotFoundError:
                pass


# -- fakes of what TouchDesigner hands the callbacks ------------------------------------
class Par:
    def __init__(self, name: str, val=None, resolve=None):
        self.name, self.val, self.expr, self.readOnly, self.default = name, val, "", False, None
        self._resolve = resolve
        self.owner = None

    def eval(self):
        return self._resolve(self.val) if self._resolve else self.val

    def __getitem__(self, i):  # appendX(...) returns a tuple of Pars
        return self


class Pars:
    pass


class Page:
    def __init__(self, owner):
        self.owner = owner

    def _add(self, name, resolve=None):
        p = Par(name, resolve=resolve)
        p.owner = self.owner
        setattr(self.owner.par, name, p)
        return p

    appendStr = appendToggle = appendPulse = appendFloat = lambda self, name, label="": self._add(
        name
    )

    def appendTOP(self, name, label=""):
        return self._add(name, resolve=lambda v: TOPS.get(v))


TOPS: dict[str, object] = {}


class Operator:
    """A Script TOP or an Execute DAT as far as the kit uses them."""

    def __init__(self, **pars):
        self.par = Pars()
        for k, v in pars.items():
            p = Par(k, v)
            p.owner = self
            setattr(self.par, k, p)
        self.storage: dict = {}
        self.stored: dict = {}
        self.shown: list[np.ndarray] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def appendCustomPage(self, name):
        return Page(self)

    def store(self, key, value):
        self.stored[key] = value

    def copyNumpyArray(self, a):
        self.shown.append(np.array(a))

    def addWarning(self, msg):
        self.warnings.append(msg)

    def addError(self, msg):
        self.errors.append(msg)


class FloatTOP:
    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels  # float32 [H, W, 4], bottom row first, like TOP.numpyArray

    def numpyArray(self, delayed=False):
        return self.pixels


def pattern(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


# -- both files ------------------------------------------------------------------------
def test_kit_files_parse_as_python_3_9():
    """The minimum TouchDesigner build the README states is one with Python 3.9."""
    for f in ("dreamdeck_shm_top.py", "dreamdeck_shm_writer.py"):
        ast.parse((KIT / f).read_text(encoding="utf-8"), feature_version=(3, 9))


# -- the Script TOP ---------------------------------------------------------------------
def test_two_script_tops_sharing_the_callbacks_keep_their_own_state(rings):
    top = load("dreamdeck_shm_top.py")
    a_name, b_name = rings(), rings()
    a, b = Operator(Ringname=a_name, Active=True), Operator(Ringname=b_name, Active=True)
    with ShmRingWriter(a_name, 16, 8) as wa, ShmRingWriter(b_name, 12, 6) as wb:
        wa.write(pattern(1, 8, 16))
        wb.write(pattern(2, 6, 12))
        top.onCook(a)
        top.onCook(b)
        np.testing.assert_array_equal(a.shown[-1], pattern(1, 8, 16)[::-1])  # TD rows: bottom up
        np.testing.assert_array_equal(b.shown[-1], pattern(2, 6, 12)[::-1])
        assert a.stored["dreamdeck_info"]["width"] == 16 and not (a.warnings or a.errors)
        wb.write(pattern(3, 6, 12))
        top.onCook(b)
        top.onCook(a)  # nothing new for a: it shows its own last frame, not b's
        np.testing.assert_array_equal(a.shown[-1], pattern(1, 8, 16)[::-1])
        np.testing.assert_array_equal(b.shown[-1], pattern(3, 6, 12)[::-1])
    # saving the .toe pickles storage: the reader goes as its ring name, no frames
    blob = pickle.dumps(a.storage)
    assert len(blob) < 16 * 8 * 4
    assert pickle.loads(blob) == {"dreamdeck": a_name}
    b.storage = pickle.loads(pickle.dumps(b.storage))  # a reloaded .toe: a new reader
    top.onCook(b)
    assert b.storage["dreamdeck"].name == b_name and not b.errors


def test_a_missing_ring_is_a_warning_and_another_version_an_error(rings):
    top = load("dreamdeck_shm_top.py")
    name = rings()
    op = Operator(Ringname=name, Active=True)
    top.onCook(op)
    assert (
        len(op.warnings) == 1 and name in op.warnings[0] and "dreamdeck run --shm" in op.warnings[0]
    )
    assert op.shown == [] and op.errors == []
    with ShmRingWriter(name, 8, 4) as w:
        w.write(pattern(4, 4, 8))
        # a ring of a future format: version field (u16 at byte 4) bumped
        seg = ShmRingReader(name)
        assert seg.read() is not None
        buf = seg._seg.buf
        struct.pack_into("<H", buf, 4, 99)
        op2 = Operator(Ringname=name, Active=True)
        top.onCook(op2)
        assert op2.errors and "unsupported version 99" in op2.errors[0], op2.errors
        assert op2.shown == []
        struct.pack_into("<H", buf, 4, 1)
        seg.close()
        top.onCook(op2)  # the next cook reads it again, no error now
        assert len(op2.errors) == 1 and len(op2.shown) == 1


def test_cook_level_callback_and_the_tick_fallback():
    top = load("dreamdeck_shm_top.py")
    op = Operator()
    top.onSetupParameters(op)  # no CookLevel in this build: a Tick parameter cooks it
    assert op.par.Tick.expr == "absTime.frame" and op.par.Ringname.val == "dreamdeck"

    class CookLevel:
        ALWAYS = "always"

    top.CookLevel = CookLevel  # a build with cook levels (TD puts it in the globals)
    op2 = Operator()
    top.onSetupParameters(op2)
    assert not hasattr(op2.par, "Tick")
    assert top.onGetCookLevel(op2) == "always"


# -- the Execute DAT writer -------------------------------------------------------------
def reference_uint8(a: np.ndarray) -> np.ndarray:
    """The writer's former conversion (clip, scale, add 0.5, cast: four new float arrays
    and an extra copy), kept here as the oracle the faster one must match exactly."""
    return np.ascontiguousarray((np.clip(a[::-1], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def test_float_pixels_are_rounded_flipped_and_clamped_like_the_plain_formula():
    w = load("dreamdeck_shm_writer.py")
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.2, 1.2, (9, 7, 4)).astype(np.float32)
    a[0, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]  # rounding edges
    conv = w.FloatToRing()
    out = np.zeros((9, 7, 4), np.uint8)
    conv.convert(a, out)
    np.testing.assert_array_equal(out, reference_uint8(a))
    buf = conv._f
    conv.convert(a * 0.5, out)
    assert conv._f is buf  # one buffer, reused frame after frame
    np.testing.assert_array_equal(w.top_to_rgba(FloatTOP(a * 0.5)), out)


def test_execute_dat_writes_its_top_into_the_ring_named_by_its_parameters(rings):
    w = load("dreamdeck_shm_writer.py")
    names = [rings(), rings()]
    rng = np.random.default_rng(1)
    frames = [rng.uniform(0, 1, (6, 10, 4)).astype(np.float32) for _ in range(2)]
    dats = []
    for i, name in enumerate(names):
        TOPS[f"src{i}"] = FloatTOP(frames[i])
        dat = Operator()
        w.setup_parameters(dat)
        dat.par.Sourcetop.val, dat.par.Ringname.val = f"src{i}", name
        dats.append(dat)
    try:
        for dat in dats:  # two writers sharing the file, one ring each
            w.me = dat
            w.onFrameEnd(1)
        for i, name in enumerate(names):
            with ShmRingReader(name) as r:
                info, px = r.read()
                assert (info.width, info.height) == (10, 6)
                np.testing.assert_array_equal(px, w.top_to_rgba(FloatTOP(frames[i])))
        # the settings come from the parameters: inactive closes the ring
        dats[0].par.Active.val = False
        w.me = dats[0]
        w.onFrameEnd(2)
        with ShmRingReader(names[0]) as r:
            assert r.read() is None
        saved = pickle.loads(pickle.dumps(dats[1].storage))  # saving the .toe: no mapping
        assert saved["dreamdeck_writer"]["writer"] == names[1]
    finally:
        for dat in dats:
            w.me = dat
            w.onExit()
        TOPS.clear()
