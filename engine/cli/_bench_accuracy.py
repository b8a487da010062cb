"""`dreamdeck bench --accuracy` and `--drift N`: what the lossy speed-ups cost in error.

--accuracy: fp8 weights against the model dtype (bf16 on a GPU), same random weights and
inputs. Per layer, two numbers: the layer alone (both layers fed the same bf16 input) and
accumulated (each model fed its own previous layer); then the latents of whole stream
blocks (block 0, then block 1 with the recompute pass and the KV bias).

--drift N: the fp8 KV cache against the exact one: the same model, seed and text, N blocks
each, the relative error of every block's latents. Errors can grow over blocks because each
block's context is the previous block's output; this shows how fast.

Relative error = ||a - b|| / ||b|| over the whole tensor, computed in float32.
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _text(cfg, device, dtype, seed: int) -> Tensor:
    g = torch.Generator(device).manual_seed(seed)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    text[:, 20:] = 0
    return text


def _stream(model, height, width, steps, seed, text, blocks, kv_cache="bf16") -> list[Tensor]:
    from engine.stream.session import BlockInputs, StreamSession

    sess = StreamSession(model, height=height, width=width, timing=False, kv_cache=kv_cache)
    inputs = BlockInputs(text=text, text_key="acc", steps=steps, seed=seed, kv_bias=0.3)
    return [sess.next_block(inputs).latents.clone() for _ in range(blocks)]


@torch.no_grad()
def layer_errors(ref, test, height, width, seed, text) -> list[dict]:
    """Per-layer errors of `test` against `ref` on one first-block forward (3 frames at
    t = 1000, positions 0..2)."""
    from engine.models.wan import rope_table

    cfg, device = ref.cfg, ref.device
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 3, height // 8, width // 8, generator=g, device=device)
    t = torch.full((1,), 1000.0, device=device)
    hp, wp = height // 16, width // 16
    cos, sin = rope_table(cfg, (0, 1, 2), hp, wp, device)
    out = []
    _, e0 = ref.embed_time(t)
    h_ref = ref.patchify(x)
    h_test = test.patchify(x)
    for i, (br, bt, kr, kt) in enumerate(
        zip(ref.blocks, test.blocks, ref.cross_kv(text), test.cross_kv(text), strict=True)
    ):
        alone = bt(h_ref, e0, kt, cos, sin, test.attn)
        h_next = br(h_ref, e0, kr, cos, sin, ref.attn)
        h_test = bt(h_test, e0, kt, cos, sin, test.attn)
        out.append(
            {"layer": i, "alone": rel_err(alone, h_next), "accumulated": rel_err(h_test, h_next)}
        )
        h_ref = h_next
    return out


def run_accuracy(args, cfg, device, dtype, backend, height, width, steps) -> dict:
    """Build what the flags ask for and return the report (printed by bench)."""
    from engine.weights.transformer import block_preparer, random_transformer

    text = _text(cfg, device, dtype, args.seed)
    ref = random_transformer(
        cfg, device, dtype, seed=args.seed, attention=backend, prepare_block=block_preparer()
    )
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "height": height,
        "width": width,
        "steps": list(steps),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": backend,
    }
    blocks = max(2, args.drift or 2)
    base = _stream(ref, height, width, steps, args.seed, text, blocks)
    if args.accuracy:
        fp8 = block_preparer(fp8=True, scaling=args.fp8_scaling)  # the same random weights
        test = random_transformer(
            cfg, device, dtype, seed=args.seed, attention=backend, prepare_block=fp8
        )
        layers = layer_errors(ref, test, height, width, args.seed, text)
        got = _stream(test, height, width, steps, args.seed, text, 2)
        report["fp8_weights"] = {
            "scaling": args.fp8_scaling,
            "layer_alone_median": statistics.median(r["alone"] for r in layers),
            "layer_alone_max": max(r["alone"] for r in layers),
            "after_last_layer": layers[-1]["accumulated"],
            "block_latents": [rel_err(a, b) for a, b in zip(got, base, strict=False)],
            "layers": layers,
        }
        del test
    if args.drift:
        got = _stream(ref, height, width, steps, args.seed, text, blocks, kv_cache="fp8")
        report["fp8_kv_cache_drift"] = [rel_err(a, b) for a, b in zip(got, base, strict=True)]
    return report


def print_report(r: dict) -> None:
    print(
        f"{r['model']} {r['width']}x{r['height']} steps {r['steps']} {r['dtype']} on {r['device']}"
    )
    f = r.get("fp8_weights")
    if f:
        print(
            f"fp8 weights ({f['scaling']}): one layer alone median {f['layer_alone_median']:.2%}"
            f" max {f['layer_alone_max']:.2%}; after all layers {f['after_last_layer']:.2%};"
            f" block latents {', '.join(f'{e:.2%}' for e in f['block_latents'])}"
        )
    d = r.get("fp8_kv_cache_drift")
    if d:
        print("fp8 KV cache, latents per block: " + ", ".join(f"{e:.2%}" for e in d))
