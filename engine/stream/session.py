"""The Krea block loop (docs/streaming-model.md §2): given the controls of one block, produce the
next 3 latent frames (and their RGB frames when a decoder is attached).

Plain and synchronous: no threads or clocks beyond per-stage timing. Everything stays on
the device; with timing on, the only host sync is one event wait at the end of a block.

The attention window is 6 latent frames: 3 of context and the 3 being denoised. The KV
cache (engine/models/kv_cache.py) keeps only the context, per layer, in slot order:

    slot:      0      1      2        (current block, not cached: 3, 4, 5)
    frame:   ctx1   ctx2  anchor
    time pos:  1      2      0

RoPE is applied with each frame's true time position before its keys are cached, and
attention does not care about key order, so the slots can be arranged freely: the two
context frames that the KV bias scales come first, contiguous, and the biased attention is
two plain attentions ([ctx1, ctx2] and [anchor, current]) merged by their log-sum-exps —
exact, and no dense mask. The recompute pass feeds the context in slot order (ctx1, ctx2,
anchor with positions 1, 2, 0) so its keys land in the cache with one contiguous copy.
`kv_cache="fp8"` stores the context in float8 (half the memory, a measured drift).

The anchor: block 1 uses the first latent of block 0. From block 2 on, with a decoder and
an encoder attached, it is the VAE encoding (single image) of the oldest of the last 9
decoded frames. Without them (transformer-only bench, early tests) the session keeps the
first latent of block 0 as the anchor for good: `anchor_source == "first_latent"`, a
stand-in, not Krea's scheme.

Input video (`BlockInputs.video`, 9 frames for block 0, 12 after) steers a block two ways:
- VACE (`session.vace`, a VaceConditioner): the block's 96-channel context is encoded
  before the steps and each denoising step adds the VACE hints (never the recompute
  pass). Reference images alone (no video) steer through a blank control video, as in
  Wan's reference-to-video. Scale 0, no context and no VACE attached all run exactly
  the base model's ops: the stream is then the base stream bit for bit.
- plain V2V (`v2v_strength` not None, `session.video_encoder`): the block starts from
  s·noise + (1−s)·E(frames) at t = 1000·s and runs only the steps below it; s = 0 makes
  the block the encoded input itself (no model call at all). `v2v_auto` lets s follow
  the input's motion, smoothed across blocks.
Both encoders carry their causal cache across blocks, and restart (the block's first
frame as a video start) when the input restarts or after blocks without it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engine.models.kv_cache import KVCache
from engine.models.vace import forward_stream_vace
from engine.models.wan import CONTEXT, DENOISE, SELF, WanModel, rope_table
from engine.stream.schedule import renoise, sigma, validate_steps, x0_from_velocity
from engine.stream.v2v import LaggedMotion, adapt_strength, motion_tensor, v2v_start, v2v_steps

log = logging.getLogger(__name__)

LATENTS_PER_BLOCK = 3
WINDOW_LATENTS = 6  # 3 context + 3 current latent frames attend together
KV_CACHE_KINDS = ("bf16", "fp8")  # "bf16": the model dtype
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
    # input video of this block: [1, 3, T, H, W] in [-1, 1], T = 9 on block 0, else 12;
    # None: text only. The mask [1, 1, T, H, W] in 0..1 (1: regenerate) or None (all 1).
    video: Tensor | None = None
    video_mask: Tensor | None = None
    video_restart: bool = False  # a new video starts here (new source, back after a loss)
    vace_scale: float = 1.0  # VACE hint strength 0..2 (0: base model, bit for bit)
    v2v_strength: float | None = None  # plain V2V noise level 0..1; None: off
    v2v_auto: bool = False  # strength follows the input's motion (seeded by v2v_strength)


@dataclass
class BlockOutput:
    index: int  # block index since reset
    latents: Tensor  # [1, 16, 3, h, w] float32
    frames: Tensor | None  # [1, 3, T, H, W] in [-1, 1] when a decoder is attached
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage
    vace: bool = False  # VACE hints ran in this block
    v2v_strength: float | None = None  # the V2V strength used (after motion adaptation)
    steps: tuple[int, ...] = ()  # the timesteps run (V2V cuts the list)
    text_step: int | None = None  # the step a late text joined at (see next_block's `late`)


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
        vace=None,
        video_encoder=None,
        kv_cache: str = "bf16",
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
        self.vace = vace  # engine.stream.vace_context.VaceConditioner, or None
        self.video_encoder = video_encoder  # engine.stream.v2v.VideoLatentEncoder, or None
        self.timing = timing
        if encoder is None:
            log.info("anchor: first latent of block 0 kept (no VAE encoder attached; a stand-in)")

        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(
                f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}"
            )
        self.kv_cache = kv_cache
        self.cache = KVCache(
            cfg.layers,
            self.fsl,
            cfg.heads,
            cfg.head_dim,
            device=self.device,
            dtype=self.dtype,
            fp8=kv_cache == "fp8",
        )
        self.rope_first = rope_table(cfg, (0, 1, 2), hp, wp, self.device)
        self.rope_context = rope_table(cfg, (1, 2, 0), hp, wp, self.device)  # slot order
        self.rope_current = rope_table(cfg, (3, 4, 5), hp, wp, self.device)
        self._log_bias = torch.zeros((), device=self.device, dtype=torch.float32)
        self._t_zero = torch.zeros(1, device=self.device)
        self._blank: dict[int, Tensor] = {}  # grey control clips (reference images alone)
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
        # what each input encoder's causal cache continues: None (nothing: restart next
        # time), "video" or "blank" (reference images without a video)
        self._vace_fed: str | None = None
        self._v2v_fed = False
        self._v2v_s: float | None = None  # adapted strength (v2v_auto)
        self._v2v_last: Tensor | None = None  # last input frame, for motion across blocks
        self._motion = LaggedMotion()
        if self.vace is not None:
            self.vace.reset()
        if self.video_encoder is not None:
            self.video_encoder.reset()

    def invalidate_text_kv(self) -> None:
        """The model's cross-attention weights changed (a LoRA, engine/models/lora.py):
        the next block recomputes the text K/V instead of reusing them."""
        self._cross = None

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
        self._check_text(inputs.text)
        if isinstance(inputs.seed, bool) or not isinstance(inputs.seed, int):
            raise ValueError(f"seed must be an integer, got {inputs.seed!r}")
        scale = _number(inputs.vace_scale, "vace_scale", 0.0, 2.0)
        strength = inputs.v2v_strength
        if strength is not None:
            strength = _number(strength, "v2v_strength", 0.0, 1.0)
            if self.video_encoder is None:
                raise ValueError("V2V needs a video encoder: the session has none attached")
        self._check_video(inputs)
        return steps, bias, scale, strength

    def _check_text(self, t) -> None:
        if (
            not isinstance(t, Tensor)
            or t.dim() != 3
            or t.shape[0] != 1
            or t.shape[2] != self.cfg.text_dim
        ):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"text embedding must be [1, L, {self.cfg.text_dim}], got {got}")

    def _check_video(self, inputs: BlockInputs) -> None:
        v, m = inputs.video, inputs.video_mask
        if v is None:
            if m is not None:
                raise ValueError("a video mask was given without a video")
            return
        t = RING_FRAMES if self.index == 0 else 4 * LATENTS_PER_BLOCK
        want = (1, 3, t, self.height, self.width)
        if not isinstance(v, Tensor) or tuple(v.shape) != want:
            got = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"block {self.index}: input video must be {list(want)}, got {got}")
        if m is not None and (not isinstance(m, Tensor) or tuple(m.shape) != (1, 1, *want[2:])):
            got = list(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"video mask must be {[1, 1, *want[2:]]}, got {got}")

    # A late text (next_block's `late`) changes the cross-attention inputs between steps on
    # this process only: a session whose steps run elsewhere too (engine/parallel) says no.
    accepts_late_text = True

    @torch.no_grad()
    def next_block(
        self,
        inputs: BlockInputs,
        late: Callable[[int], tuple[Tensor, Hashable] | None] | None = None,
    ) -> BlockOutput:
        """Make the next block. `late(i)`, when given, is asked before denoising step i
        (every step after the recompute pass, none before the first step of block 0): a
        (text embedding, key) it returns replaces the block's text from that step on, so
        a prompt change that arrives during a block shows in that block's frames instead
        of waiting for the next one (the block driver's prompt joins). A replay must return
        the same at the same step; None keeps the text."""
        steps, bias, scale, strength = self._check(inputs)
        model, dev = self.model, self.device
        timer = _Timer(dev, self.timing)
        if self._cross is None or inputs.text_key != self._text_key:
            with timer.stage("text"):
                self._cross = model.cross_kv(inputs.text.to(dev))
            self._text_key = inputs.text_key

        index = self.index
        g = torch.Generator(dev).manual_seed(inputs.seed + LATENTS_PER_BLOCK * index)
        shape = self.latent_shape
        video = inputs.video
        x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
        used_s = None
        if strength is not None and video is not None:
            used_s, steps, x = self._v2v(inputs, strength, steps, x, timer)
        else:
            self._v2v_fed = False
        vace_on = False
        if steps:
            vace_on = self._prepare_vace(inputs, scale, timer)
        else:
            self._vace_fed = None  # the context encoder skipped a block: restart next time

        if index == 0 or not steps:  # no step (V2V at strength 0): no context needed
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

        x0 = x  # V2V at strength 0: the block is the encoded input
        text_step = None
        for i, t in enumerate(steps):
            if late is not None and (i > 0 or mode == DENOISE):
                got = late(i)
                if got is not None:
                    text, key = got
                    self._check_text(text)
                    with timer.stage("text"):
                        self._cross = model.cross_kv(text.to(dev))
                        if vace_on:
                            self.vace.set_text(text, key)
                    self._text_key, text_step = key, i
            with timer.stage(f"step{i}"):
                tt = torch.full((1,), float(t), device=dev)
                vace, vin = (
                    (self.vace.vace, self.vace.step_inputs(sigma(t), scale))
                    if vace_on
                    else (None, None)
                )
                # with no VACE input this runs exactly the base forward's ops
                v = forward_stream_vace(
                    model, vace, x, tt, self._cross, rope, self.cache, mode, log_bias, vin,
                )  # fmt: skip
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
        return BlockOutput(
            index=index,
            latents=x0,
            frames=frames,
            timings=timer.result(),
            vace=vace_on,
            v2v_strength=used_s,
            steps=tuple(steps),
            text_step=text_step,
        )

    def _v2v(self, inputs: BlockInputs, strength: float, steps, noise: Tensor, timer: _Timer):
        """Plain V2V: (strength used, the cut step list, the start latents)."""
        video = inputs.video
        if inputs.v2v_auto:
            # motion across the block boundary only within one continuous input; this
            # block's strength follows the previous block's motion (see LaggedMotion)
            continuous = self._v2v_fed and not inputs.video_restart
            if not continuous:
                self._motion.reset()
            base = self._v2v_s if self._v2v_s is not None else strength
            strength = adapt_strength(base, self._motion.pull())
            self._motion.push(motion_tensor(video, self._v2v_last if continuous else None))
            self._v2v_s = strength
        else:
            self._v2v_s = None
            self._motion.reset()
        if inputs.video_restart or not self._v2v_fed:
            self.video_encoder.reset()
        with timer.stage("v2v_encode"):
            enc = self.video_encoder.encode_block(video).to(self.device)
        self._v2v_fed = True
        self._v2v_last = video[:, :, -1:]
        steps = v2v_steps(steps, strength)
        x = v2v_start(enc, noise, strength) if steps else enc
        return strength, steps, x

    def _prepare_vace(self, inputs: BlockInputs, scale: float, timer: _Timer) -> bool:
        """Encode this block's VACE context; False when VACE does not act on this block
        (none attached, scale 0, neither video nor reference images)."""
        cond = self.vace
        if cond is None or scale == 0.0:
            self._vace_fed = None
            return False
        video, mask = inputs.video, inputs.video_mask
        kind = "video"
        if video is None:
            if cond.refs.count == 0:
                self._vace_fed = None
                return False
            # reference images alone: a blank control video (Wan's reference-to-video)
            t = RING_FRAMES if self.index == 0 else 4 * LATENTS_PER_BLOCK
            video = self._blank.get(t)
            if video is None:  # made once per length: no allocation per block
                video = torch.zeros(1, 3, t, self.height, self.width, device=self.device)
                self._blank[t] = video
            mask, kind = None, "blank"
        if self._vace_fed != kind or (kind == "video" and inputs.video_restart):
            cond.encoder.reset()
        with timer.stage("vace_encode"):
            cond.prepare_block(video, mask, inputs.text, inputs.text_key)
        self._vace_fed = kind
        return True


def _number(v, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number in {lo}..{hi}, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {lo}..{hi}, got {v!r}") from None
    if not lo <= f <= hi:  # NaN fails too
        raise ValueError(f"{name} must be in {lo}..{hi}, got {f}")
    return f
