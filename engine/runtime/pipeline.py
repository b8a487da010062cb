"""Building the generation pipeline from a preset: transformer, stream session, decoder,
text encoder, embedding cache and prompt mixer.

The same function builds the tiny random-weights pipeline (CPU, no download: `dreamdeck
run --model tiny`, tests) and the real 14B one (weights from the models folder); only the
numbers differ. Missing weights are reported all at once, with the `dreamdeck download`
command that fetches them, before anything big is loaded.

The live input (`vace/source`) is always there (plain V2V needs no VACE); VACE itself
(module + VaceConditioner) only with `vace.enabled`. Both encode the input with a Wan VAE
encoder: the anchor encoder's own VAE when it has one (the weights are the same file),
else an encoder-only Wan VAE.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.runtime.presets import EnginePreset

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PipelineError(RuntimeError):
    """The pipeline cannot be built as asked (missing weights, no GPU, ...): the message
    says what is wrong and how to fix it."""


@dataclass
class Pipeline:
    preset: EnginePreset
    model: Any  # engine.models.wan.WanModel
    session: Any  # engine.stream.session.StreamSession
    text_encoder: Any
    cache: Any  # engine.stream.embedding_cache.EmbeddingCache
    mixer: Any  # engine.stream.blending.PromptMixer
    device: torch.device
    dtype: torch.dtype
    decoder_kind: str
    weights: dict[str, Path] = field(default_factory=dict)  # role -> file; empty: random weights
    live: Any = None  # engine.runtime.inputs.LiveInput: the input video (VACE and V2V)
    vace: Any = None  # engine.stream.vace_context.VaceConditioner when VACE is loaded
    input_state: tuple[str, str] | None = None  # (state, message) of the input's last change
    input_used: bool = False  # the last block asked the input for frames (VACE or V2V on)
    loras: Any = None  # engine.models.lora.LoraSlots: the live LoRA slots
    lora_loader: Any = None  # engine.runtime.lora_loader.LoraLoader: reads their files

    def input_status(self) -> str:
        """One line for feedback (`engine.status()["vace_input"]`): the input's state."""
        live = self.live
        if live is None or live.source is None:
            return "none"
        if not self.input_used:
            return f"input {live.spec}: not in use (VACE off or vace/scale 0, and V2V off)"
        return live.fallback.message

    def set_decoder(self, kind: str) -> None:
        """Swap the frame decoder between blocks (the `decoder` control, applies="reload").
        The new decoder has no causal cache, so the stream restarts at block 0."""
        if kind == self.decoder_kind:
            return
        decoder, encoder = _build_decoder(kind, self.preset, self.weights, self.device, self.dtype)
        self.session.decoder, self.session.encoder = decoder, encoder
        self.session.reset()
        self.decoder_kind = kind
        log.info("decoder: %s (stream restarted)", kind)

    def close(self) -> None:
        if self.lora_loader is not None:
            self.lora_loader.close()
        if self.live is not None:
            self.live.close()
        self.cache.close()


def resolve_device(preset: EnginePreset) -> torch.device:
    if preset.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            f"preset {preset.name!r} needs a CUDA GPU and none is available here;"
            " `dreamdeck run --model tiny` runs on a CPU"
        )
    return torch.device(preset.device)


def required_weights(preset: EnginePreset, models_dir: str | Path | None) -> dict[str, Path]:
    """role -> file for a real-weights preset. Raises PipelineError listing every missing
    file and the download command (from the catalog) when any is missing."""
    try:
        from engine.weights import catalog
    except ImportError as e:  # the catalog is another part of the project
        raise PipelineError(
            f"cannot locate model files: engine.weights.catalog unavailable ({e})"
        ) from None
    spec = {
        "model": preset.model,
        "decoder": preset.decoder,
        "vace": bool(preset.vace.enabled),
        "text_encoder": preset.text_encoder,
    }
    missing = catalog.missing_files(spec, models_dir=models_dir)
    if missing:
        lines = "\n".join(f"  {m}" for m in missing)
        raise PipelineError(
            f"model files missing for preset {preset.name!r}:\n{lines}\n"
            f"fetch them with:\n  {catalog.download_command(spec, models_dir=models_dir)}"
        )
    return catalog.resolve_files(spec, models_dir=models_dir)


