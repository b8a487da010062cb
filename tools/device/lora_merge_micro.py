"""Device measurement helper (CUDA only): time every fp8 LoRA merge kernel variant
(engine/models/lora_merge.py VARIANTS) on 14B-shaped fp8 weights at rank 64 and 128, and
the bf16 addmm merge, each extrapolated to one whole 14B re-merge (40 blocks x 8 attention
linears of 5120x5120 + the two FFN linears), with the byte floor at 3 TB/s for scale.
Prints JSON.

    python tools/device/lora_merge_micro.py
"""

import json

import torch

from engine.models import lora_merge
from engine.models.fp8 import quantize_rowwise

# (rows, columns) of a 14B block's linears -> how many of that shape a block has
SHAPES = {(5120, 5120): 8, (13824, 5120): 1, (5120, 13824): 1}
BLOCKS = 40


def timeit(fn, reps: int = 10) -> float:
    """Milliseconds per call, CUDA events, after one warm call (the JIT)."""
    fn()
    torch.cuda.synchronize()
    e = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    e[0].record()
    for _ in range(reps):
        fn()
    e[1].record()
    e[1].synchronize()
    return e[0].elapsed_time(e[1]) / reps


def factors(n: int, k: int, r: int, g: torch.Generator):
    dev = g.device
    b = (torch.randn(n, r, device=dev, generator=g) * 0.02).bfloat16()
    a = (torch.randn(r, k, device=dev, generator=g) * k**-0.5).bfloat16()
    return b, a, torch.ones(r, device=dev)


def fp8_ms(n: int, k: int, r: int, variant: str, g: torch.Generator) -> float:
    q, s = quantize_rowwise(torch.randn(n, k, device=g.device, generator=g))
    s = s.view(-1).contiguous()
    b, a, cs = factors(n, k, r, g)
    dq, ds = q.clone(), s.clone()
    return timeit(lambda: lora_merge.fp8_merge_rows_(dq, ds, q, s, b, a, cs, variant=variant))


def bf16_ms(n: int, k: int, r: int, g: torch.Generator) -> float:
    w = torch.randn(n, k, device=g.device, generator=g).bfloat16()
    p = w.clone()
    b, a, cs = factors(n, k, r, g)
    return timeit(lambda: lora_merge.linear_merge_rows_(w, p, b, a, cs))


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict = {"device": torch.cuda.get_device_name()}
    for r in (64, 128):
        for name in lora_merge.VARIANTS:
            try:
                per = {f"{n}x{k}": fp8_ms(n, k, r, name, g) for n, k in SHAPES}
            except Exception as e:  # a variant that does not build here
                out[f"r{r}/{name}"] = repr(e)[:300]
                continue
            out[f"r{r}/{name}"] = {key: round(ms, 4) for key, ms in per.items()}
            total = sum(per[f"{n}x{k}"] * c for (n, k), c in SHAPES.items())
            out[f"r{r}/{name}/14B_ms"] = round(total * BLOCKS, 2)
        total = sum(bf16_ms(n, k, r, g) * c for (n, k), c in SHAPES.items())
        out[f"r{r}/bf16-addmm/14B_ms"] = round(total * BLOCKS, 2)
    weights = BLOCKS * sum(n * k * c for (n, k), c in SHAPES.items())
    out["fp8_byte_floor_ms_at_3TBps"] = round(weights * 3 / 3.0e12 * 1e3, 2)  # read 2x, write 1x
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
