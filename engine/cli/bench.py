"""`dreamdeck bench`: measure the streaming transformer (and a decoder) with random
weights, so the 14B runs on a GPU without downloading anything.

The model is built on the meta device and materialised on the target device in the
target dtype (no 28 GB host init). Each block is timed per stage with CUDA events on a
GPU (perf_counter on a CPU); the only sync is at the end of a block. Numbers are medians
over the measured blocks, which are all steady blocks (after block 0 and the warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from engine.cli import UsageError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
STEADY_FRAMES = 12  # RGB frames out of a steady block (the first block gives 9)


def kv_cache_name(cache) -> str:
    """The context K/V cache's element type as the flags name them: fp8, or the model dtype
    (bf16, fp16, fp32) that ``--kv-cache bf16`` stands for."""
    if getattr(cache, "fp8", False):
        return "fp8"
    dtype = str(cache[0].k.dtype).removeprefix("torch.")
    return {v: k for k, v in DTYPES.items()}.get(dtype, dtype)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure fps, per-stage ms and peak memory with random weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=["14b", "1.3b", "tiny"], default="14b")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 96)")
    p.add_argument(
        "--steps", default="1000,750,500,250", help="comma-separated timesteps or a preset name"
    )
    p.add_argument("--kv-bias", type=float, default=0.3, help="KV-cache attention bias in (0, 1]")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
        help="with --compile: torch.compile's mode (max-autotune tries Triton GEMM templates"
        " with fused epilogues; minutes of compiling)",
    )
    p.add_argument(
        "--attention", default=None, help="force a backend: fa3 fa2 sage sdpa cudnn math"
    )
    p.add_argument("--decoder", choices=["none", "wan", "tae"], default="none")
    p.add_argument(
        "--fp8", action="store_true", help="fp8 (e4m3) weights for the transformer blocks' linears"
    )
    p.add_argument(
        "--memory-cap-gb",
        type=float,
        default=None,
        help="cap this process's GPU memory (set_per_process_memory_fraction) to check that a "
        "configuration fits a smaller card",
    )
    p.add_argument(
        "--sync-check",
        action="store_true",
        help="run one more block with torch.cuda.set_sync_debug_mode('error') (CUDA only)",
    )
    p.add_argument(
        "--fp8-scaling",
        choices=["rowwise", "tensorwise"],
        default="rowwise",
        help="activation scales per token (rowwise) or per tensor (tensorwise, cuBLAS fp8)",
    )
    p.add_argument(
        "--compile-decoder",
        action="store_true",
        help="torch.compile the decoder and anchor encoder",
    )
    p.add_argument(
        "--suite",
        action="store_true",
        help="run every row of docs' targets table (bf16 then fp8) in one process; "
        "prints a markdown table and JSON lines",
    )
    p.add_argument(
        "--text",
        choices=["gpu", "fp8", "cpu"],
        default=None,
        help="time the UMT5-XXL text encoder in this placement instead of the transformer",
    )
    p.add_argument(
        "--write", metavar="FILE", default=None, help="with --suite: append the dated table to FILE"
    )
    p.add_argument(
        "--vace",
        action="store_true",
        help="VACE on (random VACE module + random Wan VAE context encoder) with a synthetic"
        " moving input video; the context encode is the vace_encode stage",
    )
    p.add_argument(
        "--vace-refs",
        type=int,
        default=0,
        metavar="N",
        help="with --vace: N reference images (0..3) in front of each block",
    )
    p.add_argument(
        "--vace-scale", type=float, default=1.0, help="with --vace: hint strength (0..2)"
    )
    p.add_argument(
        "--vace-encode-eager",
        action="store_true",
        help="with --vace --compile: leave the VACE context encoder eager (to compare)",
    )
    p.add_argument(
        "--v2v",
        type=float,
        default=None,
        metavar="STRENGTH",
        help="plain V2V at this strength (0..1) on the synthetic input; v2v_encode stage",
    )
    p.add_argument(
        "--kv-cache",
        choices=["bf16", "fp8"],
        default="bf16",
        help="context K/V in the model dtype or in float8 (half the memory, lossy)",
    )
    p.add_argument(
        "--no-fuse-qkv",
        action="store_true",
        help="keep q, k, v as three linears (the default fuses them into one GEMM)",
    )
    p.add_argument(
        "--accuracy",
        action="store_true",
        help="instead of timing: fp8 weights' error against the model dtype, per layer and "
        "over two stream blocks (same random weights)",
    )
    p.add_argument(
        "--drift",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: the fp8 KV cache's error against the exact cache over N blocks",
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="compile into PyTorch's temporary cache instead of the models folder's",
    )
    p.add_argument(
        "--loras",
        type=int,
        default=0,
        metavar="N",
        help="N random LoRAs (0..4) on every attention and FFN linear of the blocks, live"
        " slots as the engine runs them; adds lora_update_ms, lora_load_s, lora_mb",
    )
    p.add_argument("--lora-rank", type=int, default=64, metavar="R", help="with --loras: rank")
    p.add_argument(
        "--lora-moving",
        action="store_true",
        help="with --loras: slot 1's strength changes every block (side path); without it the"
        " strengths stand still (merged into the weights)",
    )
    p.add_argument(
        "--lora-pristine",
        choices=["host", "device"],
        default="host",
        help="with --loras: where the base weights that merges start from live (preset"
        " lora_pristine); the report's restore_ms is the return to strength 0",
    )
    p.add_argument("--models-dir", default=None, help="where the compile cache lives")
    p.add_argument(
        "--interp",
        type=float,
        default=None,
        metavar="FPS",
        help="also measure RIFE frame interpolation at this output rate (30, 60): ms per"
        " frame, generation fps with it running, added latency, memory (JSON key interp)",
    )
    p.add_argument(
        "--interp-compile",
        choices=["off", "default", "cudagraphs"],
        default="off",
        help="with --interp: compile the network (Inductor; cudagraphs adds CUDA graphs)",
    )
    p.add_argument(
        "--interp-per-frame",
        action="store_true",
        help="with --interp: one network call per output frame, nothing cached (round 1's"
        " way, for comparison); default: one call per pair of generated frames",
    )
    p.add_argument(
        "--interp-source-fps",
        type=float,
        default=None,
        metavar="FPS",
        help="with --interp: generated frames per second the output ticks fall between"
        " (default: the measured generation rate)",
    )
    p.add_argument(
        "--interp-no-channels-last",
        action="store_true",
        help="with --interp: keep the network's tensors contiguous (NCHW) on the GPU",
    )
    p.add_argument(
        "--interp-only",
        action="store_true",
        help="with --interp: skip measuring generation again with interpolation running",
    )
    p.add_argument("--blocks", type=int, default=5, help="measured steady blocks")
    p.add_argument(
        "--warmup", type=int, default=2, help="blocks before measuring (block 0 is always one)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("several GPUs (engine/parallel; see engine/cli/_bench_parallel.py)")
    g.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="split the stream over N ranks (NCCL GPUs, or gloo processes on a CPU)",
    )
    g.add_argument(
        "--cross",
        choices=("tokens", "heads"),
        default="tokens",
        help="cross-attention K/V per rank: all heads (no traffic) or the rank's heads",
    )
    g.add_argument(
        "--comm-volume",
        action="store_true",
        help="print the bytes each rank sends per block for --gpus N (runs nothing)",
    )
    g.add_argument(
        "--no-reference",
        action="store_true",
        help="--gpus N: skip the one-process run the split stream is compared with",
    )
    g.add_argument("--rank-timeout", type=float, default=None, help="seconds per collective")
    p.add_argument(
        "--profile",
        metavar="TRACE",
        default=None,
        help="write a torch.profiler trace of one more block",
    )
    p.set_defaults(func=run)


def _parse_steps(text: str) -> tuple[int, ...]:
    from engine.stream.schedule import STEP_PRESETS, StepsError, validate_steps

    try:
        if text in STEP_PRESETS:
            return validate_steps(text)
        try:
            items = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise StepsError(f"not a list of integers: {text!r}") from None
        return validate_steps(items)
    except StepsError as e:
        raise UsageError(f"--steps: {e}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    if args.text:
        from engine.cli._bench_text import run_text_bench

        return run_text_bench(args.text, args.json)

    from engine.models.attention import AttentionError, select_backend
    from engine.models.wan import CONFIGS
    from engine.weights.transformer import block_preparer, random_transformer

    tiny = args.model == "tiny"
    height = args.height or (64 if tiny else 480)
    width = args.width or (96 if tiny else 832)
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % 16:
            raise UsageError(f"{name} must be a positive multiple of 16, got {v}")
    if not 0.0 < args.kv_bias <= 1.0:
        raise UsageError(f"--kv-bias must be in (0, 1], got {args.kv_bias}")
    if args.blocks < 1 or args.warmup < 0:
        raise UsageError("--blocks must be >= 1 and --warmup >= 0")
    steps = _parse_steps(args.steps)
    if not 0 <= args.vace_refs <= 3 or (args.vace_refs and not args.vace):
        raise UsageError("--vace-refs takes 0..3 and needs --vace")
    if not 0.0 <= args.vace_scale <= 2.0:
        raise UsageError(f"--vace-scale must be in 0..2, got {args.vace_scale}")
    if args.v2v is not None and not 0.0 <= args.v2v <= 1.0:
        raise UsageError(f"--v2v must be in 0..1, got {args.v2v}")
    if args.drift < 0:
        raise UsageError(f"--drift takes a number of blocks >= 1, got {args.drift}")
    if args.interp is not None and not 1.0 <= args.interp <= 240.0:
        raise UsageError(f"--interp takes an output rate in 1..240, got {args.interp}")
    if args.interp_source_fps is not None and not 0.5 <= args.interp_source_fps <= 240.0:
        raise UsageError(
            f"--interp-source-fps takes a rate in 0.5..240, got {args.interp_source_fps}"
        )
    if (args.accuracy or args.drift) and (args.suite or args.vace or args.v2v is not None):
        raise UsageError("--accuracy / --drift run on their own (not with --suite, --vace, --v2v)")
    if not 0 <= args.loras <= 4 or args.lora_rank < 1:
        raise UsageError("--loras takes 0..4 and --lora-rank >= 1")
    if args.suite and (args.vace or args.v2v is not None):
        raise UsageError("--suite measures the targets table; run --vace / --v2v on their own")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    try:
        backend = select_backend(args.attention, device)
    except AttentionError as e:
        raise UsageError(f"--attention: {e}") from None

    cuda = device.type == "cuda"
    if args.memory_cap_gb is not None:
        if not cuda:
            raise UsageError("--memory-cap-gb needs a CUDA device")
        total = torch.cuda.get_device_properties(device).total_memory
        if not 0 < args.memory_cap_gb * 2**30 <= total:
            raise UsageError(
                f"--memory-cap-gb must be in (0, {total / 2**30:.1f}] on this card, got {args.memory_cap_gb}"
            )
        # the call wants an index: "cuda" alone is refused
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gb * 2**30 / total, index)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True  # the VAE's convolutions pick their kernels once
    cfg = CONFIGS[args.model]
    if args.accuracy or args.drift:
        from engine.cli._bench_accuracy import print_report, run_accuracy

        report = run_accuracy(args, cfg, device, dtype, backend, height, width, steps)
        if args.json:
            json.dump(report, sys.stdout)
            sys.stdout.write("\n")
        else:
            print_report(report)
        return 0
    if args.gpus != 1 or args.comm_volume:
        from engine.cli._bench_parallel import run_parallel

        if args.suite or args.accuracy or args.drift or args.profile:
            raise UsageError("--gpus runs on its own (not with --suite, --accuracy, --profile)")
        return run_parallel(args, cfg, device, dtype, backend, height, width, steps)
    # block by block: fused and quantised as each block is made (a small peak)
    prepare = block_preparer(fuse=not args.no_fuse_qkv, fp8=args.fp8, scaling=args.fp8_scaling)
    if args.compile and cuda and not args.no_compile_cache:
        from engine.runtime.startup import use_compile_cache

        use_compile_cache(args.models_dir, f"bench-{args.model}", device)
    t_build = time.perf_counter()
    model = random_transformer(
        cfg, device, dtype, seed=args.seed, attention=backend, prepare_block=prepare
    )
    if cuda:
        torch.cuda.synchronize(device)
    args._build_s = time.perf_counter() - t_build
    if args.compile:
        model.compile_blocks(**({"mode": args.compile_mode} if args.compile_mode else {}))
    if args.suite:
        from engine.cli._bench_suite import run_suite

        return run_suite(args, model, cfg, device, dtype, backend, measure)

    def measure_once() -> dict:
        return measure(
            model,
            cfg,
            device,
            dtype,
            backend,
            args,
            height=height,
            width=width,
            steps=steps,
            decoder_kind=args.decoder,
        )

    result = measure_once()
    if args.interp is not None:
        from engine.cli._bench_interp import measure_interp

        result["interp"] = measure_interp(
            args,
            measure_once,
            result,
            height=height,
            width=width,
            device=device,
        )
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_summary(result)
        if "interp" in result:
            print("interp " + json.dumps(result["interp"]))
    return 0


def _quantize(model, scaling: str = "rowwise") -> int:
    from engine.models.fp8 import quantize_linears

    # The blocks hold all but a sliver of the FLOPs; embeddings and head stay in bf16.
    return quantize_linears(
        model, include=lambda name, m: name.startswith("blocks."), scaling=scaling
    )


def measure(
    model, cfg, device, dtype, backend, args, *, height, width, steps, decoder_kind
) -> dict:
    """Run warm-up and measured blocks on one session; return the result record."""
    import torch

    from engine.stream.session import BlockInputs, StreamSession

    tiny = args.model == "tiny"
    cuda = device.type == "cuda"
    vace_on = getattr(args, "vace", False)
    v2v = getattr(args, "v2v", None)
    decoder = encoder = None
    if decoder_kind != "none":
        try:
            from engine.models.decoders import build_decoder
        except ImportError as e:
            raise UsageError(
                f"--decoder {decoder_kind}: engine.models.decoders.build_decoder is not available ({e})"
            ) from None
        decoder, encoder = build_decoder(
            decoder_kind, tiny=tiny, device=device, dtype=dtype, compile=args.compile_decoder
        )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    session = StreamSession(
        model,
        height=height,
        width=width,
        decoder=decoder,
        encoder=encoder,
        device=device,
        dtype=dtype,
        kv_cache=args.kv_cache,
    )
    if vace_on or v2v is not None:
        _attach_inputs(session, model, cfg, args, device, dtype, height, width, encoder)
    g = torch.Generator(device).manual_seed(args.seed)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    text[:, 20:] = 0  # a 20-token prompt, zero past it as the text encoder gives
    inputs = BlockInputs(
        text=text, text_key="bench", steps=steps, seed=args.seed, kv_bias=args.kv_bias
    )
    video = None
    if vace_on or v2v is not None:
        video = SyntheticVideo(height, width, device)
        inputs.vace_scale = args.vace_scale
        inputs.v2v_strength = v2v

    lora = _attach_loras(session, model, args, device, dtype) if args.loras else None

    def block():
        if video is not None:  # 9 frames for the stream's first block, then 12
            inputs.video = video.next(9 if session.index == 0 else STEADY_FRAMES)
        if lora is None:
            return session.next_block(inputs)
        t0 = _mark(cuda)
        lora.step(session.index)
        t1 = _mark(cuda)
        out = session.next_block(inputs)
        ms = _elapsed_ms(t0, t1, cuda)
        out.timings["lora_update"] = ms
        out.timings["total"] = out.timings.get("total", 0.0) + ms
        return out

    first = None
    t_warm = time.perf_counter()
    for _ in range(max(1, args.warmup)):
        out = block()
        first = first or out.timings
    warmup_s = time.perf_counter() - t_warm  # compiles included: time to a steady stream
    measured = [block().timings for _ in range(args.blocks)]

    sync_check = None
    if args.sync_check and cuda:
        # One more block with per-stage timing off (its only wait is the end-of-block event)
        # and CUDA's sync debug mode set to error: any hidden host sync inside the block loop
        # (.item(), a blocking copy, nonzero...) raises here.
        session.timing = False
        torch.cuda.set_sync_debug_mode("error")
        try:
            block()
            sync_check = "clean"
        except RuntimeError as e:
            sync_check = f"host sync: {e}".splitlines()[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            session.timing = True
            torch.cuda.synchronize(device)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            block()
        prof.export_chrome_trace(args.profile)
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30), file=sys.stderr)

    stages = sorted({k for m in measured for k in m if k != "total"}, key=_stage_order)
    block_ms = statistics.median(m["total"] for m in measured)
    stage_ms = {k: statistics.median(m.get(k, 0.0) for m in measured) for k in stages}
    result = {
        "fps": STEADY_FRAMES * 1000.0 / block_ms,
        "frames_per_block": STEADY_FRAMES,
        "block_ms": block_ms,
        "latency_ms": block_ms,  # a control applied at a block's start shows at its end
        "stages_ms": stage_ms,
        "transformer_share": sum(
            statistics.median(m.get(k, 0.0) for m in measured)
            for k in stages
            if k == "recompute" or k.startswith("step")
        )
        / block_ms,
        # A control arriving at a uniformly random moment waits for the next block boundary
        # (half a block at the median), then that block: its frames all come out at its end.
        # A prompt change joins the block in flight at its next step (block_driver.py).
        "latency_median_ms": join_latency_ms(stage_ms, block_ms),
        "latency_median_boundary_ms": 1.5 * block_ms,
        "first_block_ms": first.get("total"),
        "warmup_s": warmup_s,
        "startup_s": {
            "build": getattr(args, "_build_s", None),
            "compile_and_warmup": warmup_s,
            # where compiled code was cached: only meaningful when something compiled
            "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") if args.compile else None,
        },
        "blocks": args.blocks,
        "warmup": max(1, args.warmup),
        "peak_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if cuda
        else None,
        "peak_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "attention": backend,
        "config": {
            "model": args.model,
            **cfg.to_dict(),
            "height": height,
            "width": width,
            "steps": list(steps),
            "kv_bias": args.kv_bias,
            "dtype": {v: k for k, v in DTYPES.items()}[str(dtype).removeprefix("torch.")],
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "fp8": args.fp8_scaling if args.fp8 else False,
            "fused_qkv": not args.no_fuse_qkv,
            # what the cache really holds: --kv-cache bf16 means "the model dtype"
            "kv_cache": kv_cache_name(session.cache),
            "kv_cache_gb": session.cache.nbytes / 2**30,
            "decoder": decoder_kind,
            "anchor": session.anchor_source,
            "tokens_per_frame": session.fsl,
            "vace": {
                "layers": len(session.vace.vace.vcfg.layers),
                "refs": args.vace_refs,
                "scale": args.vace_scale,
                "fp8": bool(args.fp8),
            }
            if vace_on
            else False,
            "v2v": v2v if v2v is not None else False,
            "input": "synthetic moving pattern" if video is not None else None,
        },
    }
    if lora is not None:
        result["lora"] = lora.report()
        result["lora"]["restore_ms"] = lora.restore_ms()
        if cuda:
            result["lora"]["peak_memory_allocated_gb"] = (
                torch.cuda.max_memory_allocated(device) / 2**30
            )
    if args.profile:
        result["profile"] = args.profile
    if sync_check is not None:
        result["sync_check"] = sync_check
    if args.memory_cap_gb is not None:
        result["memory_cap_gb"] = args.memory_cap_gb
    return result


def _mark(cuda: bool):
    import torch

    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed_ms(a, b, cuda: bool) -> float:
    if cuda:
        b.synchronize()
        return a.elapsed_time(b)
    return (b - a) * 1e3


class _BenchLoras:
    """Random rank-R LoRAs in live slots (engine/models/lora.py) on every attention and FFN
    linear; `step` sets this block's strengths as the block driver does."""

    def __init__(self, session, model, args, device, dtype):
        import tempfile

        import torch

        from engine.models.lora import LoraSlots
        from engine.weights.lora import load_lora, read_lora_header

        self.session, self.moving = session, args.lora_moving
        cuda = torch.device(device).type == "cuda"
        before = torch.cuda.memory_allocated(device) if cuda else 0
        self.n = args.loras
        # Still: merge everything at the first still boundary (the steady state the engine
        # reaches after its spread-out merges); moving: merges never happen.
        pristine = device if args.lora_pristine == "device" else "cpu"
        # with --compile, the engine's static shapes (engine/runtime/pipeline.py)
        bucket = 64 if args.compile else None
        self.slots = LoraSlots(
            model,
            pristine_device=pristine,
            merge_per_block=None,
            rank_bucket=bucket,
            remerge=args.lora_pristine == "device",
        )
        self.pristine = args.lora_pristine
        names = [
            f"blocks.{i}.{m}"
            for i in range(model.cfg.layers)
            for m in (
                "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                "ffn.0", "ffn.2",
            )
        ]  # fmt: skip
        shapes = {k: tuple(v.shape) for k, v in _meta_state(model.cfg).items()}
        r = args.lora_rank
        # One file written and read back for the load time (host, bf16, as shipped).
        g = torch.Generator().manual_seed(args.seed + 7)
        sd = {}
        for name in names:
            out_f, in_f = shapes[name + ".weight"]
            sd[f"diffusion_model.{name}.lora_down.weight"] = (
                torch.randn(r, in_f, generator=g) * in_f**-0.5
            ).to(torch.bfloat16)
            sd[f"diffusion_model.{name}.lora_up.weight"] = (
                torch.randn(out_f, r, generator=g) * 0.02
            ).to(torch.bfloat16)
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(r))
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/bench_lora.safetensors"
            save_file(sd, path)
            del sd
            self.file_mb = os.path.getsize(path) / 2**20
            t0 = time.perf_counter()
            lf = load_lora(path, read_lora_header(path))
            first = self.slots.prepare(lf)
            self.load_s = time.perf_counter() - t0
            self.slots.install(0, first)
            for k in range(1, self.n):  # the same file again: its own copy on the device
                self.slots.install(k, self.slots.prepare(lf))
            del lf
        self.updates = 0
        self.merge_kernel = self.slots.warm_merges()  # as the engine does after warm-up
        # device memory the slots hold after loading (allocated, not the transient peak)
        self.held_gb = (torch.cuda.memory_allocated(device) - before) / 2**30 if cuda else None

    def step(self, index: int) -> None:
        import math

        s = [0.8] * self.n + [0.0] * (4 - self.n)
        if self.moving:
            s[0] = 0.5 + 0.4 * math.sin(index)
        if self.slots.update(s):
            self.session.invalidate_text_kv()
        self.updates += 1

    def restore_ms(self) -> float:
        """All strengths to 0 (the pristine weights back), then back to the bench's: the
        stall a performer sees when the last LoRA fades out. Ends on the merged state."""
        import torch

        cuda = self.slots.device.type == "cuda"
        back = [0.8] * self.n + [0.0] * (4 - self.n)
        if cuda:
            torch.cuda.synchronize(self.slots.device)
        t0 = time.perf_counter()
        self.slots.update([0.0] * 4)
        if cuda:
            torch.cuda.synchronize(self.slots.device)
        ms = (time.perf_counter() - t0) * 1e3
        self.slots.update(back)
        self.slots.update(back)
        self.session.invalidate_text_kv()
        return ms

    def report(self) -> dict:
        return {
            "pristine": self.pristine,
            "loras": self.n,
            "moving": self.moving,
            "file_mb": self.file_mb,
            "load_s": self.load_s,
            "device_mb": self.slots.device_bytes / 2**20,
            "side_sites": self.slots.side_sites,
            # moving strengths: re-merged every block (pristine on the device) or side path
            "moving_mechanism": "remerge" if self.slots.remerge else "side path",
            # what the slots hold on the device, by kind (LoraSlots.memory), in bytes
            "device_bytes": self.slots.memory(),
            "held_gb": self.held_gb,
            "merge_kernel": self.merge_kernel,  # fp8 merge variants timed (ms), chosen
        }


