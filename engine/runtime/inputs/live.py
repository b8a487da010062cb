"""One live input as the block loop sees it: a source chosen by a spec string
(`vace/source`), its frames resampled and resized for each block, an optional mask, and
the fallback when the source stops.

`LiveInput.block(count, span)` never blocks and never raises for a missing source: it
returns a `BlockVideo` whose `frames` is None in text-only mode.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.runtime.input_names import MASK_MODES, SOURCE_KINDS
from engine.runtime.inputs.base import (
    FIT_MODES,
    InputError,
    InputSource,
    block_times,
    resample,
    to_video,
)
from engine.runtime.inputs.fallback import HOLDING, LIVE, TEXT_ONLY, InputFallback

log = logging.getLogger(__name__)

KINDS = SOURCE_KINDS  # the names are kept torch-free for the control registry


def open_source(spec: str, *, assets_dir: str | os.PathLike | None = None) -> InputSource | None:
    """`shm:NAME`, `file:PATH`, `ndi:NAME`, `spout:NAME`, `camera:DEVICE` or `none`.

    With `assets_dir` (specs from the network), a file must lie inside it. The source is
    returned not yet started. Raises InputError naming the problem."""
    if not isinstance(spec, str):
        raise InputError(f"input source must be a string like shm:NAME, got {spec!r}")
    spec = spec.strip()
    if spec.lower() in ("", "none", "off"):
        return None
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    if not sep or kind not in KINDS or not arg:
        raise InputError(
            f"input source {spec!r}: use shm:NAME, file:PATH, ndi:NAME, spout:NAME,"
            " camera:DEVICE or none"
        )
    if kind == "shm":
        from engine.runtime.inputs.shm_input import ShmInput
        from engine.runtime.shm_ring import _valid_name

        try:
            _valid_name(arg)
        except ValueError as e:
            raise InputError(f"input source {spec!r}: {e}") from None
        return ShmInput(arg)
    if kind == "file":
        from engine.runtime.inputs.file_input import FileInput

        path = arg
        if assets_dir is not None:
            from engine.stream.vace_context import AssetPathError, resolve_in_assets

            try:
                path = resolve_in_assets(arg, assets_dir)
            except AssetPathError as e:
                raise InputError(str(e).replace("reference image", "video file")) from None
        return FileInput(path)
    if kind == "ndi":
        from engine.runtime.inputs.ndi_input import NdiInput

        return NdiInput(arg)
    if kind == "spout":
        from engine.runtime.inputs.spout_input import SpoutInput

        return SpoutInput(arg)
    from engine.runtime.inputs.camera_input import CameraInput

    return CameraInput(arg)


@dataclass
class BlockVideo:
    """One block's input. frames None <=> text only (no VACE context this block)."""

    state: str  # live | holding | text_only
    frames: Tensor | None  # [1, 3, T, H, W] in [-1, 1]
    mask: Tensor | None  # [1, 1, T, H, W] in 0..1; None = all ones
    restart: bool  # first block with frames after none: a new video for the encoders
    message: str
    timestamps: list[float] = field(default_factory=list)


class LiveInput:
    def __init__(
        self,
        width: int,
        height: int,
        *,
        fit: str = "fill",
        mask: str = "ones",
        assets_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        hold_s: float = 1.0,
        on_status: Callable[[str, str], None] | None = None,
    ):
        self.width, self.height = width, height
        self.fit = fit
        self.mask_mode = mask
        self._check(fit, mask)
        self.assets_dir = assets_dir
        self.device = device
        self.hold_s = hold_s
        self.on_status = on_status
        self.source: InputSource | None = None
        self.mask_source: InputSource | None = None
        self.spec = "none"
        self.fallback = InputFallback("input none", hold_s=hold_s, on_change=on_status)
        self._had_frames = False

    @staticmethod
    def _check(fit: str, mask: str) -> None:
        if fit not in FIT_MODES:
            raise InputError(f"resize mode must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        if mask not in MASK_MODES:
            raise InputError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mask!r}")

    def set_options(self, *, fit: str | None = None, mask: str | None = None) -> None:
        fit, mask = fit or self.fit, mask or self.mask_mode
        self._check(fit, mask)
        self.fit, self.mask_mode = fit, mask

    def set_source(self, spec: str) -> None:
        """Switch live. A bad spec raises InputError and keeps the current source."""
        src = open_source(spec, assets_dir=self.assets_dir)
        old, self.source = self.source, src
        self.spec = spec.strip() if src is not None else "none"
        self.fallback = InputFallback(
            f"input {self.spec}", hold_s=self.hold_s, on_change=self.on_status
        )
        self._had_frames = False
        if src is not None:
            src.start()
        if old is not None:
            old.close()

    def set_mask_source(self, spec: str) -> None:
        """A second source whose luminance is the mask (white: regenerate); mask mode
        "source" uses it."""
        src = open_source(spec, assets_dir=self.assets_dir)
        old, self.mask_source = self.mask_source, src
        if src is not None:
            src.start()
        if old is not None:
            old.close()

    def block(self, count: int, span: float, now: float | None = None) -> BlockVideo:
        """The input for a block of `count` frames covering the `span` seconds up to `now`."""
        now = time.time() if now is None else now
        src = self.source
        if src is None:
            self._had_frames = False
            return BlockVideo(TEXT_ONLY, None, None, False, "input none")
        state = self.fallback.update(now, src.last_time, span, src.status)
        if state == TEXT_ONLY:
            self._had_frames = False
            return BlockVideo(state, None, None, False, self.fallback.message)
        times = block_times(count, span, now)
        picked = resample(src.frames(), times)
        rgb, alpha = to_video(
            [f.rgba for f in picked], self.width, self.height, self.fit, self.device
        )
        mask = self._mask(alpha, times)
        restart = not self._had_frames
        self._had_frames = True
        return BlockVideo(
            state, rgb, mask, restart, self.fallback.message, [f.timestamp for f in picked]
        )

    def _mask(self, alpha: Tensor, times: list[float]) -> Tensor | None:
        mode = self.mask_mode
        if mode == "alpha":
            return alpha
        if mode == "inverse_alpha":
            return 1.0 - alpha
        if mode == "source" and self.mask_source is not None:
            frames = self.mask_source.frames()
            if frames:
                rgb, _ = to_video(
                    [f.rgba for f in resample(frames, times)],
                    self.width, self.height, self.fit, self.device,
                )  # fmt: skip
                w = torch.tensor([0.299, 0.587, 0.114], device=rgb.device).view(1, 3, 1, 1, 1)
                return ((rgb + 1.0) / 2.0 * w).sum(1, keepdim=True)
        return None

    def close(self) -> None:
        for s in (self.source, self.mask_source):
            if s is not None:
                s.close()
        self.source = self.mask_source = None


__all__ = ["BlockVideo", "LiveInput", "open_source", "LIVE", "HOLDING", "TEXT_ONLY"]
