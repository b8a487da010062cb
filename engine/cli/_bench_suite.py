"""`dreamdeck bench --suite`: every row of the targets table (docs/targets.md) in one
process, bf16 first, then the same model quantised to fp8 in place, so the 14B is built
once. Prints a markdown table (and JSON lines with --json) and, with --write, appends
the dated table to a file such as docs/PERFORMANCE.md."""

from __future__ import annotations

import datetime
import json
import shlex
import sys

from engine.stream.schedule import STEP_PRESETS

# (label, height, width, steps, decoder, kv_bias, target fps bf16, target fps fp8): the
# round-three targets (docs/targets.md, "Speed targets"; one H200) where one is set.
ROWS = [
    ("832x480, 4 steps, transformer only", 480, 832, "quality", "none", 0.3, 10.5, 16.0),
    ("832x480, 4 steps, transformer only, bias off", 480, 832, "quality", "none", 1.0, None, None),
    ("832x480, 4 steps, Wan VAE", 480, 832, "quality", "wan", 0.3, None, None),
    ("832x480, 4 steps, TAEHV", 480, 832, "quality", "tae", 0.3, 10.0, 15.5),
    ("832x480, 2 steps, TAEHV", 480, 832, "fast", "tae", 0.3, None, None),
    ("576x320, 4 steps, transformer only", 320, 576, "quality", "none", 0.3, None, None),
    ("576x320, 4 steps, TAEHV", 320, 576, "quality", "tae", 0.3, 22.0, 32.0),
]


def run_suite(args, model, cfg, device, dtype, backend, measure) -> int:
    import torch

    from engine.cli.bench import _quantize

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    tiny = args.model == "tiny"
    passes = ["fp8"] if args.fp8 else ["bf16", "fp8"]
    if device.type != "cuda" and not tiny:
        passes = ["bf16"]
    results = []
    for pass_name in passes:
        if pass_name == "fp8" and not args.fp8:
            _quantize(model, args.fp8_scaling)
            args.fp8 = True
        for label, h, w, steps, dec, bias, t16, t8 in ROWS:
            if tiny:
                h, w = 64, 96
            args.kv_bias = bias
            r = measure(
                model,
                cfg,
                device,
                dtype,
                backend,
                args,
                height=h,
                width=w,
                steps=STEP_PRESETS[steps],
                decoder_kind=dec,
            )
            r["row"] = label
            r["weights"] = pass_name
            r["target_fps"] = t8 if pass_name == "fp8" else t16
            results.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
            print(_row(r), file=sys.stderr, flush=True)
    table = _table(results, args)
    print(table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0


def _row(r: dict) -> str:
    st = r["stages_ms"]
    steps = [v for k, v in st.items() if k.startswith("step")]
    step = sorted(steps)[len(steps) // 2] if steps else 0.0
    t = r["target_fps"]
    ok = "" if t is None else ("yes" if r["fps"] >= t else f"no ({r['fps'] / t:.0%})")
    return (
        f"| {r['row']} | {r['weights']} | {r['fps']:.2f} | {'' if t is None else t} | {ok} |"
        f" {r['block_ms']:.0f} | {st.get('recompute', 0):.0f} | {step:.0f} |"
        f" {st.get('decode', 0):.0f} | {st.get('encode', 0):.0f} |"
        f" {r['peak_memory_allocated_gb'] or 0:.1f} / {r['peak_memory_reserved_gb'] or 0:.1f} |"
        f" {r.get('latency_median_ms') or 0:.0f} | {r.get('warmup_s') or 0:.1f} |"
    )


def _table(results: list[dict], args) -> str:
    r0 = results[0]
    cmd = "dreamdeck " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    head = (
        f"### {datetime.date.today().isoformat()} · {r0['device']} · torch {r0['torch']} ·"
        f" attention {r0['attention']} · compile {r0['config']['compile']}\n\n"
        f"`{cmd}` (random weights, median of {r0['blocks']} steady blocks after"
        f" {r0['warmup']} warm-up)\n\n"
        "| case | weights | fps | target | met | block ms | recompute ms | step ms |"
        " decode ms | anchor encode ms | peak GB alloc / reserved | latency median ms |"
        " compile + warm-up s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(_row(r) for r in results)]) + "\n"