def _meta_state(cfg):
    import torch

    from engine.models.wan import WanModel

    with torch.device("meta"):
        return WanModel(cfg).state_dict()


def _attach_loras(session, model, args, device, dtype):
    return _BenchLoras(session, model, args, device, dtype)


class SyntheticVideo:
    """A moving test pattern made on the device (no source thread, no host copy): a drifting
    diagonal grating and an orbiting bright disc, so the context encoder sees motion."""

    def __init__(self, height: int, width: int, device, fps: float = 16.0):
        import torch

        self.fps, self.frame = fps, 0
        y = torch.linspace(-1, 1, height, device=device)[:, None]
        x = torch.linspace(-1, 1, width, device=device)[None, :]
        self.y, self.x = y, x * width / height

    def next(self, count: int):
        import torch

        t = (self.frame + torch.arange(count, device=self.y.device)) / self.fps
        t = t[:, None, None]
        grating = torch.sin(8 * (self.x + self.y) - 4 * t)
        cx, cy = 0.6 * torch.cos(2 * t), 0.5 * torch.sin(2 * t)
        disc = (((self.x - cx) ** 2 + (self.y - cy) ** 2) < 0.1).float()
        rgb = torch.stack([grating, torch.cos(3 * self.y - t).expand_as(grating), disc], 0)
        self.frame += count
        return rgb.clamp(-1, 1)[None]  # [1, 3, T, H, W]


