"""The frame decoder and anchor encoder a stream session uses, by name.

`build_decoder("wan" | "tae", ...)` returns (FrameDecoder, AnchorEncoder) as described in
docs/interfaces.md. For "tae" the anchor is encoded by Wan's VAE encoder by default: the
anchor becomes the first context latent of every block, and TAEHV's encoder (trained to
approximate Wan's) has not been shown to match Wan's latent of a single image closely
enough to be trusted there; Wan's image encode costs ~18 ms at 832x480 (bf16). Pass
`anchor="tae"` to use TAEHV's encoder instead (much cheaper; quality unmeasured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from engine.models import taehv, wan_vae


class FrameDecoder(Protocol):
    def reset(self) -> None: ...
    def decode(self, latents: Tensor) -> Tensor: ...


class AnchorEncoder(Protocol):
    def encode_image(self, frame: Tensor) -> Tensor: ...


def _wan(tiny: bool, device, dtype, path, parts) -> wan_vae.WanVAE:
    if path is None:
        cfg = wan_vae.CONFIGS["tiny" if tiny else "wan2.1"]
        return wan_vae.random_wan_vae(cfg, device=device, dtype=dtype, parts=parts)
    return wan_vae.load_wan_vae(path, device, dtype, parts=parts)


def build_decoder(
    kind: Literal["wan", "tae"],
    *,
    tiny: bool,
    device: str | torch.device,
    dtype: torch.dtype,
    path: str | Path | None = None,
    vae_path: str | Path | None = None,
    anchor: Literal["wan", "tae"] = "wan",
    channels_last: bool | None = None,
    compile: bool = False,
) -> tuple[FrameDecoder, AnchorEncoder]:
    """Decoder and anchor encoder; random weights when `path` is None (tiny configs when
    `tiny`). `path` is the decoder's file (`Wan2.1_VAE.pth` or `taew2_1.pth`); for "tae"
    with the Wan anchor, `vae_path` is `Wan2.1_VAE.pth` (only its encoder is kept).

    `channels_last` (default: on CUDA) stores conv weights channels-last (measured on an
    H100 for diffusers' Wan VAE: 283 -> 253 ms a block at 832x480); `compile` wraps the
    decoder and the anchor encoder in torch.compile."""
    dec, enc = _build(kind, tiny, device, dtype, path, vae_path, anchor)
    if channels_last if channels_last is not None else torch.device(device).type == "cuda":
        models = (getattr(obj, name, None) for obj in (dec, enc) for name in ("vae", "tae"))
        for model in {id(m): m for m in models if m is not None}.values():
            model.to_channels_last()
    if compile:
        dec.compile()
        if hasattr(enc, "compile"):
            enc.compile()
    return dec, enc


def _build(kind, tiny, device, dtype, path, vae_path, anchor) -> tuple:
    if kind == "wan":
        vae = _wan(tiny, device, dtype, path, ("encoder", "decoder"))
        return wan_vae.WanStreamDecoder(vae), wan_vae.WanImageEncoder(vae)
    if kind != "tae":
        raise ValueError(f"unknown decoder kind {kind!r}: use 'wan' or 'tae'")
    if anchor not in ("wan", "tae"):
        raise ValueError(f"unknown anchor encoder {anchor!r}: use 'wan' or 'tae'")
    if anchor == "wan" and path is not None and vae_path is None:
        raise ValueError(
            "the TAEHV decoder encodes its anchor with the Wan VAE encoder: give vae_path"
            " (Wan2.1_VAE.pth) or anchor='tae'"
        )
    if path is None:
        tae = taehv.random_taehv(
            taehv.CONFIGS["tiny" if tiny else "taew2_1"], device=device, dtype=dtype
        )
    else:
        tae = taehv.load_taehv(path, device, dtype)
    if anchor == "tae":
        return taehv.TAEHVStreamDecoder(tae), taehv.TAEHVImageEncoder(tae)
    enc = _wan(tiny, device, dtype, vae_path, ("encoder",))
    return taehv.TAEHVStreamDecoder(tae), wan_vae.WanImageEncoder(enc)
