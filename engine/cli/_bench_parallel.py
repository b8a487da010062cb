"""`dreamdeck bench --gpus N` and `--comm-volume`: the stream split over N ranks
(engine/parallel), against one process on the same machine.

--gpus N: this process is rank 0 and spawns the others (NCCL on GPUs, gloo on a CPU).
Unless --no-reference, it first runs the first blocks with the plain model in this process
(one GPU) and reports the relative error of the split stream's latents against them, so
every speed number comes with proof that the split computes the same stream. Then:
fps, block ms and stages on rank 0, peak memory per rank, and the communication share of
a block, measured by timing the block's all-to-alls alone on the live group (the same
shapes and count as in a block, not overlapped with compute).

--comm-volume: no run; the bytes each rank sends per block for this configuration, and
the time that takes at given all-to-all bandwidths, to project the speed-up of a machine
that is not here.

Relative error = ||a - b|| / ||b|| over the latents of all compared blocks, float32.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from engine.cli import UsageError

REFERENCE_BLOCKS = 3  # block 0, block 1 (recompute + bias), block 2
LINK_GBPS = (50.0, 100.0, 200.0, 400.0)  # per-rank all-to-all bandwidths for projections


def comm_report(cfg, height, width, steps: int, world: int, elem_bytes: int, cross: str) -> dict:
    from engine.parallel.ulysses import comm_volume

    v = comm_volume(cfg, height, width, steps, world, elem_bytes=elem_bytes, cross=cross)
    return {
        **v.to_dict(),
        "ms_per_block_at_gbps": {str(g): v.seconds(g) * 1e3 for g in LINK_GBPS},
    }


def run_parallel(args, cfg, device, dtype, backend, height, width, steps) -> int:
    import torch

    from engine.parallel.launch import RankSpec, World, check_ranks
    from engine.parallel.ulysses import ParallelConfigError

    elem = torch.finfo(dtype).bits // 8
    if args.comm_volume:
        try:
            report = {
                "model": args.model,
                "height": height,
                "width": width,
                "steps": len(steps),
                "dtype_bytes": elem,
                **comm_report(cfg, height, width, len(steps), args.gpus, elem, args.cross),
            }
        except ParallelConfigError as e:
            raise UsageError(f"--gpus: {e}") from None
        json.dump(report, sys.stdout) if args.json else print(json.dumps(report, indent=2))
        if args.json:
            sys.stdout.write("\n")
        return 0

    spec = RankSpec(
        cfg=cfg,
        height=height,
        width=width,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        seed=args.seed,
        kv_cache=args.kv_cache,
        fuse_qkv=not args.no_fuse_qkv,
        fp8=args.fp8,
        fp8_scaling=args.fp8_scaling,
        compile=args.compile,
        attention=backend,
        cross=args.cross,
        timeout_s=args.rank_timeout or (120.0 if device.type == "cuda" else 30.0),
    )
    try:
        check_ranks(args.gpus, spec)
    except ParallelConfigError as e:
        raise UsageError(f"--gpus: {e}") from None
    if args.vace or args.v2v is not None:
        raise UsageError("--gpus N runs text-only for now (no --vace, --v2v)")
    world = World.start(spec, args.gpus)
    try:
        return _measure(args, spec, world, cfg, device, dtype, backend, steps)
    finally:
        world.close(world.leader)  # at once if _measure closed it already


def _measure(args, spec, world, cfg, device, dtype, backend, steps) -> int:
    import torch

    from engine.cli._bench_accuracy import rel_err
    from engine.parallel.launch import build_model
    from engine.parallel.ulysses import comm_volume, layer_heads
    from engine.stream.session import BlockInputs, StreamSession

    cuda = device.type == "cuda"
    model = build_model(spec, device)
    decoder = encoder = None
    if args.decoder != "none":
        from engine.models.decoders import build_decoder

        decoder, encoder = build_decoder(
            args.decoder, tiny=args.model == "tiny", device=device, dtype=dtype
        )
    g = torch.Generator(device).manual_seed(args.seed)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    text[:, 20:] = 0
    inputs = BlockInputs(
        text=text, text_key="bench", steps=steps, seed=args.seed, kv_bias=args.kv_bias
    )

    def session() -> StreamSession:
        return StreamSession(
            model,
            height=spec.height,
            width=spec.width,
            decoder=decoder,
            encoder=encoder,
            device=device,
            dtype=dtype,
            kv_cache=args.kv_cache,
        )

    total = max(1, args.warmup) + args.blocks
    compared = min(REFERENCE_BLOCKS, total)
    reference = None
    ref_ms = None
    if not args.no_reference:
        s = session()
        reference, times = [], []
        for _ in range(compared):
            out = s.next_block(inputs)
            reference.append(out.latents.float().cpu())
            times.append(out.timings.get("total"))
        ref_ms = times[-1] if compared > 1 else None
        del s
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    leader = world.attach(session())
    got, timings = [], []
    t_warm = time.perf_counter()
    for i in range(total):
        out = leader.next_block(inputs)
        if i < compared:
            got.append(out.latents.float().cpu())
        timings.append(out.timings)
        if i + 1 == max(1, args.warmup):
            warmup_s = time.perf_counter() - t_warm
    measured = timings[max(1, args.warmup) :]
    block_ms = statistics.median(m["total"] for m in measured)
    stages = sorted({k for m in measured for k in m if k != "total"})

    # the communication of a block alone: its all-to-alls, same shapes and count
    vol = comm_volume(cfg, spec.height, spec.width, len(steps), world.n, cross=spec.cross)
    n_local = vol.tokens // world.n
    # one forward's worth of self-attention round trips: q/k/v in, the output back
    secs = leader.probe((3, 1, n_local, cfg.heads, cfg.head_dim), cfg.layers)
    comm_forward_ms = secs * 1e3
    comm_block_ms = comm_forward_ms * vol.forwards * (1.5 if spec.cross == "heads" else 1)

    result = {
        "world": world.n,
        "backend": "nccl" if cuda else "gloo",
        "fps": 12 * 1000.0 / block_ms,
        "block_ms": block_ms,
        "latency_ms": block_ms,
        "latency_median_ms": 1.5 * block_ms,
        "stages_ms": {k: statistics.median(m.get(k, 0.0) for m in measured) for k in stages},
        "first_block_ms": timings[0].get("total"),
        "warmup_s": warmup_s,
        "one_process_block_ms": ref_ms,
        "rel_err_vs_one_process": rel_err(torch.cat(got), torch.cat(reference))
        if reference is not None
        else None,
        "compared_blocks": compared if reference is not None else 0,
        "comm": {
            **vol.to_dict(),
            "measured_ms_per_block": comm_block_ms,
            "share_of_block": comm_block_ms / block_ms,
        },
        "kv_heads_per_rank": layer_heads(leader.cache),
        "peak_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if cuda
        else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "attention": backend,
        "config": {
            "model": args.model,
            "height": spec.height,
            "width": spec.width,
            "steps": list(steps),
            "kv_bias": args.kv_bias,
            "dtype": str(dtype).removeprefix("torch."),
            "fp8": args.fp8_scaling if args.fp8 else False,
            "compile": args.compile,
            "kv_cache": args.kv_cache,
            "decoder": args.decoder,
            "cross": spec.cross,
            "blocks": args.blocks,
            "warmup": max(1, args.warmup),
        },
    }
    ranks = world.close(leader)
    if cuda:
        peaks = [result["peak_memory_allocated_gb"]]
        for r in range(1, world.n):
            key = f"peak/{r}"
            peaks.append(int(world.store.get(key)) / 2**30 if world.store.check([key]) else None)
        result["peak_memory_allocated_gb_per_rank"] = peaks
    result["ranks"] = ranks
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(json.dumps(result, indent=2))
    return 0
