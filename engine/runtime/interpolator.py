"""Where the interpolation network runs: uint8 RGBA frames in, the frame at time t out.

The frame path's publisher thread computes the output frames that fall between two
generated frames with :meth:`Interpolator.batch` (all of a pair's times in one call,
ahead of their ticks) and hands each out with :meth:`Interpolator.frame`. On CUDA the
work goes on a side stream of its own (the generation thread's stream never waits for
it, nor it for generation's; the GPU overlaps the two), and the result comes back
through a few pinned host buffers that the publisher waits for, the publisher and
never the generation thread. On the CPU it runs inline.

``t`` = 0 and ``t`` = 1 return the endpoint frames themselves (no network): the pacer
asks for them whenever a presentation time lands exactly on a generated frame.
Alpha is blended linearly (the network interpolates RGB only).

``downscale`` d > 1 estimates the flow on frames d times smaller and synthesises at full
size (flows scaled up by d): the cost of the network drops by about d squared while the
frame keeps its resolution. The tiny CPU model uses it; on a GPU at 832x480 it is 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.rife import synthesize

log = logging.getLogger(__name__)

__all__ = ["Interpolator", "InterpolationUnavailable", "build_interpolator"]


class InterpolationUnavailable(RuntimeError):
    """Interpolation was asked for but there is no network (weights missing)."""


COMPILE_MODES = ("off", "default", "cudagraphs")
MAX_BATCH = 8  # times per network call; more are split (60 fps from 9 fps is 7 a pair)


class _Prep(NamedTuple):
    """What one input frame costs whatever the time asked for: computed once per frame
    (every generated frame is in two pairs, and in a batch of times)."""

    x: torch.Tensor  # [1, 3, H, W] in [0, 1], the synthesis input
    alpha: torch.Tensor  # [H, W, 1] float32
    p: torch.Tensor  # [1, 3, hh, ww] the flow input: padded (and downscaled)
    f: torch.Tensor  # encode(p): the network's per-frame features


class Interpolator:
    """``Interpolator(net, device)``; ``frame(a, b, t)`` -> [H, W, 4] uint8 numpy view;
    ``batch(a, b, ts)`` -> [N, H, W, 4] for several times between the same two frames
    in one network call. ``a`` and ``b`` are [H, W, 4] uint8 torch tensors (on the
    net's device or the CPU) or numpy arrays; device tensors must be complete (their
    producing work finished or synchronised): the network runs on a side stream that
    does not wait for the caller's.

    Results are views of a few reusable host buffers and stay valid until
    ``keep`` (default 4) later calls. ``key`` names the pair: a 2-tuple ``(key_a,
    key_b)`` names each frame (a frame keeps its float copy and encoder features while
    it is among the last few seen), any other hashable names the pair as a whole.
    With a key, results are remembered: :meth:`ready` / :meth:`frame` return a frame
    computed ahead by :meth:`batch` without a network call.

    Speed (issue 16): times are a batch dimension (one call per pair, not per output
    frame), the per-frame encoder runs once per frame, the network runs channels-last on
    CUDA, and ``compile`` = "default" (Inductor) or "cudagraphs" (Inductor + CUDA
    graphs) compiles the network for the frame size (:meth:`warmup` at start).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype | None = None,
        scale: float = 1.0,
        downscale: int = 1,
        name: str = "rife",
        compile: str = "off",
        channels_last: bool | None = None,
        keep: int = 4,
    ):
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.channels_last = bool(channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = net.to(device=self.device, dtype=dtype, memory_format=fmt)
        self.net = self.net.eval().requires_grad_(False)
        if not scale > 0:
            raise ValueError(f"interpolation flow scale must be > 0, got {scale}")
        self.scale = float(scale)
        if not (isinstance(downscale, int) and downscale >= 1):
            raise ValueError(f"interpolation downscale must be an integer >= 1, got {downscale}")
        self.downscale = downscale
        if compile not in COMPILE_MODES:
            raise ValueError(
                f"interpolation compile must be one of {COMPILE_MODES}, got {compile!r}"
            )
        if keep < 2:
            raise ValueError(f"keep must be >= 2, got {keep}")
        self.compile = compile
        self.name = name
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._done = torch.cuda.Event(blocking=True) if self.stream is not None else None
        self._keep = keep
        self._hosts: list[torch.Tensor | None] = [None] * keep  # output buffers, rotating
        self._next_host = 0
        self._tpin: torch.Tensor | None = None  # pinned staging of the times (CUDA)
        self._single: set[int] = set()  # threads already limited to one CPU thread
        self._preps: OrderedDict[Any, _Prep] = OrderedDict()  # per-frame work, last few
        self._results: dict[tuple[Any, float], tuple[int, np.ndarray]] = {}  # (pair, t) -> frame
        self._flow_fn: Any = self._flow_eager
        self._encode_fn: Any = self.net.encode
        if compile != "off":
            mode = "reduce-overhead" if compile == "cudagraphs" else None
            self._flow_fn = torch.compile(self._flow_eager, mode=mode, fullgraph=True)
            self._encode_fn = torch.compile(self.net.encode, mode=mode, fullgraph=True)
        self.frames_out = 0  # frames computed by the network
        self.calls = 0  # network calls (one per batch)
        self.frames = 0  # frames handed out by frame() (computed or computed ahead)
        self.ms: float | None = None  # EMA of wall ms per computed frame (amortised)
        self.last_ms: float | None = None
        self.call_ms: float | None = None  # EMA of wall ms per network call
        self.prep_ms: float | None = None  # EMA of per-frame work (upload, encoder)

    # -- results computed ahead ------------------------------------------------------------
    @staticmethod
    def _pair_keys(key: Any) -> tuple[Any, Any] | None:
        if key is None:
            return None
        if isinstance(key, tuple) and len(key) == 2:
            return key[0], key[1]
        return ("pair", key, 0), ("pair", key, 1)

    def ready(self, key: Any, t: float) -> np.ndarray | None:
        """The frame of pair ``key`` at time ``t`` if a call computed it already."""
        if key is None:
            return None
        hit = self._results.get((key, float(t)))
        return None if hit is None else hit[1]

    def has(self, key: Any, t: float) -> bool:
        return key is not None and (key, float(t)) in self._results

    def forget(self) -> None:
        """Drop every remembered frame and result (a stream reset, a new size)."""
        self._preps.clear()
        self._results.clear()

    # -- one frame -------------------------------------------------------------------------
    @torch.inference_mode()
    def frame(self, a: Any, b: Any, t: float, key: Any = None) -> np.ndarray:
        """The frame at time ``t`` between ``a`` and ``b``: 0 and 1 are the endpoints
        themselves (no network), a result computed ahead under ``key`` is returned as
        it is, anything else is one network call."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"interpolation time must be in [0, 1], got {t}")
        if t == 0.0 or t == 1.0:
            x = a if t == 0.0 else b
            return x if isinstance(x, np.ndarray) else x.cpu().numpy()
        got = self.ready(key, t)
        if got is None:
            got = self.batch(a, b, [t], key)[0]
        self.frames += 1
        return got

    # -- several times, one call -------------------------------------------------------------
    @torch.inference_mode()
    def batch(self, a: Any, b: Any, ts: Sequence[float], key: Any = None) -> np.ndarray:
        """[N, H, W, 4] uint8: the frames at times ``ts`` (each in (0, 1)) between ``a``
        and ``b``, from one network call per :data:`MAX_BATCH` times."""
        ts = [float(t) for t in ts]
        if not ts or any(not 0.0 < t < 1.0 for t in ts):
            raise ValueError(f"interpolation times must be in (0, 1), got {ts}")
        if tuple(a.shape) != tuple(b.shape) or len(a.shape) != 3 or a.shape[2] != 4:
            raise ValueError(
                f"frames must both be [H, W, 4] uint8, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if self.stream is None and threading.get_ident() not in self._single:
            # CPU: one intra-op thread for this (publisher) thread only; the setting is per
            # thread. Two OpenMP pools spinning against generation on a few cores cost 10x.
            torch.set_num_threads(1)
            self._single.add(threading.get_ident())
        t0 = time.perf_counter()
        h, w = int(a.shape[0]), int(a.shape[1])
        n = len(ts)
        slot = self._next_host
        self._next_host = (slot + 1) % self._keep
        host = self._hosts[slot]
        if host is None or host.shape[0] < n or tuple(host.shape[1:]) != (h, w, 4):
            host = torch.empty(
                (max(n, MAX_BATCH), h, w, 4), dtype=torch.uint8, pin_memory=self.stream is not None
            )
            self._hosts[slot] = host
        # results that lived in this buffer are gone
        self._results = {k: v for k, v in self._results.items() if v[0] != slot}
        keys = self._pair_keys(key)
        if self.stream is not None:
            # No wait for the caller's stream: on the publisher thread that is the default
            # stream the generation thread launches onto, and waiting for it would put the
            # frame behind all of generation's queued work. Device inputs must be complete
            # (the frame path waits for its copy event before a block is ever used).
            with torch.cuda.stream(self.stream):
                self._compute(a, b, ts, keys, host[:n])
                self._done.record(self.stream)
            self._done.synchronize()  # the publisher waits, on its own thread
        else:
            self._compute(a, b, ts, keys, host[:n])
        out = host[:n].numpy()
        if key is not None:
            for i, t in enumerate(ts):
                self._results[(key, t)] = (slot, out[i])
        ms = (time.perf_counter() - t0) * 1e3
        self.call_ms = ms if self.call_ms is None else 0.9 * self.call_ms + 0.1 * ms
        per = ms / n
        self.last_ms = per
        self.ms = per if self.ms is None else 0.9 * self.ms + 0.1 * per
        self.frames_out += n
        return out

    def estimate_ms(self, n: int) -> float | None:
        """Expected wall ms of a call for ``n`` times (None before the first call)."""
        if self.call_ms is None or self.ms is None:
            return None
        return max(self.call_ms, self.ms * n)

    def _to_device(self, x: Any) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        return x.to(self.device, non_blocking=True)

    def _prep(self, x: Any, fkey: Any) -> _Prep:
        if fkey is not None:
            got = self._preps.get(fkey)
            if got is not None:
                self._preps.move_to_end(fkey)
                return got
        t0 = time.perf_counter()
        d = self._to_device(x)
        img = d[..., :3].permute(2, 0, 1).unsqueeze(0).to(self.dtype).div_(255.0)
        alpha = d[..., 3:].float()
        small = img
        if self.downscale > 1:
            h, w = img.shape[-2:]
            size = (max(1, h // self.downscale), max(1, w // self.downscale))
            small = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        p = self.net.pad(small, self.scale)
        if self.channels_last:
            p = p.contiguous(memory_format=torch.channels_last)
        prep = _Prep(img, alpha, p, self._encode_fn(p))
        if fkey is not None:
            self._preps[fkey] = prep
            while len(self._preps) > 4:
                self._preps.popitem(last=False)
        ms = (time.perf_counter() - t0) * 1e3
        self.prep_ms = ms if self.prep_ms is None else 0.9 * self.prep_ms + 0.1 * ms
        return prep

    def _flow_eager(self, p0, p1, f0, f1, tv):
        return self.net.flow_padded(p0, p1, f0, f1, tv, self.scale)

    def _compute(
        self, a: Any, b: Any, ts: list[float], keys: tuple[Any, Any] | None, dst: torch.Tensor
    ) -> None:
        """The network for times ``ts``, written as uint8 RGBA into host ``dst``."""
        pa = self._prep(a, keys[0] if keys else None)
        pb = self._prep(b, keys[1] if keys else None)
        h, w = pa.x.shape[-2:]
        sh, sw = pa.p.shape[-2:]
        for i in range(0, len(ts), MAX_BATCH):
            chunk = ts[i : i + MAX_BATCH]
            n = len(chunk)
            # a copy of a few floats; torch.full for one (a fill, no host-to-device copy)
            if n == 1:
                tv = torch.full((1,), chunk[0], device=self.device, dtype=self.dtype)
            elif self.stream is None:
                tv = torch.tensor(chunk, dtype=self.dtype)
            else:
                # through a pinned buffer: a copy from pageable memory would first wait
                # for this stream's queued work; this one is only enqueued (the buffer is
                # not refilled before this call's end waits for the stream)
                if self._tpin is None or self._tpin.numel() < len(ts):
                    size = max(4 * MAX_BATCH, len(ts))
                    self._tpin = torch.empty(size, dtype=self.dtype, pin_memory=True)
                self._tpin[i : i + n] = torch.tensor(chunk, dtype=self.dtype)
                tv = self._tpin[i : i + n].to(self.device, non_blocking=True)
            if self.compile != "off":
                # One graph for every batch size: the batch is symbolic, and a single time
                # runs as two (size 1 would be specialised: a second compile).
                tc = tv.expand(2).clone() if n == 1 else tv
                torch._dynamo.mark_dynamic(tc, 0)
                flow, mask = self._flow_fn(pa.p, pb.p, pa.f, pb.f, tc)
                flow, mask = flow[:n], mask[:n]
            else:
                flow, mask = self._flow_fn(pa.p, pb.p, pa.f, pb.f, tv)
            self.calls += 1
            if self.downscale == 1:
                flow, mask = flow[:, :, :h, :w], mask[:, :, :h, :w]
            else:
                small = (max(1, h // self.downscale), max(1, w // self.downscale))
                flow, mask = flow[:, :, : small[0], : small[1]], mask[:, :, : small[0], : small[1]]
                # pixels of the small frame -> pixels of the full one, scaled while small
                # (the bilinear upsampling is linear, so it commutes); python scalars: no
                # copy to the device
                sx, sy = w / small[1], h / small[0]
                flow = torch.cat(
                    (flow[:, 0:1] * sx, flow[:, 1:2] * sy, flow[:, 2:3] * sx, flow[:, 3:4] * sy),
                    1,
                )
                flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
                mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
            x0, x1 = pa.x.expand(n, -1, -1, -1), pb.x.expand(n, -1, -1, -1)
            y = synthesize(x0, x1, flow.contiguous(), mask.contiguous())
            out = torch.empty((n, h, w, 4), dtype=torch.uint8, device=self.device)
            out[..., :3] = y.mul(255.0).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1)
            tt = tv.float().reshape(n, 1, 1, 1)
            out[..., 3:] = (pa.alpha * (1.0 - tt) + pb.alpha * tt).add_(0.5)
            dst[i : i + n].copy_(out, non_blocking=True)

    # -- start-up ------------------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self, height: int, width: int, batches: Sequence[int] = (1, 2, 3)) -> float:
        """Run (and with ``compile``, compile) the network once per batch size for frames
        of this size, so the first show frames don't pay for it. Seconds taken."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (height, width, 4), dtype=torch.uint8, generator=g)
        b = torch.randint(0, 256, (height, width, 4), dtype=torch.uint8, generator=g)
        for n in batches:
            for _ in range(3 if self.compile == "cudagraphs" else 1):  # graphs record late
                self.batch(a, b, [(i + 1) / (n + 1) for i in range(n)])
        self.forget()
        self.ms = self.call_ms = self.last_ms = self.prep_ms = None
        self.frames_out = self.calls = 0
        return time.perf_counter() - t0


def build_interpolator(
    *,
    model: str,
    device: str | torch.device,
    models_dir: str | Path | None = None,
    random_weights: bool = False,
    scale: float | None = None,
    compile: str = "off",
) -> Interpolator:
    """The interpolator for an engine: the tiny RIFE (random weights) with the tiny model,
    a full-size random one with ``--random-weights`` (timing), else the downloaded v4.25
    weights. Raises InterpolationUnavailable naming the file and the download command."""
    from engine.models.rife import CONFIGS, load_rife, random_rife
    from engine.weights.catalog import FILES, check_file

    device = torch.device(device)
    if model == "tiny":
        # flow on frames 4x smaller: the CPU has to keep 30 fps next to generation
        net = random_rife(CONFIGS["tiny"], device=device)
        return Interpolator(net, device, scale=scale or 1.0, downscale=4, name="rife-tiny")
    if random_weights:
        return Interpolator(random_rife(device=device), device, scale=scale or 1.0, compile=compile)
    f = FILES["rife"]
    path = f.path(models_dir)
    why = check_file(path)
    if why is not None:
        raise InterpolationUnavailable(
            f"interpolation needs the RIFE v4.25 weights: {path} ({why}); fetch them with"
            f" `dreamdeck download --rife`"
        )
    from engine.weights.checkpoint import WeightsError

    try:
        net = load_rife(path, device=device)
    except WeightsError as e:
        raise InterpolationUnavailable(
            f"interpolation: the RIFE weights cannot be used: {e}; fetch them again with"
            " `dreamdeck download --rife` (after deleting the file)"
        ) from None
    return Interpolator(net, device, scale=scale or 1.0, compile=compile)


class BlockResampler:
    """Whole blocks in, blocks at another frame rate out: for the recording and the
    offline render, where frames are not presented one by one.

    Generated frames are numbered on, block after block; output frame j sits at source
    position ``j * step`` (``step`` = source frames per output frame: 16 / 30 for a
    render at 30 fps, the generation rate / output rate for a live ``fit`` recording,
    read again for each block). A position between two frames is interpolated, one on a
    frame is that frame. The last frame of each block is kept for the next one, so block
    edges interpolate too. Deterministic for the same frames and interpolator.
    """

    def __init__(self, interpolator: Interpolator, step: float | Any):
        self.interp = interpolator
        self._step = step
        self._pos = 0.0  # source position of the next output frame
        self._base = 0  # source index of the first frame of the next block
        self._last: np.ndarray | None = None

    def step(self) -> float:
        s = float(self._step() if callable(self._step) else self._step)
        if not (s > 0 and np.isfinite(s)):
            raise ValueError(f"resampling step must be a positive number, got {s}")
        return s

    def reset(self) -> None:
        self._pos, self._base, self._last = 0.0, 0, None

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """[T, H, W, 4] uint8 in; [T', H, W, 4] uint8 out (T' may be 0)."""
        block = np.asarray(block)
        n = block.shape[0]
        if self._last is not None and self._last.shape != block.shape[1:]:
            self.reset()  # new frame size: start over
        step = self.step()
        # (k, t) of each output frame first, then the frames: all the times between the
        # same two source frames in one network call where the interpolator batches
        wanted: list[tuple[int, float]] = []
        end = self._base + n - 1  # the last source index available
        while self._pos <= end + 1e-9:
            k = int(np.floor(self._pos + 1e-9))
            t = self._pos - k
            if t < 1e-6:
                t = 0.0
            if t > 0.0 and k + 1 > end:
                break  # needs the next block
            wanted.append((k, t))
            self._pos += step
        out: list[np.ndarray] = []
        i = 0
        while i < len(wanted):
            k, t = wanted[i]
            a = self._frame(block, k)
            if t == 0.0:
                out.append(a.copy())
                i += 1
                continue
            j = i
            while j < len(wanted) and wanted[j][0] == k and wanted[j][1] > 0.0:
                j += 1
            ts = [tt for _, tt in wanted[i:j]]
            b = self._frame(block, k + 1)
            if hasattr(self.interp, "batch"):
                out.extend(f.copy() for f in self.interp.batch(a, b, ts))
            else:
                out.extend(self.interp.frame(a, b, tt).copy() for tt in ts)
            i = j
        self._last = block[-1].copy()
        self._base += n
        if not out:
            return np.empty((0, *block.shape[1:]), dtype=np.uint8)
        return np.stack(out)

    def _frame(self, block: np.ndarray, k: int) -> np.ndarray:
        i = k - self._base
        if i >= 0:
            return block[i]
        if i == -1 and self._last is not None:
            return self._last
        raise IndexError(f"source frame {k} is no longer held")  # pragma: no cover