def _attach_inputs(session, model, cfg, args, device, dtype, height, width, encoder) -> None:
    """VACE (random module, random Wan VAE context encoder) and/or the V2V encoder."""
    import numpy as np

    from engine.models import wan_vae
    from engine.stream.v2v import VideoLatentEncoder

    tiny = args.model == "tiny"
    vae = getattr(encoder, "vae", None)
    if vae is None or getattr(vae, "encoder", None) is None:
        vcfg = wan_vae.CONFIGS["tiny" if tiny else "wan2.1"]
        vae = wan_vae.random_wan_vae(vcfg, device=device, dtype=dtype, parts=("encoder",))
        if device.type == "cuda":
            vae.to_channels_last()
    if args.v2v is not None:
        session.video_encoder = VideoLatentEncoder(vae)
    if not args.vace:
        return
    from engine.models.fp8 import quantize_linears
    from engine.models.vace import VACE_CONFIGS, compile_vace, random_vace
    from engine.stream.vace_context import VaceConditioner

    vace = random_vace(cfg, VACE_CONFIGS[args.model], device, dtype, seed=args.seed + 1)
    if not args.no_fuse_qkv:
        from engine.models.wan import fuse_qkv

        fuse_qkv(vace)
    if args.fp8:
        quantize_linears(vace.vace_blocks, scaling=args.fp8_scaling)
    if args.compile:
        compile_vace(vace)
    cond = VaceConditioner(model, vace, vae, height=height, width=width, assets_dir=None)
    if args.compile and device.type == "cuda" and not getattr(args, "vace_encode_eager", False):
        cond.encoder.stream.compile()
    rng = np.random.default_rng(args.seed)
    for n in range(1, args.vace_refs + 1):
        cond.refs.set_frame(n, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    session.vace = cond


def join_latency_ms(stages: dict[str, float], block_ms: float, q: float = 0.5) -> float:
    """The q-quantile of a prompt change's latency (arrival to the end of the block whose
    frames first use it) for arrivals uniform over a block of `block_ms` with these stage
    times. A change joins the block in flight before its next step (any step after the
    recompute pass, not the first step of a block without one): J, the start of the last
    step it can join, is the sum of the stages before that step. Arriving at a <= J it
    shows at the block's end (B - a); later, at the next block's end (2B - a). Uniform a
    makes the latency uniform over [B - J, 2B - J], so the quantile is (1 + q)·B - J; with
    no join point (J = 0) that is the boundary-only (1 + q)·B."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    steps = sorted((k for k in stages if k.startswith("step")), key=_stage_order)
    if not steps:
        return (1.0 + q) * block_ms
    before = sum(v for k, v in stages.items() if _stage_order(k)[0] < 3)
    joinable = steps if "recompute" in stages else steps[1:]
    if not joinable:
        return (1.0 + q) * block_ms
    last = joinable[-1]
    j = before + sum(stages[k] for k in steps if _stage_order(k) < _stage_order(last))
    j = min(j, block_ms)
    return (1.0 + q) * block_ms - j


def _stage_order(name: str) -> tuple[int, int]:
    order = {
        "lora_update": 0,
        "text": 0,
        "v2v_encode": 1,
        "vace_encode": 1,
        "encode": 1,
        "recompute": 2,
        "decode": 9,
    }
    if name.startswith("step"):
        return (3, int(name[4:]))
    return (order.get(name, 8), 0)


def _print_summary(r: dict) -> None:
    c = r["config"]
    print(
        f"{c['model']} {c['width']}x{c['height']} {c['dtype']} steps={c['steps']} kv_bias={c['kv_bias']}"
        f" attention={r['attention']} compile={c['compile']} decoder={c['decoder']}"
    )
    print(f"device: {r['device']}, torch {r['torch']}")
    if c.get("vace") or c.get("v2v") is not False:
        print(f"input: {c['input']}, vace {c['vace']}, v2v {c['v2v']}")
    print(
        f"{r['fps']:.2f} fps ({r['frames_per_block']} frames per {r['block_ms']:.1f} ms block, median of {r['blocks']})"
    )
    for k, v in r["stages_ms"].items():
        print(f"  {k:>10}: {v:8.2f} ms")
    print(f"  transformer share: {100 * r['transformer_share']:.1f}%")
    if r["peak_memory_allocated_gb"] is not None:
        print(
            f"peak memory: {r['peak_memory_allocated_gb']:.2f} GB allocated,"
            f" {r['peak_memory_reserved_gb']:.2f} GB reserved"
        )
