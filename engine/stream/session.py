"""The Krea block loop (streaming-model.md §2): given the controls of one block, produce the
next 3 latent frames (and their RGB frames when a decoder is attached).

Plain and synchronous: no threads or clocks beyond per-stage timing. Everything stays on
the device; with timing on, the only host sync is one event wait at the end of a block.

KV cache layout, per layer, 6 latent frames of `fsl` tokens each:

    slot:      0      1      2       3     4     5
    frame:   ctx1   ctx2  anchor   cur0  cur1  cur2
    time pos:  1      2      0       3     4     5

RoPE is applied with each frame's true time position before its keys are cached, and
attention does not care about key order, so the slots can be arranged freely: the two
context frames that the KV bias scales come first, contiguous, and the biased attention is
two plain attentions (slots 0-1, slots 2-5) merged by their log-sum-exps — exact, and no
dense mask. The recompute pass feeds the context in slot order (ctx1, ctx2, anchor with
positions 1, 2, 0) so its keys land in slots 0-2 with one contiguous copy.

The anchor: block 1 uses the first latent of block 0. From block 2 on, with a decoder and
an encoder attached, it is the VAE encoding (single image) of the oldest of the last 9
decoded frames. Without them (transformer-only bench, early tests) the session keeps the
first latent of block 0 as the anchor for good: `anchor_source == "first_latent"`, a
stand-in, not Krea's scheme.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engine.models.wan import CONTEXT, DENOISE, SELF, WanModel, rope_table
from engine.stream.schedule import renoise, sigma, validate_steps, x0_from_velocity

log = logging.getLogger(__name__)

LATENTS_PER_BLOCK = 3
WINDOW_LATENTS = 6
RING_FRAMES = 9  # 1 + 2×4 RGB frames span the anchor and the two context latents


class FrameDecoder(Protocol):
    def reset(self) -> None: ...
    def decode(self, latents: Tensor) -> Tensor: ...


class AnchorEncoder(Protocol):
    def encode_image(self, frame: Tensor) -> Tensor: ...


@dataclass
class BlockInputs:
    text: Tensor  # [1, L, text_dim], the blended embedding for this block
    text_key: Hashable  # equal keys <=> same embedding: cross-attention K/V are reused
    steps: Sequence[int]  # e.g. [1000, 750, 500, 250]
    seed: int
    kv_bias: float = 0.3


@dataclass
class BlockOutput:
    index: int  # block index since reset
    latents: Tensor  # [1, 16, 3, h, w] float32
    frames: Tensor | None  # [1, 3, T, H, W] in [-1, 1] when a decoder is attached
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage


class _Timer:
    """Per-stage wall time: CUDA events on a GPU (read once, at the end of the block),
    perf_counter on a CPU. Disabled, it costs nothing and never syncs."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: list[tuple[str, object, object]] = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                # Named ranges for `dreamdeck bench --profile` traces (cheap without a profiler).
                self.rf = torch.profiler.record_function(f"dreamdeck.{name}")
                self.rf.__enter__()
                if timer.enabled:
                    self.t0 = timer._now()

            def __exit__(self, *exc):
                if timer.enabled and exc[0] is None:
                    timer.marks.append((name, self.t0, timer._now()))
                self.rf.__exit__(*exc)

        return _Stage()

    def result(self) -> dict[str, float]:
        if not self.enabled or not self.marks:
            return {}
        out: dict[str, float] = {}
        if self.cuda:
            self.marks[-1][2].synchronize()
            for name, a, b in self.marks:
                out[name] = out.get(name, 0.0) + a.elapsed_time(b)
            out["total"] = self.marks[0][1].elapsed_time(self.marks[-1][2])
        else:
            for name, a, b in self.marks:
                out[name] = out.get(name, 0.0) + (b - a) * 1e3
            out["total"] = (self.marks[-1][2] - self.marks[0][1]) * 1e3
        return out