def _build_decoder(kind: str, preset: EnginePreset, weights: dict[str, Path], device, dtype):
    from engine.models.decoders import build_decoder

    compile = preset.compile and torch.device(device).type == "cuda"
    if not weights:  # random weights (tiny model, or --random-weights)
        return build_decoder(
            kind, tiny=preset.model == "tiny", device=device, dtype=dtype, compile=compile
        )
    path = weights.get("taehv" if kind == "tae" else "vae")
    if path is None:
        raise PipelineError(f"no weights file for the {kind!r} decoder")
    return build_decoder(
        kind,
        tiny=False,
        device=device,
        dtype=dtype,
        path=path,
        vae_path=weights.get("vae"),
        compile=compile,
    )


def build_pipeline(
    preset: EnginePreset,
    *,
    models_dir: str | Path | None = None,
    seed: int = 0,
    cache_capacity: int = 32,
    random_weights: bool = False,
    phases: Any = None,
) -> Pipeline:
    """Build everything a `BlockDriver` needs. The tiny model always has random weights;
    `random_weights` gives any model random ones (the whole live path at full size with
    nothing downloaded: timing runs). `seed` seeds them."""
    from engine.models.attention import AttentionError
    from engine.models.wan import CONFIGS
    from engine.runtime.startup import Phases
    from engine.stream.blending import PromptMixer
    from engine.stream.embedding_cache import EmbeddingCache
    from engine.stream.session import StreamSession
    from engine.weights.transformer import block_preparer, load_transformer, random_transformer

    phases = phases if phases is not None else Phases(log_each=False)

    preset.check(preset.name or "preset")
    random_init = random_weights or preset.model == "tiny"
    # Missing files first: the most useful message, and nothing big is loaded yet.
    weights: dict[str, Path] = {} if random_init else required_weights(preset, models_dir)
    device = resolve_device(preset)
    dtype = DTYPES[preset.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("CPU: running in float32 instead of %s", preset.dtype)
        dtype = torch.float32
    cfg = CONFIGS[preset.model]
    attention = None if preset.attention == "auto" else preset.attention
    if preset.fp8 and device.type != "cuda":
        raise PipelineError("fp8 weights need a CUDA GPU (set fp8: false for the CPU)")
    # Each block is fused (q/k/v as one GEMM) and, with fp8, quantised as soon as it is on
    # the device: the 14B never exists in bf16 on the GPU, so fp8 presets build on 24 GB.
    # The blocks hold all but a sliver of the FLOPs; embeddings and head stay in dtype.
    prepared = block_preparer(fp8=preset.fp8)
    blocks_bar = phases.bar(
        f"{'making' if random_init else 'loading'} the transformer", cfg.layers, "block"
    )

    def prepare(block: Any) -> None:  # runs once per block as it lands: the progress
        if prepared is not None:
            prepared(block)
        blocks_bar.update()

    # The text encoder (UMT5-XXL: 11 GB in bf16) can load on a thread while the main
    # thread goes on (issue 15: a restart waited for one part after the other). Where it
    # starts is DREAMDECK_TEXT_ENCODER_LOAD: "beside" the transformer, "after" it (beside
    # the compile set-up and the decoder) or "serial"; docs/PERFORMANCE.md has the
    # measured start-up of each. Its phase names where it ran; what the main thread still
    # waits for shows as "weights: text encoder (wait)".
    te_mode = os.environ.get("DREAMDECK_TEXT_ENCODER_LOAD", TEXT_ENCODER_LOAD)
    if te_mode not in ("beside", "after", "serial"):
        raise PipelineError(
            f"DREAMDECK_TEXT_ENCODER_LOAD={te_mode!r}: expected beside, after or serial"
        )
    te_job: _Background | None = None

    def start_text_encoder(where: str) -> _Background:
        return _Background(
            lambda: _build_text_encoder(preset, weights, device, dtype, cfg),
            "text encoder",
            phases,
            f"weights: text encoder ({where})",
        )

    if te_mode == "beside":
        te_job = start_text_encoder("beside the transformer")
    # torch.compile's first use imports Dynamo and Inductor (~3 s): done on a thread while
    # the weights load, so the compile set-up below only waits for what is left of it.
    compiler = None
    if preset.compile and device.type == "cuda":
        compiler = _Background(_import_compiler, "compiler", phases, "compiler imports (beside)")
    with phases.phase("weights: transformer"):
        try:
            if random_init:
                model = random_transformer(
                    cfg,
                    device=device,
                    dtype=dtype,
                    seed=seed,
                    attention=attention,
                    prepare_block=prepare,
                )
            else:
                if "transformer" not in weights:
                    raise PipelineError(f"no transformer weights for model {preset.model!r}")
                log.info("loading transformer %s", weights["transformer"])
                model = load_transformer(
                    weights["transformer"],
                    cfg,
                    device=device,
                    dtype=dtype,
                    attention=attention,
                    prepare_block=prepare,
                )
        except AttentionError as e:
            for job in (te_job, compiler):
                if job is not None:
                    job.abandon()
            raise PipelineError(f"preset {preset.name!r}: {e}") from None
        except BaseException:
            for job in (te_job, compiler):
                if job is not None:
                    job.abandon()
            raise
        finally:
            blocks_bar.close()
    if preset.fp8:
        log.info("fp8: transformer blocks' linears quantised (e4m3, per-channel scales)")
    if te_mode == "after":
        te_job = start_text_encoder("beside the compile set-up and decoder")
    if preset.compile and device.type == "cuda":
        with phases.phase("compile set-up (imports Inductor)"):
            if compiler is not None:
                try:
                    compiler.result()
                except Exception as e:  # noqa: BLE001 - e.g. an import race: import them here
                    log.warning("compiler imports on the side thread failed (%s); importing now", e)
            model.compile_blocks()
    elif preset.compile:
        log.info("compile: skipped on the CPU")

    with phases.phase("weights: decoder"):
        decoder, encoder = _build_decoder(preset.decoder, preset, weights, device, dtype)
    session = StreamSession(
        model,
        height=preset.height,
        width=preset.width,
        decoder=decoder,
        encoder=encoder,
        device=device,
        dtype=dtype,
        kv_cache=preset.kv_cache,
    )
    if te_job is None:
        with phases.phase("weights: text encoder"):
            text_encoder = _build_text_encoder(preset, weights, device, dtype, cfg)
    else:
        with phases.phase("weights: text encoder (wait)"):
            try:
                text_encoder = te_job.result()
            except Exception as e:  # noqa: BLE001 - a thread-only failure (an import race)
                # must not fail a start that would have worked in line: once more, here; a
                # real problem (a missing or bad file) raises again, from this thread
                log.warning("text encoder on its thread failed (%s); loading it in line", e)
                text_encoder = _build_text_encoder(preset, weights, device, dtype, cfg)
    cache = EmbeddingCache(text_encoder, capacity=cache_capacity)
    mixer = PromptMixer(cache)
    pipeline = Pipeline(
        preset=preset,
        model=model,
        session=session,
        text_encoder=text_encoder,
        cache=cache,
        mixer=mixer,
        device=device,
        dtype=dtype,
        decoder_kind=preset.decoder,
        weights=weights,
    )
    _build_loras(pipeline)
    try:
        with phases.phase("inputs (VACE, V2V)"):
            _build_inputs(pipeline, seed)
    except BaseException:
        pipeline.close()
        raise
    return pipeline


# Where the text encoder loads (see build_pipeline; DREAMDECK_TEXT_ENCODER_LOAD overrides).
TEXT_ENCODER_LOAD = "beside"

# Sites (linears) merged per block boundary on a GPU after a LoRA strength stops moving:
# each copies its pristine weight from the host (52-141 MB on the 14B), so merging all
# 320 at once would stall one block for about a second; 16 spread it over ~20 blocks,
# while the side path carries the rest (engine/models/lora.py).
CUDA_MERGE_PER_BLOCK = 16
# With compile on a GPU, every block linear is wrapped at build time with zero LoRA
# factors this many ranks wide (3x for the fused q/k/v), so a LoRA loaded mid-show (total
# rank up to this) changes no shape and compiles nothing (engine/models/lora.py).
LORA_RANK_BUCKET = 64


def _build_loras(pipeline: Pipeline) -> None:
    """The live LoRA slots (empty until `lora/{n}/file` names a file) and their loader."""
    from engine.models.lora import LoraSlots
    from engine.runtime.lora_loader import LoraLoader

    cuda = pipeline.device.type == "cuda"
    on_device = pipeline.preset.lora_pristine == "device"
    pipeline.loras = LoraSlots(
        pipeline.model,
        pristine_device=pipeline.device if on_device else "cpu",
        merge_per_block=CUDA_MERGE_PER_BLOCK if cuda and not on_device else None,
        rank_bucket=LORA_RANK_BUCKET if cuda and pipeline.preset.compile else None,
        remerge=on_device,  # moving strengths re-merged every block, no side path
    )
    pipeline.lora_loader = LoraLoader(pipeline.loras, pipeline.preset.vace.assets_dir)


def _input_vae(pipeline: Pipeline):
    """A Wan VAE with its encoder, for the input video (VACE context and V2V)."""
    vae = getattr(pipeline.session.encoder, "vae", None)
    if vae is not None and getattr(vae, "encoder", None) is not None:
        return vae
    from engine.models import wan_vae

    preset, weights = pipeline.preset, pipeline.weights
    if not weights:
        cfg = wan_vae.CONFIGS["tiny" if preset.model == "tiny" else "wan2.1"]
        return wan_vae.random_wan_vae(
            cfg, device=pipeline.device, dtype=pipeline.dtype, parts=("encoder",)
        )
    if "vae" not in weights:
        raise PipelineError("the input video needs the Wan VAE (Wan2.1_VAE.pth): not found")
    return wan_vae.load_wan_vae(weights["vae"], pipeline.device, pipeline.dtype, parts=("encoder",))


def _build_inputs(pipeline: Pipeline, seed: int) -> None:
    """The live input, the V2V encoder and (with vace.enabled) the VACE conditioner."""
    from engine.runtime.inputs import LiveInput
    from engine.stream.v2v import VideoLatentEncoder

    preset, session = pipeline.preset, pipeline.session
    v = preset.vace
    vae = _input_vae(pipeline)
    session.video_encoder = VideoLatentEncoder(vae)

    def on_status(state: str, message: str) -> None:
        pipeline.input_state = (state, message)

    pipeline.live = LiveInput(
        preset.width,
        preset.height,
        fit=v.fit,
        mask=v.mask,
        assets_dir=v.assets_dir,
        device=pipeline.device,
        hold_s=v.hold_s,
        on_status=on_status,
    )
    if not v.enabled:
        return
    from engine.models.vace import (
        VACE_CONFIGS,
        compile_vace,
        load_vace,
        quantize_vace,
        random_vace,
    )
    from engine.models.wan import fuse_qkv
    from engine.stream.vace_context import VaceConditioner

    model, device, dtype = pipeline.model, pipeline.device, pipeline.dtype
    if not pipeline.weights:
        vace = random_vace(model.cfg, VACE_CONFIGS[preset.model], device, dtype, seed=seed + 1)
    else:
        if "vace" not in pipeline.weights:
            raise PipelineError("vace.enabled: no VACE module file among the model files")
        log.info("loading VACE %s", pipeline.weights["vace"])
        vace = load_vace(pipeline.weights["vace"], model.cfg, device, dtype)
    fuse_qkv(vace)
    if v.fp8:
        if device.type != "cuda":
            raise PipelineError("vace.fp8 needs a CUDA GPU (set vace.fp8: false for the CPU)")
        log.info("fp8: %d VACE linears quantised", quantize_vace(vace))
    if preset.compile and device.type == "cuda":
        compile_vace(vace)
    session.vace = pipeline.vace = VaceConditioner(
        model, vace, vae, height=preset.height, width=preset.width, assets_dir=v.assets_dir
    )
    if preset.compile and device.type == "cuda":
        pipeline.vace.encoder.stream.compile()
    log.info("VACE on (%d hint layers)", len(vace.vcfg.layers))


def _import_compiler() -> None:
    """The modules torch.compile's first call imports (the slow part of its set-up)."""
    import importlib

    for name in ("torch._dynamo", "torch._inductor.compile_fx"):
        importlib.import_module(name)


class _Background:
    """Run `fn` on a thread now; `result()` joins it and returns its value or raises its
    error in the caller's thread. `abandon()` joins it and drops the result (a failure
    elsewhere: the encoder must not keep loading into a GPU that the caller is giving up)."""

    def __init__(self, fn: Any, what: str, phases: Any, phase: str) -> None:
        import threading
        import time

        self._value: Any = None
        self._error: BaseException | None = None
        self.what = what

        def work() -> None:
            t = time.perf_counter()
            try:
                self._value = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller in result()
                self._error = e
            finally:
                phases.add(phase, time.perf_counter() - t)

        self._thread = threading.Thread(target=work, name=f"load {what}", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def abandon(self) -> None:
        self._thread.join()
        self._value = None


def _build_text_encoder(preset: EnginePreset, weights: dict[str, Path], device, dtype, cfg):
    from engine.models import text_encoder as te

    if preset.model == "tiny":
        # deterministic stand-in sized to the tiny transformer's text input
        return te.TinyTextEncoder(length=cfg.text_len, dim=cfg.text_dim)
    placement = {"gpu": "gpu", "gpu-fp8": "fp8", "cpu": "cpu"}[preset.text_encoder]
    if not weights:
        return te.random_text_encoder(
            placement=placement,
            device=device if placement != "cpu" else "cpu",
            output_device=device,
        )
    return te.load_text_encoder(
        weights["text_encoder"],
        weights["tokenizer"],
        placement=placement,
        device=device if placement != "cpu" else "cpu",
        dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
        output_device=device,
    )
