"""One block, synchronously: controls -> prompt mixer -> BlockInputs -> session -> RGBA.

Shared by the live engine (on its generation thread) and the offline render (in the main
thread), so both make the same frames from the same controls. It knows no threads,
clocks or outputs.

Prompts: a change of the prompt slots (or of the transition) becomes a new mixer target.
Live (``sync_prompts=False``) the mixer starts the move at the first block after the
encodings are ready, so the stream never waits for the text encoder; render
(``sync_prompts=True``) waits, so the move starts at the block the change was made for.
Either way the block where the move really started records the target (``record
["prompt"]``), and a replay (``step(controls, prompt=...)``) sets exactly those targets at
exactly those blocks: a recorded show replays to the same frames.

A prompt change that arrives while a block is being made joins that block at its next
denoising step, live, when it arrived alone (nothing else staged beside it: changes sent
together land together, at the boundary), its prompts are not modulated, and its encodings
are ready (else they are asked for and it waits for a later step or the boundary). The
block's remaining steps use the new text, so the change shows in the frames of the block
in flight: at the median half a block after it arrived instead of one and a half (issue
15's latency). Its control-log entry is the target with the step ("prompt": {...,
"step": i}); a replay joins it at the same step, so the show replays to the same frames.
Render (``sync_prompts``) never joins mid-block, nor do several GPUs (the other ranks got
the block's text before it began).

Input video (VACE and V2V): the `vace/*` and `v2v/*` controls are applied to the live
input and the reference images at the block boundary; a change that cannot be applied
(a source that cannot open, an image that does not decode, a grab with no input frame)
sets the registry back to what is really in use and says why (`last_error`, the log).
The block's input is asked for only when something uses it (VACE at a scale above 0,
or V2V): 9 frames for the stream's first block, 12 after, over the span of output time
the block stands for (the measured time between blocks). Input frames are not recorded:
a show with live input replays its controls, not its picture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine.runtime.controls import LORA_SLOTS, PROMPT_SLOTS, REF_FROM_INPUT, REF_SLOTS
from engine.runtime.registry import BlockControls

log = logging.getLogger(__name__)

PROMPT_PATHS = frozenset(
    [f"prompt/{n}/{k}" for n in range(1, PROMPT_SLOTS + 1) for k in ("text", "weight")]
    + ["transition/blocks", "transition/method"]
)
LORA_TIMEOUT = 600.0  # seconds a render (or the first live block) waits for a LoRA file
ENCODE_TIMEOUT = 300.0  # seconds a render waits for one prompt encoding (UMT5 on a CPU is slow)
NOMINAL_FPS = 16.0  # the model's video rate: the input span of a block before one is measured
STEADY_FRAMES = 12


@dataclass
class BlockResult:
    block: int  # the registry's block index (counts on across resets)
    index: int  # the stream's block index since its last reset
    controls: BlockControls
    rgba: torch.Tensor  # uint8 [T, H, W, 4] on the pipeline's device
    record: dict[str, Any]  # the control-log line for this block
    timings: dict[str, float]
    # True when the stream and the prompt mixer start afresh at this block (a reset, and no
    # transition carried over), so a replay may begin here: see ControlHistory.
    clean: bool = False
    # the mixer target at rest when this block began (what a replay starting here sets)
    rest_prompt: dict[str, Any] | None = None
    # when the prompt change that joined this block in flight arrived (time.time()), if one did
    late_received: float | None = None
    # this block's only changes are the prompt change that joined the block before it: the
    # registry hands them over at this boundary, but they showed one block earlier
    echo_only: bool = False

    @property
    def frames(self) -> int:
        return int(self.rgba.shape[0])


def prompt_target(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mixer target the slot values describe: non-empty slots with weight > 0 (all
    non-empty slots, equally weighted, when every weight is 0); None when every slot is empty."""
    slots = [
        (values[f"prompt/{n}/text"], float(values[f"prompt/{n}/weight"]))
        for n in range(1, PROMPT_SLOTS + 1)
        if str(values.get(f"prompt/{n}/text", "")).strip()
    ]
    if not slots:
        return None
    live = [s for s in slots if s[1] > 0] or slots
    return {
        "prompts": [[t, w] for t, w in live],
        "blocks": int(values.get("transition/blocks", 0)),
        "method": str(values.get("transition/method", "linear")),
    }