class StreamSession:
    """The block loop around one `WanModel`. See the module docstring for the scheme."""

    def __init__(
        self,
        model: WanModel,
        *,
        height: int,
        width: int,
        decoder: FrameDecoder | None = None,
        encoder: AnchorEncoder | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        timing: bool = True,
    ):
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 pixels, got {v!r}")
        if encoder is not None and decoder is None:
            raise ValueError(
                "an anchor encoder needs a decoder: the anchor is encoded from decoded frames"
            )
        self.model = model
        self.cfg = cfg = model.cfg
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype or model.dtype
        self.height, self.width = height, width
        self.h, self.w = height // 8, width // 8
        hp, wp = self.h // cfg.patch[1], self.w // cfg.patch[2]
        self.fsl = hp * wp  # tokens per latent frame
        self.decoder, self.encoder = decoder, encoder
        self.timing = timing
        if encoder is None:
            log.info("anchor: first latent of block 0 kept (no VAE encoder attached; a stand-in)")

        n = WINDOW_LATENTS * self.fsl
        self._kv = torch.empty(
            cfg.layers, 2, 1, n, cfg.heads, cfg.head_dim, device=self.device, dtype=self.dtype
        )
        self.cache = [(self._kv[i, 0], self._kv[i, 1]) for i in range(cfg.layers)]
        self.rope_first = rope_table(cfg, (0, 1, 2), hp, wp, self.device)
        self.rope_context = rope_table(cfg, (1, 2, 0), hp, wp, self.device)  # slot order
        self.rope_current = rope_table(cfg, (3, 4, 5), hp, wp, self.device)
        self.bias_keys = 2 * self.fsl  # slots 0-1: ctx1, ctx2
        self._log_bias = torch.zeros((), device=self.device, dtype=torch.float32)
        self._t_zero = torch.zeros(1, device=self.device)
        self._text_key: Hashable | None = None
        self._cross: list[tuple[Tensor, Tensor]] | None = None
        self.reset()

    @property
    def anchor_source(self) -> str:
        """ "vae": Krea's re-encoded anchor; "first_latent": the no-encoder stand-in.
        A property because the runtime may attach a decoder and encoder later."""
        return "vae" if self.encoder is not None and self.decoder is not None else "first_latent"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, self.cfg.in_dim, LATENTS_PER_BLOCK, self.h, self.w)

    def reset(self) -> None:
        """Start again at block 0 (the cross-attention K/V cache stays: it depends on the
        text only)."""
        self.index = 0
        self._prev: Tensor | None = None
        self._first_latent: Tensor | None = None
        self._ring: deque[Tensor] = deque(maxlen=RING_FRAMES)
        if self.decoder is not None:
            self.decoder.reset()

    def _check(self, inputs: BlockInputs) -> tuple[tuple[int, ...], float]:
        """All validation before any state changes, so a bad block changes nothing."""
        steps = validate_steps(inputs.steps)
        try:
            bias = float(inputs.kv_bias)
        except (TypeError, ValueError):
            raise ValueError(
                f"kv_bias must be a number in (0, 1], got {inputs.kv_bias!r}"
            ) from None
        if not 0.0 < bias <= 1.0:
            raise ValueError(f"kv_bias must be in (0, 1], got {bias}")
        t = inputs.text
        if (
            not isinstance(t, Tensor)
            or t.dim() != 3
            or t.shape[0] != 1
            or t.shape[2] != self.cfg.text_dim
        ):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"text embedding must be [1, L, {self.cfg.text_dim}], got {got}")
        if isinstance(inputs.seed, bool) or not isinstance(inputs.seed, int):
            raise ValueError(f"seed must be an integer, got {inputs.seed!r}")
        return steps, bias

    @torch.no_grad()
    def next_block(self, inputs: BlockInputs) -> BlockOutput:
        steps, bias = self._check(inputs)
        model, dev = self.model, self.device
        timer = _Timer(dev, self.timing)
        if self._cross is None or inputs.text_key != self._text_key:
            with timer.stage("text"):
                self._cross = model.cross_kv(inputs.text.to(dev))
            self._text_key = inputs.text_key

        index = self.index
        g = torch.Generator(dev).manual_seed(inputs.seed + LATENTS_PER_BLOCK * index)
        if index == 0:
            mode, rope, log_bias = SELF, self.rope_first, None
        else:
            if self.anchor_source == "vae" and index >= 2 and len(self._ring) == RING_FRAMES:
                with timer.stage("encode"):
                    anchor = self.encoder.encode_image(self._ring[0]).to(dev, torch.float32)
            else:
                anchor = self._first_latent
            ctx = torch.cat([self._prev[:, :, 1:], anchor], dim=2)  # slot order
            with timer.stage("recompute"):
                model.forward_stream(
                    ctx, self._t_zero, self._cross, self.rope_context, self.cache, CONTEXT
                )
            mode, rope, log_bias = DENOISE, self.rope_current, None
            if bias < 1.0:
                self._log_bias.fill_(math.log(bias))
                log_bias = self._log_bias

        shape = self.latent_shape
        x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
        for i, t in enumerate(steps):
            with timer.stage(f"step{i}"):
                tt = torch.full((1,), float(t), device=dev)
                v = model.forward_stream(
                    x, tt, self._cross, rope, self.cache, mode, self.bias_keys, log_bias
                )
                x0 = x0_from_velocity(x, v.float(), sigma(t))
            if i + 1 < len(steps):
                noise = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
                x = renoise(x0, noise, sigma(steps[i + 1]))

        if index == 0:
            self._first_latent = x0[:, :, :1]
        self._prev = x0
        frames = None
        if self.decoder is not None:
            with timer.stage("decode"):
                frames = self.decoder.decode(x0.to(self.dtype))
            for k in range(frames.shape[2]):
                self._ring.append(frames[:, :, k : k + 1])
        self.index += 1
        return BlockOutput(index=index, latents=x0, frames=frames, timings=timer.result())
