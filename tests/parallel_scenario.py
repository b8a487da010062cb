"""The block sequence the sequence-parallel tests run, and the rank-0 process that runs it
over N gloo ranks (`python tests/parallel_scenario.py --world N --out DIR`).

The test runs the same `scenario` in its own process on the plain model (the reference);
this script runs it as rank 0 of a real N-process world (engine.parallel.launch), with
the followers writing what they ran into DIR (RankSpec.trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.models.wan import WanConfig  # noqa: E402

# 4 heads (the shipped tiny config has 2): N = 2 and 4 both divide them; 64x96 gives
# 3 x 24 = 72 tokens a block, divisible by 2, 3, 4.
CFG4 = WanConfig(dim=64, ffn_dim=128, heads=4, layers=2, text_dim=32, text_len=16, freq_dim=32)
HEIGHT, WIDTH = 64, 96
STEPS = [1000, 750, 500]


# "base": fused q/k/v, float32 weights and cache, cross-attention K/V of all heads on each
# rank. "fp8": everything else: fp8 weights (row-wise), fp8 KV cache, q/k/v unfused, the
# cross-attention K/V split by heads.
VARIANTS = {
    "base": {},
    "fp8": {"fp8": True, "kv_cache": "fp8", "fuse_qkv": False, "cross": "heads"},
}


def spec(world_trace: str | None = None, timeout_s: float = 60.0, variant: str = "base"):
    from engine.parallel.launch import RankSpec

    return RankSpec(
        cfg=CFG4,
        height=HEIGHT,
        width=WIDTH,
        seed=3,
        trace=world_trace,
        timeout_s=timeout_s,
        **VARIANTS[variant],
    )


def texts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(1, CFG4.text_len, CFG4.text_dim, generator=g)
    b = torch.randn(1, CFG4.text_len, CFG4.text_dim, generator=g)
    return a, b


def build_session(model, kv_cache: str = "bf16"):
    """The session rank 0 (and the reference) drives: a tiny decoder and anchor encoder,
    so the VAE-anchor path (block 2 on) runs; their random weights from a fixed seed.
    TAEHV decodes and the Wan VAE encodes the anchor, as in the shipped presets: the tiny
    Wan VAE decoder would cost 30 times the transformer's CPU time per block (1.4 s at
    64x96), in every world and reference, and only rank 0 ever decodes."""
    from engine.models.decoders import build_decoder
    from engine.stream.session import StreamSession

    torch.manual_seed(0)
    dec, enc = build_decoder("tae", anchor="wan", tiny=True, device="cpu", dtype=torch.float32)
    return StreamSession(
        model,
        height=HEIGHT,
        width=WIDTH,
        decoder=dec,
        encoder=enc,
        timing=False,
        kv_cache=kv_cache,
    )


# (text, key, kv_bias): block 1 is the first recompute with the bias, block 2 the first
# VAE anchor and a bias change, block 3 a prompt change, block 4 bias 1 (no bias); then
# a reset and two blocks again.
PLAN = [("a", 0.3), ("a", 0.3), ("a", 0.7), ("b", 0.7), ("b", 1.0), "reset", ("b", 0.3), ("b", 0.3)]


def scenario(session, mark=lambda snapshot: None) -> list[torch.Tensor]:
    """Run PLAN on `session`; `mark(snapshot)` is called before each block (rank 0 sends
    it with the block). Returns each block's latents."""
    from engine.stream.session import BlockInputs

    a, b = texts()
    out = []
    for i, step in enumerate(PLAN):
        if step == "reset":
            session.reset()
            continue
        key, bias = step
        mark({"step": i, "prompt": key, "kv_bias": bias})
        inputs = BlockInputs(
            text=a if key == "a" else b, text_key=key, steps=STEPS, seed=7, kv_bias=bias
        )
        out.append(session.next_block(inputs).latents.clone())
    return out


def main() -> int:
    from engine.parallel import ulysses
    from engine.parallel.launch import World, build_model

    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    world = World.start(spec(str(out), args.timeout, args.variant), args.world)
    try:
        model = build_model(world.spec, torch.device("cpu"))
        leader = world.attach(build_session(model, world.spec.kv_cache))
        snaps = []

        def mark(s):
            leader.control_snapshot = s
            snaps.append({"index": leader.index, **s})

        first = scenario(leader, mark)
        leader.reset()
        # the same seed again: must replay bit for bit; count one steady block's traffic
        # (block 1: the recompute pass and 3 steps) on the way
        replay = []
        for i in range(len(first)):
            if i == 1:
                ulysses.TRAFFIC = ulysses.Traffic()
            replay.extend(scenario_block(leader, i))
            if i == 1:
                traffic = ulysses.TRAFFIC
                ulysses.TRAFFIC = None
        torch.save({"first": first, "replay": replay}, out / "leader.pt")
        (out / "leader.json").write_text(
            json.dumps(
                {
                    "snapshots": snaps,
                    "traffic": {"bytes": traffic.bytes, "all_to_alls": traffic.all_to_alls},
                    "kv_heads": leader.cache[0].k.shape[2],
                    "pids": [p.pid for p in world.procs],
                }
            )
        )
    finally:
        ranks = world.close(world.leader)
    print(json.dumps({"ranks": ranks}))
    return 0


def scenario_block(session, i: int) -> list[torch.Tensor]:
    """Block i of PLAN's blocks (the reset runs before the block that follows it)."""
    from engine.stream.session import BlockInputs

    a, b = texts()
    blocks = [s for s in PLAN if s != "reset"]
    reset_before = PLAN.index("reset")  # blocks before the reset
    if i == reset_before:
        session.reset()
    key, bias = blocks[i]
    inputs = BlockInputs(
        text=a if key == "a" else b, text_key=key, steps=STEPS, seed=7, kv_bias=bias
    )
    return [session.next_block(inputs).latents.clone()]


if __name__ == "__main__":
    sys.exit(main())