class BlockDriver:
    def __init__(self, pipeline: Any, *, sync_prompts: bool = False, registry: Any = None):
        self.pipeline = pipeline
        self.sync_prompts = sync_prompts
        self.registry = registry  # to undo a control that could not be applied (live)
        self._sent: dict[str, Any] | None = None  # target given to the mixer, not yet started
        self._text_key: Hashable | None = None
        self._text: torch.Tensor | None = None
        self.last_error: str | None = None
        self._refs = [""] * REF_SLOTS  # what each reference slot really holds (registry value)
        self._failed: dict[str, Any] = {}  # path -> the value that could not be applied
        self._block_s: float | None = None  # EMA of the time between blocks
        self._lora_files = [""] * LORA_SLOTS  # what each LoRA slot really holds
        self._lora_asked: list[str | None] = [None] * LORA_SLOTS  # being read, not installed
        self._lora_started = False  # the first block waits for its LoRA files
        self._t_last: float | None = None
        self._rest: dict[str, Any] | None = None  # the last target the mixer started
        # a prompt target that joined the block in flight: (target, received) — see _late
        self._joined: tuple[dict[str, Any], float | None] | None = None
        self._joined_target: dict[str, Any] | None = None  # the last block's joined target
        self._late_refused: dict[str, Any] | None = None  # not tried again until it changes
        self._sent_received: float | None = None  # when the change behind `_sent` arrived

    def _fail(self, message: str, path: str | None = None, value: Any = None) -> None:
        """A control that could not be applied: say so, and set the registry back."""
        self.last_error = message
        log.error(message)
        if self.registry is not None and path is not None:
            try:
                self.registry.set(path, value)
            except ValueError as e:  # the old value no longer validates (file gone)
                log.warning("could not set %s back: %s", path, e)

    # -- input video: VACE and V2V --------------------------------------------------------
    def _apply_input_controls(self, controls: BlockControls) -> None:
        from engine.runtime.inputs import InputError

        live, cond = self.pipeline.live, self.pipeline.vace
        if live is None:
            return
        ch, values = controls.changed, controls.values
        for path in ch:
            if self._failed.get(path) != ch[path]:
                self._failed.pop(path, None)
        if "vace/fit" in ch or "vace/mask" in ch:
            try:
                live.set_options(fit=values.get("vace/fit"), mask=values.get("vace/mask"))
            except InputError as e:
                self._fail(f"vace/fit, vace/mask: {e}")
        want = values.get("vace/source", live.spec)  # (a registry without vace/*: no-op)
        if want != live.spec and want != self._failed.get("vace/source"):
            try:
                live.set_source(want)
            except (InputError, ValueError) as e:
                self._failed["vace/source"] = want
                self._fail(f"vace/source not changed: {e}", "vace/source", live.spec)
            else:
                log.info("input source: %s", live.spec)
        if "vace/mask_source" in ch:
            try:
                live.set_mask_source(values.get("vace/mask_source", "none"))
            except (InputError, ValueError) as e:
                self._fail(f"vace/mask_source not changed: {e}")
        if cond is None:
            return
        for n in range(1, REF_SLOTS + 1):
            # Reconciled every block, not only on a change: the registry coalesces, so an
            # echo of our own (after a grab) may be overtaken by the performer's next value.
            path = f"vace/ref/{n}"
            want = values.get(path, self._refs[n - 1])
            if f"{path}/grab" in controls.events:
                self._set_ref(n, REF_FROM_INPUT, echo=True)
            elif want != self._refs[n - 1] and want != self._failed.get(path):
                self._set_ref(n, want)

    def _set_ref(self, n: int, value: str, echo: bool = False) -> None:
        """Reference slot n := an assets file, the input's current frame, or nothing."""
        from engine.stream.vace_context import AssetPathError

        refs, path = self.pipeline.vace.refs, f"vace/ref/{n}"
        try:
            if not value:
                refs.clear(n)
            elif value == REF_FROM_INPUT:
                src = self.pipeline.live.source
                frames = src.frames() if src is not None else []
                if not frames:
                    raise ValueError("no input frame to grab (vace/source gives none)")
                refs.set_frame(n, frames[-1].rgba)
            else:
                refs.set_path(n, value)
        except (AssetPathError, ValueError) as e:
            self._failed[path] = value  # not tried again until the control changes
            self._fail(f"{path} not changed: {e}", path, self._refs[n - 1])
            return
        self._failed.pop(path, None)
        self._refs[n - 1] = value
        if echo and self.registry is not None:
            self.registry.set(path, value)  # feedback shows the slot holds a grabbed frame

    def _input_video(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """This block's video fields of BlockInputs (none when nothing uses the input)."""
        pipeline = self.pipeline
        live, session = pipeline.live, pipeline.session
        v2v = bool(values.get("v2v/enabled", False))
        scale = float(values.get("vace/scale", 1.0))
        out: dict[str, Any] = {
            "vace_scale": scale,
            "v2v_strength": float(values.get("v2v/strength", 0.7)) if v2v else None,
            "v2v_auto": bool(values.get("v2v/auto", False)),
        }
        uses = v2v or (pipeline.vace is not None and scale > 0)
        pipeline.input_used = uses
        if live is None or live.source is None or not uses:
            return out
        count = 9 if session.index == 0 else STEADY_FRAMES
        per_frame = (self._block_s / STEADY_FRAMES) if self._block_s else 1.0 / NOMINAL_FPS
        bv = live.block(count, count * per_frame)
        out.update(video=bv.frames, video_mask=bv.mask, video_restart=bv.restart)
        if v2v and session.video_encoder is None:
            out["v2v_strength"] = None
        return out

    def _tick(self) -> None:
        import time

        now = time.perf_counter()
        if self._t_last is not None:
            # clamped: a pause or a reload must not stretch the next input span for long
            dt = min(max(now - self._t_last, 0.005), 2.0)
            self._block_s = dt if self._block_s is None else 0.8 * self._block_s + 0.2 * dt
        self._t_last = now

    # -- LoRA slots -----------------------------------------------------------------------
    def _apply_loras(
        self, controls: BlockControls, replay: bool, recorded: Mapping[str, Any] | None
    ) -> dict[int, str]:
        """Install finished LoRA loads and set this block's strengths (engine/models/lora.py).
        Live, a new file is read in the background and lands at the first block after it
        is ready; render, replay and the first block wait for it, so their frames do not
        depend on disk speed. A replay installs exactly what the recorded engine installed
        at this block (`recorded`, the log's "lora" entry). Returns slot -> file installed
        at this block (for the control log)."""
        slots = getattr(self.pipeline, "loras", None)
        loader = getattr(self.pipeline, "lora_loader", None)
        if slots is None or loader is None:
            return {}
        values = controls.values
        installed: dict[int, str] = {}
        dirty = False
        sync = self.sync_prompts or not self._lora_started
        self._lora_started = True
        if replay:
            for key, file in (recorded or {}).items():
                n = int(key) - 1
                try:
                    lora = loader.load(file) if file else None
                except ValueError as e:
                    self._fail(f"lora/{n + 1}/file not replayed: {e}")
                    continue
                dirty |= slots.install(n, lora)
                self._lora_files[n] = installed[n] = file
        else:
            for n in range(LORA_SLOTS):
                path = f"lora/{n + 1}/file"
                want = str(values.get(path, self._lora_files[n]))
                if path in controls.changed and self._failed.get(path) != want:
                    self._failed.pop(path, None)
                if want == self._lora_files[n]:
                    self._lora_asked[n] = None
                    continue
                if want == self._failed.get(path):
                    continue
                if not want:  # unload at this block
                    dirty |= slots.install(n, None)
                    self._lora_files[n] = installed[n] = ""
                    self._lora_asked[n] = None
                    continue
                if self._lora_asked[n] != want:
                    loader.request(n, want)
                    self._lora_asked[n] = want
                if sync:
                    loader.wait(n, LORA_TIMEOUT)
                got = loader.take(n)
                if got is None or got.file != want:
                    continue  # still reading (or a stale result): the slot keeps its file
                self._lora_asked[n] = None
                if got.error is not None:
                    self._failed[path] = want
                    self._fail(f"{path} not changed: {got.error}", path, self._lora_files[n])
                    continue
                self._failed.pop(path, None)
                dirty |= slots.install(n, got.lora)
                self._lora_files[n] = installed[n] = want
                log.info("LoRA slot %d: %s", n + 1, want)
        scales = [float(values.get(f"lora/{n + 1}/scale", 1.0)) for n in range(LORA_SLOTS)]
        dirty |= slots.update(scales)
        if dirty:
            self.pipeline.session.invalidate_text_kv()
        return installed

    # -- prompts --------------------------------------------------------------------------
    def _set_target(self, target: dict[str, Any]) -> None:
        mixer = self.pipeline.mixer
        prompts = [(str(t), float(w)) for t, w in target["prompts"]]
        try:
            changed = mixer.set_target(prompts, int(target["blocks"]), str(target["method"]))
        except ValueError as e:
            self.last_error = f"prompt change refused: {e}"
            log.error(self.last_error)
            return
        if changed:
            self._sent = target
            if self.sync_prompts and not mixer.cache.wait([t for t, _ in prompts], ENCODE_TIMEOUT):
                errors = [mixer.cache.error(t) for t, _ in prompts]
                raise RuntimeError(
                    f"prompt encoding failed: {next((e for e in errors if e), 'timed out')}"
                )

    def _text_for_block(self) -> tuple[torch.Tensor, Hashable, dict[str, Any] | None]:
        mixer = self.pipeline.mixer
        waiting = mixer.waiting
        emb, key = mixer.next_block()
        started = None
        if self._sent is not None and waiting and not mixer.waiting:
            if mixer.last_error is None:
                started = self._sent
            else:
                self.last_error = mixer.last_error
            self._sent = None
        if key != self._text_key:  # cast once per embedding, not per block
            self._text = emb.to(self.pipeline.device, self.pipeline.dtype)
            self._text_key = key
        return self._text, key, started

    def _reload_decoder(self, kind: str) -> None:
        """A decoder that cannot be built (weights missing, out of memory) leaves the old
        one running; the registry is set back so feedback shows what is really in use."""
        try:
            self.pipeline.set_decoder(kind)
        except Exception as e:  # noqa: BLE001 - the show goes on with the old decoder
            self.last_error = f"decoder {kind!r} not loaded: {e}"
            log.error(self.last_error)
            if self.registry is not None:
                self.registry.set("decoder", self.pipeline.decoder_kind)

    # -- prompt changes joining a block in flight -------------------------------------------
    def _late_live(self, step: int) -> tuple[torch.Tensor, Hashable] | None:
        """Asked by the session before each denoising step (live only). A prompt target
        that is ready now starts in this block, as it would have at the next one: one
        taken at a block boundary whose encodings were not ready then, or a change staged
        since the block began, alone (nothing else staged with it, so changes sent
        together still land together) and already encoded. Its control-log entry records
        the step ("prompt": {..., "step": i}) and a replay joins it at the same step."""
        if self._joined is not None:
            return None
        mixer = self.pipeline.mixer
        if self._sent is not None and mixer.waiting:  # taken at the boundary, was encoding
            return self._join(step, self._sent_received)
        if self.registry is None:
            return None
        got = self.registry.pending_within(PROMPT_PATHS)
        if got is None:
            return None
        values, received = got
        target = prompt_target(values)
        if target is None or target == self._late_refused:
            return None
        if target == self._rest and not mixer.waiting:
            return None  # what is playing already (a flood of no-op changes stays cheap)
        texts = [str(t) for t, _ in target["prompts"]]
        if any(mixer.cache.get(t) is None for t in texts):
            for t in texts:  # ask now: ready for a later step, or for the block boundary
                mixer.cache.request(t)
            return None
        before = self.last_error
        self._set_target(target)
        if self._sent is not target:  # refused, or the mixer's target already
            if self.last_error is not before:
                self._late_refused = target
            return None
        return self._join(step, received)

    def _join(self, step: int, received: float | None) -> tuple[torch.Tensor, Hashable] | None:
        """Start the mixer's waiting target (`_sent`) at this step of the block in flight."""
        joined = self.pipeline.mixer.join_now()
        if joined is None:  # not ready (or its encoding went away): a later step or boundary
            return None
        target = self._sent
        self._joined_target = target
        log.info("prompt change joins the block in flight at step %d", step)
        self._joined = ({**target, "step": step}, received)
        self._rest, self._sent = target, None
        emb, key = joined
        self._text = emb.to(self.pipeline.device, self.pipeline.dtype)
        self._text_key = key
        return self._text, key

    def _late_replay(self, target: Mapping[str, Any]) -> Callable[[int], Any]:
        """The recorded join (control log "prompt" with a "step"): at that step, exactly."""
        want = target["step"]
        clean = {k: v for k, v in target.items() if k != "step"}

        def late(step: int) -> tuple[torch.Tensor, Hashable] | None:
            if step != want:
                return None
            self._set_target(clean)  # sync: waits for its encodings
            if self._sent is None:
                return None  # refused (last_error says why) or the target already
            return self._join(step, None)

        return late

    # -- the block ------------------------------------------------------------------------
    def step(
        self,
        controls: BlockControls,
        *,
        prompt: Mapping[str, Any] | None = None,
        replay: bool = False,
        loras: Mapping[str, Any] | None = None,
    ) -> BlockResult:
        """Make the block `controls` describe. With `replay`, the mixer follows `prompt`
        (the recorded target for this block, or None) instead of the slot changes, and
        the LoRA slots load what `loras` (the recorded "lora" entry) says."""
        from engine.stream.rgba import to_rgba8
        from engine.stream.session import BlockInputs

        pipeline, values = self.pipeline, controls.values
        echo_only = bool(
            self._joined_target is not None
            and controls.changed
            and PROMPT_PATHS.issuperset(controls.changed)
            and not controls.events
            and prompt_target(values) == self._joined_target
        )
        self._joined_target = None
        if "decoder" in controls.changed and values["decoder"] != pipeline.decoder_kind:
            self._reload_decoder(values["decoder"])
        if "reset" in controls.events:
            pipeline.session.reset()
        self._apply_input_controls(controls)
        lora_installed = self._apply_loras(controls, replay, loras)
        session = pipeline.session
        late = None
        if replay and prompt is not None and "step" in prompt:
            step_at = prompt["step"]
            if isinstance(step_at, bool) or not isinstance(step_at, int) or not 0 <= step_at < 8:
                self.last_error = f"block {controls.block}: prompt step {step_at!r} is not 0..7"
                log.error(self.last_error)
                prompt = {k: v for k, v in prompt.items() if k != "step"}
            elif self._text_key is None:
                prompt = {k: v for k, v in prompt.items() if k != "step"}  # nothing to join
            else:
                late = self._late_replay(prompt)
                prompt = None  # set at its step, not at the boundary
        elif (
            not replay
            and not self.sync_prompts
            and self._text_key is not None
            and getattr(session, "accepts_late_text", False)
        ):
            late = self._late_live
        self._joined = None
        if replay and (prompt is not None or self._text_key is not None):
            if prompt is not None:
                self._set_target(dict(prompt))
        elif self._text_key is None or PROMPT_PATHS.intersection(controls.changed):
            target = prompt_target(values)
            if target is not None:
                self._set_target(target)
                self._sent_received = controls.received
            elif self._text_key is None:
                raise RuntimeError("no prompt: every prompt slot is empty")
            else:
                log.warning(
                    "block %d: every prompt slot is empty; keeping the current prompt",
                    controls.block,
                )
        fresh = self._text_key is None
        moving = bool(getattr(pipeline.mixer, "in_transition", False))
        rest = self._rest
        text, key, started = self._text_for_block()
        if started is not None:
            self._rest = started
        self._tick()
        video = self._input_video(values)
        inputs = BlockInputs(
            text=text,
            text_key=key,
            steps=list(values["steps"]),
            seed=int(values["seed"]),
            kv_bias=float(values["kv_bias"]),
            **video,
        )
        out = session.next_block(inputs) if late is None else session.next_block(inputs, late)
        if out.frames is None:
            raise RuntimeError("the stream session has no decoder attached")
        rgba = to_rgba8(out.frames)
        record = controls.to_json()
        record["index"] = out.index
        if started is not None:
            record["prompt"] = started
        late_received = None
        if self._joined is not None:  # a prompt change joined this block at a step
            record["prompt"], late_received = self._joined
            self._joined = None
        if lora_installed:
            record["lora"] = {str(n + 1): f for n, f in sorted(lora_installed.items())}
        # A replay can start at this block when the stream starts here and the mixer's
        # embedding does not depend on earlier blocks: at rest (no transition under way)
        # and not moving away from an earlier target in this very block.
        clean = (
            out.index == 0
            and out.text_step is None  # two texts in one block: not a place to begin
            and (fresh or (not moving and (started is None or int(started["blocks"]) == 0)))
        )
        if "video" in video:  # what the input gave this block (not replayable)
            record["input"] = {
                "state": pipeline.live.fallback.state,
                "vace": out.vace,
                "v2v_strength": out.v2v_strength,
            }
        return BlockResult(
            block=controls.block,
            index=out.index,
            controls=controls,
            rgba=rgba,
            record=record,
            timings=out.timings,
            clean=clean,
            rest_prompt=None if rest is None else {**rest, "blocks": 0},
            late_received=late_received,
            echo_only=echo_only,
        )

    def warmup(
        self,
        values: Mapping[str, Any],
        blocks: int,
        stop: Callable[[], bool] = lambda: False,
        on_block: Callable[[], None] | None = None,
    ) -> None:
        """Run `blocks` throwaway blocks (compile, allocator, cuDNN autotune) and restart the
        stream. Uses the cache directly, so the mixer's state is untouched. `on_block` is
        called after each (a progress bar: the first can take minutes to compile)."""
        if blocks <= 0:
            return
        from engine.stream.session import BlockInputs

        pipeline = self.pipeline
        target = prompt_target(values)
        text = target["prompts"][0][0] if target else "warm-up"
        if not pipeline.cache.wait([text], ENCODE_TIMEOUT):
            raise RuntimeError(f"warm-up: prompt encoding failed: {pipeline.cache.error(text)}")
        emb = pipeline.cache.get(text)[None].to(pipeline.device, pipeline.dtype)
        session = pipeline.session
        loras = getattr(pipeline, "loras", None)
        # Static LoRA slots (compile): one more block with every side path on (adding exact
        # zeros), so the first LoRA move of the show finds its graph compiled.
        extra = 1 if loras is not None and loras.rank_bucket is not None else 0
        for i in range(blocks + extra):
            if stop():  # a warm-up with compilation can take minutes: let SIGINT through
                break
            if extra and i == blocks:
                loras.warm(True)
            video = None
            if getattr(pipeline, "vace", None) is not None:
                # the VACE path too (its compiled graphs, the context encoder), so the first
                # live input does not stall the show; a grey clip is input enough
                t = 9 if session.index == 0 else STEADY_FRAMES
                video = torch.zeros(1, 3, t, session.height, session.width, device=session.device)
            session.next_block(
                BlockInputs(
                    text=emb,
                    text_key=("warmup", text),
                    steps=list(values["steps"]),
                    seed=int(values["seed"]),
                    kv_bias=float(values["kv_bias"]),
                    video=video,
                )
            )
            if on_block is not None:
                on_block()
        if extra:
            loras.warm(False)
        if loras is not None:
            loras.warm_merges()  # the fp8 LoRA merge kernel's JIT, before the show
        session.reset()
