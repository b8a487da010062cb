"""Building the Wan transformer: from a checkpoint file, or with random weights for bench
and tests. Both build on the meta device first, so the 14B model never exists twice
(nor in float32) in host memory."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.attention import select_backend
from engine.models.wan import WanConfig, WanModel, cast_model, init_random_, is_fp32_param
from engine.weights.checkpoint import assign_state_dict, load_checkpoint, strip_prefix


def load_transformer(
    path: str | Path,
    cfg: WanConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: str | None = None,
) -> WanModel:
    """Load a Wan-native checkpoint (e.g. `krea-realtime-video-14b.safetensors`; a leading
    `model.` on every key is stripped). Tensors go straight from the memory-mapped file to
    `device` in `dtype`, except the small float32 modulation tables (FP32_PARAMS).

    The attention backend is chosen here, once (`attention` forces one; see
    engine.models.attention.select_backend). Raises WeightsError naming the file (and key,
    shapes) on any mismatch."""
    sd = strip_prefix(load_checkpoint(path))
    with torch.device("meta"):
        model = WanModel(cfg)
    assign_state_dict(model, sd, file=path, dtype=dtype, device=device)
    # The float32 tables come from the file itself, not from a round trip through dtype.
    params = dict(model.named_parameters())
    for k, p in params.items():
        if is_fp32_param(k):
            p.data = sd[k].to(device=device, dtype=torch.float32)
    model.set_attention(select_backend(attention, device))
    return model.eval().requires_grad_(False)


def random_transformer(
    cfg: WanConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attention: str | None = None,
) -> WanModel:
    """A model with random weights made directly on `device` (meta, then to_empty, then an
    in-place init there): `dreamdeck bench` runs the 14B without a download or a host copy."""
    with torch.device("meta"):
        model = cast_model(WanModel(cfg), dtype)
    model = model.to_empty(device=device)
    model.set_attention(select_backend(attention, device))
    return init_random_(model, seed).eval().requires_grad_(False)
