"""The 96-channel VACE context of each block, and reference images (docs/streaming-model.md §6).

Per latent frame, in this channel order (Wan's VACE and diffusers' `WanVACEPipeline`):
- 16: VAE(frames · (1 − mask)), the "inactive" part to keep,
- 16: VAE(frames · mask), the "reactive" part to regenerate,
- 64: the mask folded 8×8 into channels (channel = 8·row offset + column offset), resampled
  in time to the latent count with nearest-exact interpolation.
As in diffusers, the mask is binarised at 0.5 for the two encodes (hard split of the
pixels) and kept as given (clamped to 0..1) in the 64 mask channels; no mask means all
ones (regenerate everything, guided by the control video).

Streaming: the two VAE encodes run as one batch of 2 through one streaming encoder whose
causal cache is carried across blocks, so a stream of blocks (9 frames, then 12 each)
gives the latents of encoding the whole video at once. The mask's time resampling is done
per block (9 -> 3, then 12 -> 3 latents: frames 1, 4, 7 of the first block and frames
2, 6, 10 of later blocks, nearest-exact), which is diffusers' rule applied to each block.

Reference images (up to 3, slots 1..3): read from a path inside the assets folder (no
other path is accepted: paths come over the network), or taken from a frame grabbed from
an input source; cropped to fill the output size, VAE-encoded once as single images and
cached by (file, modification time, size); set and cleared live. Their context is the
16 latent channels zero-padded to 96 (mask channels zero: "keep").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.models.vace import MAX_REFS
from engine.models.wan_vae import TEMPORAL, WanImageEncoder, WanStreamEncoder, WanVAE

SPATIAL = 8
MASK_CHANNELS = SPATIAL * SPATIAL
CONTEXT_CHANNELS = 16 + 16 + MASK_CHANNELS


class AssetPathError(ValueError):
    """A reference image path outside the assets folder, missing, or not an image."""


def fold_mask(mask: Tensor, latents: int) -> Tensor:
    """[B, 1, T, H, W] in 0..1 -> [B, 64, latents, H/8, W/8]: 8×8 pixel cells into channels
    (row offset major), nearest-exact in time."""
    b, c, t, hh, ww = mask.shape
    if c != 1 or hh % SPATIAL or ww % SPATIAL:
        raise ValueError(
            f"mask must be [B, 1, T, H, W] with H, W multiples of 8, got {list(mask.shape)}"
        )
    m = mask.clamp(0.0, 1.0).view(b, t, hh // SPATIAL, SPATIAL, ww // SPATIAL, SPATIAL)
    m = m.permute(0, 3, 5, 1, 2, 4).reshape(b, MASK_CHANNELS, t, hh // SPATIAL, ww // SPATIAL)
    return F.interpolate(m, size=(latents, hh // SPATIAL, ww // SPATIAL), mode="nearest-exact")


class VaceContextEncoder:
    """Frames (+ mask) of each block -> the block's [1, 96, n, h, w] VACE context."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.stream = WanStreamEncoder(vae)

    def reset(self) -> None:
        """Stream reset (or a change of source): the next block is a video start again."""
        self.stream.reset()

    @property
    def started(self) -> bool:
        return self.stream.started

    @torch.no_grad()
    def encode_block(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        """frames [1, 3, T, H, W] in [-1, 1], mask [1, 1, T, H, W] in 0..1 or None (all
        ones) -> [1, 96, n, h, w].

        T = 1 + 4k is a video start (the stream's first block: 9 frames): the causal
        cache starts afresh. T = 4k continues the stream (12 frames: 3 latents); if there
        is nothing to continue (after `reset`, or an input that came back after a loss)
        the block's first frame is put once more in front, encoded as the video start,
        and its latent dropped, so the block still gives T/4 latents."""
        if frames.dim() != 5 or frames.shape[0] != 1 or frames.shape[1] != 3:
            raise ValueError(f"VACE frames must be [1, 3, T, H, W], got {list(frames.shape)}")
        t = frames.shape[2]
        if t % TEMPORAL not in (0, 1) or t == 0:
            raise ValueError(f"VACE frames: got {t} per block, need 1 + 4k (a start) or 4k")
        if mask is None:
            mask = frames.new_ones(1, 1, *frames.shape[2:])
        elif tuple(mask.shape) != (1, 1, *frames.shape[2:]):
            raise ValueError(
                f"VACE mask must be [1, 1, {t}, {frames.shape[3]}, {frames.shape[4]}] like the"
                f" frames, got {list(mask.shape)}"
            )
        n = (t - 1) // TEMPORAL + 1 if t % TEMPORAL else t // TEMPORAL
        lead = 0
        if t % TEMPORAL == 1:
            self.stream.reset()
        elif not self.stream.started:
            frames = torch.cat([frames[:, :, :1], frames], dim=2)
            mask_in = torch.cat([mask[:, :, :1], mask], dim=2)
            lead = 1
        dtype = self.vae.conv1.weight.dtype
        m = (mask_in if lead else mask) > 0.5
        m = m.to(frames.dtype)
        both = torch.cat([frames * (1 - m), frames * m], dim=0).to(dtype)
        z = self.stream.encode(both)[:, :, lead:]  # [2, 16, n, h, w]
        folded = fold_mask(mask.float(), n).to(z.dtype)
        return torch.cat([z[:1], z[1:], folded], dim=1)


# --------------------------------------------------------------------------- reference images


def resolve_in_assets(path: str | os.PathLike, assets_dir: str | os.PathLike | None) -> Path:
    """The real path of `path` (relative paths are taken inside `assets_dir`) if it is a file
    inside `assets_dir` after resolving links; else AssetPathError. One implementation for
    every network path: engine/assets.py's `resolve_asset`."""
    from engine.assets import AssetError, resolve_asset

    if assets_dir is None:
        raise AssetPathError(
            f"reference image {str(path)!r}: no assets folder is set (start dreamdeck with"
            " --assets DIR)"
        )
    try:
        return resolve_asset(path, assets_dir)
    except AssetError as e:
        raise AssetPathError(f"reference image {e}") from None


def crop_to_fill(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W, 3+] uint8 -> [height, width, 3] uint8: scaled to cover, centre-cropped."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    s = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    x0, y0 = (w - width) // 2, (h - height) // 2
    return np.asarray(img.crop((x0, y0, x0 + width, y0 + height)))


def load_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise AssetPathError(
            f"reference image {str(path)!r} cannot be read as an image: {e}"
        ) from None


def to_model_frame(rgb: np.ndarray, device=None, dtype=torch.float32) -> Tensor:
    """[H, W, 3] uint8 -> [1, 3, 1, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(rgb[..., :3], copy=True)).to(device)
    return x.permute(2, 0, 1)[None, :, None].to(dtype) / 127.5 - 1.0


class ReferenceImages:
    """Up to 3 reference slots, encoded once and cached; cheap to query every block.

    `version` changes whenever the set changes (phase 2 rebuilds the fixed noise and the
    VACE rope then)."""

    def __init__(
        self,
        vae: WanVAE,
        width: int,
        height: int,
        assets_dir: str | os.PathLike | None,
        *,
        seed: int = 0,
    ):
        self.encoder = WanImageEncoder(vae)
        self.vae = vae
        self.width, self.height = width, height
        self.assets_dir = None if assets_dir is None else Path(assets_dir)
        self.seed = seed
        self._slots: list[tuple[object, Tensor] | None] = [None] * MAX_REFS
        self._cache: dict[tuple, Tensor] = {}
        self.version = 0
        self._stacked: tuple[int, Tensor | None, Tensor | None, Tensor | None] | None = None

    def _slot(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REFS:
            raise ValueError(f"reference slot must be 1..{MAX_REFS}, got {n!r}")
        return n - 1

    @property
    def device(self) -> torch.device:
        return self.vae.conv1.weight.device

    def _encode(self, rgb: np.ndarray) -> Tensor:
        frame = to_model_frame(crop_to_fill(rgb, self.width, self.height), self.device)
        return self.encoder.encode_image(frame.to(self.vae.conv1.weight.dtype)).float()

    def set_path(self, n: int, path: str | os.PathLike) -> None:
        """Slot n from an image file in the assets folder. All checks happen before the
        slot changes: a bad path leaves the set as it was."""
        i = self._slot(n)
        full = resolve_in_assets(path, self.assets_dir)
        st = full.stat()
        key = (str(full), st.st_mtime_ns, st.st_size, self.width, self.height)
        lat = self._cache.get(key)
        if lat is None:
            lat = self._encode(load_image(full))
            self._cache[key] = lat
        self._put(i, key, lat)

    def set_frame(self, n: int, rgba: np.ndarray) -> None:
        """Slot n from a frame (e.g. grabbed from an input source), [H, W, 3|4] uint8."""
        i = self._slot(n)
        if not isinstance(rgba, np.ndarray) or rgba.dtype != np.uint8 or rgba.ndim != 3:
            raise ValueError("a reference frame must be a uint8 [H, W, 3|4] array")
        self._put(i, ("frame", self.version), self._encode(rgba))

    def clear(self, n: int | None = None) -> None:
        """Clear slot n, or all slots."""
        if n is None:
            changed = any(s is not None for s in self._slots)
            self._slots = [None] * MAX_REFS
        else:
            i = self._slot(n)
            changed = self._slots[i] is not None
            self._slots[i] = None
        if changed:
            self.version += 1

    def _put(self, i: int, key, lat: Tensor) -> None:
        if self._slots[i] is None or self._slots[i][0] != key:
            self._slots[i] = (key, lat)
            self.version += 1

    @property
    def count(self) -> int:
        return sum(s is not None for s in self._slots)

    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(latents [1, 16, r, h, w], context [1, 96, r, h, w], fixed noise [1, 16, r, h, w])
        of the filled slots in slot order; (None, None, None) when none is set."""
        if self._stacked is not None and self._stacked[0] == self.version:
            return self._stacked[1:]
        lats = [s[1] for s in self._slots if s is not None]
        if not lats:
            out = (None, None, None)
        else:
            lat = torch.cat(lats, dim=2)
            pad = lat.new_zeros(1, CONTEXT_CHANNELS - lat.shape[1], *lat.shape[2:])
            g = torch.Generator(lat.device).manual_seed(self.seed)
            noise = torch.randn(lat.shape, generator=g, device=lat.device, dtype=lat.dtype)
            out = (lat, torch.cat([lat, pad], dim=1), noise)
        self._stacked = (self.version, *out)
        return out


# --------------------------------------------------------------------------- per-block glue


class VaceConditioner:
    """Everything the VACE branch needs per block and per step, for the stream session:
    the context encoder, the reference images, the VACE cross-attention K/V (cached per
    text key) and the rope tables (per reference count).

    Per block: `prepare_block(frames, mask, text, text_key)` (frames None: text only, no
    hints this block). Per denoising step: `step_inputs(sigma, scale)` -> VaceInputs or
    None, to pass to `forward_stream_vace(..., vin=...)`. The recompute pass gets none.
    """

    def __init__(self, model, vace, vae: WanVAE, *, height: int, width: int, assets_dir):
        from engine.models.vace import vace_rope

        self.model, self.vace = model, vace
        self.encoder = VaceContextEncoder(vae)
        self.refs = ReferenceImages(vae, width, height, assets_dir)
        hp, wp = height // 8 // model.cfg.patch[1], width // 8 // model.cfg.patch[2]
        self._ropes = {
            r: vace_rope(model.cfg, r, hp, wp, model.device) for r in range(MAX_REFS + 1)
        }
        self._text_key = None
        self._cross = None
        self.ctx: Tensor | None = None

    def reset(self) -> None:
        self.encoder.reset()
        self.ctx = None

    def prepare_block(
        self, frames: Tensor | None, mask: Tensor | None, text: Tensor, text_key
    ) -> None:
        """Encode this block's context (or drop it: text only). Cross K/V follow the text."""
        if frames is None:
            self.ctx = None
            return
        dev = self.model.device
        self.ctx = self.encoder.encode_block(frames.to(dev), None if mask is None else mask.to(dev))
        self.set_text(text, text_key)

    def set_text(self, text: Tensor, text_key) -> None:
        """The VACE blocks' cross K/V for `text` (also when a text joins a block in flight)."""
        from engine.models.vace import vace_cross_kv

        if self._cross is None or text_key != self._text_key:
            self._cross = vace_cross_kv(self.model, self.vace, text.to(self.model.device))
            self._text_key = text_key

    def step_inputs(self, sigma: float, scale: float):
        """VaceInputs for a denoising step at noise level `sigma`, or None (no context)."""
        from engine.models.vace import VaceInputs, noised_refs

        if self.ctx is None:
            return None
        lat, rctx, noise = self.refs.tensors()
        r = 0 if lat is None else lat.shape[2]
        refs_x = None if lat is None else noised_refs(lat, noise, sigma)
        return VaceInputs(self.ctx, self._cross, self._ropes[r], rctx, refs_x, scale)
