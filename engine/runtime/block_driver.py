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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine.runtime.controls import PROMPT_SLOTS
from engine.runtime.registry import BlockControls

log = logging.getLogger(__name__)

PROMPT_PATHS = frozenset(
    [f"prompt/{n}/{k}" for n in range(1, PROMPT_SLOTS + 1) for k in ("text", "weight")]
    + ["transition/blocks", "transition/method"]
)
ENCODE_TIMEOUT = 300.0  # seconds a render waits for one prompt encoding (UMT5 on a CPU is slow)


@dataclass
class BlockResult:
    block: int  # the registry's block index (counts on across resets)
    index: int  # the stream's block index since its last reset
    controls: BlockControls
    rgba: torch.Tensor  # uint8 [T, H, W, 4] on the pipeline's device
    record: dict[str, Any]  # the control-log line for this block
    timings: dict[str, float]

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

    # -- the block ------------------------------------------------------------------------
    def step(
        self,
        controls: BlockControls,
        *,
        prompt: Mapping[str, Any] | None = None,
        replay: bool = False,
    ) -> BlockResult:
        """Make the block `controls` describe. With `replay`, the mixer follows `prompt`
        (the recorded target for this block, or None) instead of the slot changes."""
        from engine.stream.rgba import to_rgba8
        from engine.stream.session import BlockInputs

        pipeline, values = self.pipeline, controls.values
        if "decoder" in controls.changed and values["decoder"] != pipeline.decoder_kind:
            self._reload_decoder(values["decoder"])
        if "reset" in controls.events:
            pipeline.session.reset()
        if replay and (prompt is not None or self._text_key is not None):
            if prompt is not None:
                self._set_target(dict(prompt))
        elif self._text_key is None or PROMPT_PATHS.intersection(controls.changed):
            target = prompt_target(values)
            if target is not None:
                self._set_target(target)
            elif self._text_key is None:
                raise RuntimeError("no prompt: every prompt slot is empty")
            else:
                log.warning(
                    "block %d: every prompt slot is empty; keeping the current prompt",
                    controls.block,
                )
        text, key, started = self._text_for_block()
        inputs = BlockInputs(
            text=text,
            text_key=key,
            steps=list(values["steps"]),
            seed=int(values["seed"]),
            kv_bias=float(values["kv_bias"]),
        )
        out = pipeline.session.next_block(inputs)
        if out.frames is None:
            raise RuntimeError("the stream session has no decoder attached")
        rgba = to_rgba8(out.frames)
        record = controls.to_json()
        if started is not None:
            record["prompt"] = started
        return BlockResult(
            block=controls.block,
            index=out.index,
            controls=controls,
            rgba=rgba,
            record=record,
            timings=out.timings,
        )

    def warmup(
        self, values: Mapping[str, Any], blocks: int, stop: Callable[[], bool] = lambda: False
    ) -> None:
        """Run `blocks` throwaway blocks (compile, allocator, cuDNN autotune) and restart the
        stream. Uses the cache directly, so the mixer's state is untouched."""
        if blocks <= 0:
            return
        from engine.stream.session import BlockInputs

        pipeline = self.pipeline
        target = prompt_target(values)
        text = target["prompts"][0][0] if target else "warm-up"
        if not pipeline.cache.wait([text], ENCODE_TIMEOUT):
            raise RuntimeError(f"warm-up: prompt encoding failed: {pipeline.cache.error(text)}")
        emb = pipeline.cache.get(text)[None].to(pipeline.device, pipeline.dtype)
        for _ in range(blocks):
            if stop():  # a warm-up with compilation can take minutes: let SIGINT through
                break
            pipeline.session.next_block(
                BlockInputs(
                    text=emb,
                    text_key=("warmup", text),
                    steps=list(values["steps"]),
                    seed=int(values["seed"]),
                    kv_bias=float(values["kv_bias"]),
                )
            )
        pipeline.session.reset()
