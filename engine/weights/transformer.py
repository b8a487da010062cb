"""Building the Wan transformer: from a checkpoint file, or with random weights for bench
and tests. Both build on the meta device first, so the 14B model never exists twice
(nor in float32) in host memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engine.models.attention import select_backend
from engine.models.wan import (
    WanConfig,
    WanModel,
    cast_model,
    fuse_qkv,
    init_random_,
    is_fp32_param,
)
from engine.weights.checkpoint import (
    assign_state_dict,
    check_state_dict,
    load_checkpoint,
    materialize_,
    strip_prefix,
)

# Called on each transformer block right after it exists on the device in the model dtype:
# fuse q/k/v, quantise to fp8. Building block by block keeps the peak at the prepared model
# plus one bf16 block (0.7 GB for 14B), so a 14B fp8 model builds on a 24 GB card.
PrepareBlock = Callable[[nn.Module], None]


def block_preparer(
    *, fuse: bool = True, fp8: bool = False, scaling: str = "rowwise"
) -> PrepareBlock | None:
    """What to do to each block as it is built: fuse q/k/v (same math, one GEMM) and/or
    replace its linears by fp8 ones (engine/models/fp8.py)."""
    if not (fuse or fp8):
        return None

    def prepare(block: nn.Module) -> None:
        if fuse:
            fuse_qkv(block)
        if fp8:
            from engine.models.fp8 import quantize_linears

            quantize_linears(block, scaling=scaling)

    return prepare


def load_transformer(
    path: str | Path,
    cfg: WanConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: str | None = None,
    prepare_block: PrepareBlock | None = None,
) -> WanModel:
    """Load a Wan-native checkpoint (e.g. `krea-realtime-video-14b.safetensors`; a leading
    `model.` on every key is stripped). Tensors go straight from the memory-mapped file to
    `device` in `dtype`, except the small float32 modulation tables (FP32_PARAMS), one
    block at a time; `prepare_block` (see `block_preparer`) runs on each block as it lands.

    The attention backend is chosen here, once (`attention` forces one; see
    engine.models.attention.select_backend). Raises WeightsError naming the file (and key,
    shapes) on any mismatch, before anything is put on the device."""
    sd = strip_prefix(load_checkpoint(path))
    with torch.device("meta"):
        model = WanModel(cfg)
    check_state_dict(model, sd, file=path)
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        _assign(block, part, path, dtype, device, prefix)
        if prepare_block is not None:
            prepare_block(block)
    rest = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    _assign(model, rest, path, dtype, device, "")
    model.set_attention(select_backend(attention, device))
    return model.eval().requires_grad_(False)


def _assign(module: nn.Module, sd: dict, path, dtype, device, prefix: str) -> None:
    assign_state_dict(module, sd, file=path, dtype=dtype, device=device, strict=False)
    # The float32 tables come from the file itself, not from a round trip through dtype.
    for k, p in module.named_parameters():
        if k in sd and is_fp32_param(prefix + k):
            p.data = sd[k].to(device=device, dtype=torch.float32)


def random_transformer(
    cfg: WanConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attention: str | None = None,
    prepare_block: PrepareBlock | None = None,
) -> WanModel:
    """A model with random weights made directly on `device` (meta, then empty, then an
    in-place init there), block by block like `load_transformer`: `dreamdeck bench` runs
    the 14B without a download or a host copy. The weights do not depend on
    `prepare_block` (the same random draws in the same order)."""
    with torch.device("meta"):
        model = cast_model(WanModel(cfg), dtype)
    gens: dict = {}
    for name, child in model.named_children():
        parts = child if name == "blocks" else [child]
        for part in parts:
            materialize_(part, device)
            init_random_(part, seed, generators=gens)
            if name == "blocks" and prepare_block is not None:
                prepare_block(part)
    model.set_attention(select_backend(attention, device))
    return model.eval().requires_grad_(False)
