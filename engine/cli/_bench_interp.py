"""`dreamdeck bench --interp FPS`: what frame interpolation costs next to generation.

Random full-size RIFE v4.25 weights (same cost as the real ones) at the bench resolution:

- ``ms_per_frame``: one interpolated frame, uint8 in and host uint8 out (what the frame
  path's publisher does per output frame), median over a standalone run;
- ``fps_with`` / ``fps_loss``: the generation rate measured again while a thread
  interpolates at the output rate on its side stream, against the plain run;
- ``added_latency_ms``: one generated frame at the measured rate (the wait for the next
  frame) plus one interpolation;
- ``tick_jitter_ms``: standard deviation of when frames were ready against their
  output ticks during the concurrent run (what the ring would see);
- ``memory_gb``: peak GPU memory of the interpolator alone.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any


def measure_interp(args, measure_again, base: dict[str, Any], *, height: int, width: int, device):
    import torch

    from engine.models.rife import random_rife
    from engine.runtime.interpolator import Interpolator

    fps_out = float(args.interp)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    interp = Interpolator(random_rife(device=device, seed=args.seed), device)
    g = torch.Generator(device).manual_seed(args.seed)
    a = torch.randint(0, 256, (height, width, 4), generator=g, device=device, dtype=torch.uint8)
    b = torch.randint(0, 256, (height, width, 4), generator=g, device=device, dtype=torch.uint8)
    for _ in range(5):  # warm-up (cuDNN picks its kernels)
        interp.frame(a, b, 0.5)
    times = []
    for i in range(60):
        t0 = time.perf_counter()
        interp.frame(a, b, (i % 9 + 1) / 10)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    mem = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None

    stop = threading.Event()
    lateness: list[float] = []

    def present() -> None:
        tick = time.perf_counter()
        i = 0
        while not stop.is_set():
            interp.frame(a, b, (i % 9 + 1) / 10)
            lateness.append((time.perf_counter() - tick) * 1e3)
            i += 1
            tick += 1.0 / fps_out
            wait = tick - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                tick = time.perf_counter()  # fell behind: restart the grid

    thread = threading.Thread(target=present, name="bench-interp", daemon=True)
    thread.start()
    try:
        with_interp = measure_again()
    finally:
        stop.set()
        thread.join(10)
    fps_base, fps_with = base["fps"], with_interp["fps"]
    return {
        "output_fps": fps_out,
        "ms_per_frame": ms,
        "ms_per_frame_p90": sorted(times)[int(0.9 * len(times))],
        "fps_base": fps_base,
        "fps_with": fps_with,
        "fps_loss": 1.0 - fps_with / fps_base,
        "added_latency_ms": 1e3 / fps_base + ms,
        "frames_interpolated": len(lateness),
        "tick_jitter_ms": statistics.pstdev(lateness) if len(lateness) > 1 else None,
        "memory_gb": mem,
        "weights": "random (RIFE v4.25 layout, full size)",
        "dtype": str(interp.dtype).removeprefix("torch."),
    }
