"""`dreamdeck bench --interp FPS`: what frame interpolation costs next to generation.

Random full-size RIFE v4.25 weights (same cost as the real ones) at the bench resolution,
fed the way the frame path feeds it: a stream of generated frames at the source rate
(the measured generation rate, or ``--interp-source-fps``), output ticks at FPS, and for
each pair of generated frames the output times that fall between them (2-3 at 30 fps
from ~10 fps, 5-6 at 60):

- ``ms_per_frame``: wall ms per OUTPUT frame, amortised over the stream (uint8 in, host
  uint8 out), the number the ≤ 4 ms target is about; ``ms_per_call`` (median / p90):
  one pair's network call(s); ``frames_per_call``: output frames per pair;
- ``variant``: ``batched`` (all times of a pair in one call, each frame's encoder
  features computed once: what the engine does) or ``per-frame`` (one call per output
  frame, nothing cached: round 1's way, ``--interp-per-frame``); ``compile``: off,
  default (Inductor) or cudagraphs (``--interp-compile``), ``compile_s`` its warm-up;
- ``fps_with`` / ``fps_loss``: the generation rate measured again while a thread
  interpolates at the output rate on its side stream, against the plain run (skipped
  with ``--interp-only``);
- ``added_latency_ms``: one generated frame at the measured rate (the wait for the next
  frame) plus one call;
- ``memory_gb``: peak GPU memory of the interpolator alone;
- ``diff_vs_eager_max`` / ``_mean``: the measured path's frames against the plain eager
  path's for one pair (uint8 levels; fp16 rounding only, the math is the same).
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from typing import Any


def tick_pattern(fps_out: float, fps_src: float, pairs: int) -> list[list[float]]:
    """For each of ``pairs`` consecutive generated-frame pairs, the times t in (0, 1) of
    the output ticks that fall between them (ticks at multiples of 1/fps_out, generated
    frames at multiples of 1/fps_src; a tick exactly on a frame needs no network)."""
    out: list[list[float]] = []
    j = 0
    for k in range(pairs):
        ts = []
        while True:
            pos = j * fps_src / fps_out  # source position of tick j
            if pos >= k + 1:
                break
            if pos >= k:
                t = pos - k
                if t > 1e-9:
                    ts.append(t)
            j += 1
        out.append(ts)
    return out


def measure_interp(args, measure_again, base: dict[str, Any], *, height: int, width: int, device):
    import torch

    from engine.models.rife import random_rife
    from engine.runtime.interpolator import Interpolator

    fps_out = float(args.interp)
    per_frame = bool(getattr(args, "interp_per_frame", False))
    mode = getattr(args, "interp_compile", "off") or "off"
    src = float(getattr(args, "interp_source_fps", None) or base["fps"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    cl = not getattr(args, "interp_no_channels_last", False)
    net = random_rife(device=device, seed=args.seed)
    interp = Interpolator(net, device, compile=mode, channels_last=None if cl else False)
    g = torch.Generator(device).manual_seed(args.seed)
    gen = [
        torch.randint(0, 256, (height, width, 4), generator=g, device=device, dtype=torch.uint8)
        for _ in range(4)
    ]
    if cuda:
        torch.cuda.synchronize(device)  # the interpolator's stream does not wait for ours
    pattern = [ts for ts in tick_pattern(fps_out, src, 64) if ts]
    sizes = sorted({len(ts) for ts in pattern})
    t0 = time.perf_counter()
    interp.warmup(height, width, batches=[1] if per_frame else sizes)
    compile_s = time.perf_counter() - t0

    def pair(k: int, ts: list[float]) -> None:
        a, b = gen[k % 4], gen[(k + 1) % 4]
        if per_frame:
            for t in ts:
                interp.frame(a, b, t)
        else:
            interp.batch(a, b, ts, key=(k, k + 1))

    for k, ts in enumerate(pattern[:4]):  # warm-up (cuDNN picks its kernels)
        pair(k, ts)
    calls, nframes = [], 0
    t_all = time.perf_counter()
    for k, ts in enumerate(pattern, start=4):
        t0 = time.perf_counter()
        pair(k, ts)
        calls.append((time.perf_counter() - t0) * 1e3)
        nframes += len(ts)
    total_ms = (time.perf_counter() - t_all) * 1e3
    mem = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
    # the same frames from the plain eager path (contiguous layout) on a copy of the
    # network: converting the measured one's layout under its compiled graph breaks it
    ref = Interpolator(copy.deepcopy(net), device, channels_last=False)
    ts = pattern[0]
    got = interp.batch(gen[0], gen[1], ts).astype("int16")
    want = ref.batch(gen[0], gen[1], ts).astype("int16")
    diff = abs(got - want)
    del ref
    result: dict[str, Any] = {
        "output_fps": fps_out,
        "source_fps": src,
        "variant": "per-frame" if per_frame else "batched",
        "compile": mode,
        "compile_s": compile_s,
        "ms_per_frame": total_ms / max(nframes, 1),
        "ms_per_call": statistics.median(calls),
        "ms_per_call_p90": sorted(calls)[int(0.9 * len(calls))],
        "frames_per_call": nframes / max(len(calls), 1),
        "network_calls": interp.calls,
        "prep_ms": interp.prep_ms,
        "memory_gb": mem,
        "weights": "random (RIFE v4.25 layout, full size)",
        "dtype": str(interp.dtype).removeprefix("torch."),
        "channels_last": interp.channels_last,
        "diff_vs_eager_max": int(diff.max()),
        "diff_vs_eager_mean": float(diff.mean()),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    if getattr(args, "interp_only", False):
        result["added_latency_ms"] = 1e3 / src + result["ms_per_call"]
        return result

    stop = threading.Event()
    done = [0]

    def present() -> None:
        k = 0
        nxt = time.perf_counter()
        while not stop.is_set():
            ts = pattern[k % len(pattern)]
            pair(k, ts)
            done[0] += len(ts)
            k += 1
            nxt += len(ts) / fps_out  # the ticks this pair covers
            wait = nxt - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                nxt = time.perf_counter()  # fell behind: restart the grid

    thread = threading.Thread(target=present, name="bench-interp", daemon=True)
    thread.start()
    try:
        with_interp = measure_again()
    finally:
        stop.set()
        thread.join(10)
    fps_base, fps_with = base["fps"], with_interp["fps"]
    result.update(
        fps_base=fps_base,
        fps_with=fps_with,
        fps_loss=1.0 - fps_with / fps_base,
        added_latency_ms=1e3 / fps_base + result["ms_per_call"],
        frames_interpolated=done[0],
    )
    return result
