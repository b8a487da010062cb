"""Engine presets: one YAML file per GPU class and resolution in `presets/engine/`.

A preset says everything the engine needs to start: which model, at which resolution and
dtype, which decoder, where the text encoder lives, the default step list and prompt, the
outputs and the control ports. Flags of `dreamdeck run` / `render` override single fields.

Files are validated against the dataclasses below node by node (yaml.compose keeps the
line of every node), so a typo, an unknown key or a wrong type is reported as
``file:line: key: reason`` instead of surfacing later as a crash deep in the model code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.shipped import shipped_dir

PRESETS_DIR = shipped_dir("presets/engine")  # the checkout's presets/engine, or the wheel's

Model = Literal["14b", "1.3b", "tiny"]
Decoder = Literal["wan", "tae"]
DType = Literal["bf16", "fp16", "fp32"]
Device = Literal["auto", "cuda", "cpu"]
TextPlacement = Literal["gpu", "gpu-fp8", "cpu"]
KVCacheKind = Literal["bf16", "fp8"]
Attention = Literal["auto", "fa3", "fa2", "sage", "sdpa"]
TransitionMethod = Literal["linear", "slerp"]
FitMode = Literal["fit", "fill", "stretch"]
MaskMode = Literal["ones", "alpha", "inverse_alpha", "source"]


class PresetError(ValueError):
    """A preset that cannot be used: the message names the file, the line and the key."""


@dataclass
class Outputs:
    """Where frames go. Each transport is off when its name is null."""

    shm: str | None = "dreamdeck"  # shared-memory ring name (TouchDesigner Script TOP)
    shm_slots: int = 4
    ndi: str | None = None  # NDI source name
    spout: str | None = None  # Spout sender name (Windows only)
    fps: float | None = None  # fixed presentation rate; null: follow the generation rate


@dataclass
class Ports:
    """Control ports handed to the bridges as defaults for their flags."""

    host: str = "127.0.0.1"
    osc: int = 9137
    oscquery: int = 9138
    feedback: int = 9139


@dataclass
class Vace:
    """VACE (control video, masks, reference images) and the live input it reads.

    `vace: true` / `vace: false` in a file is shorthand for `enabled`. The live input
    (`source`, also `/dd/vace/source`) serves plain V2V too, with VACE off. File paths
    that arrive over the network (reference images, `file:` sources) must lie inside
    `assets_dir`; without one, they are refused."""

    enabled: bool = False  # load the VACE module (14B: Wan2_1-VACE_module_14B_bf16)
    fp8: bool = False  # VACE blocks' linears in float8 (GPU)
    assets_dir: str | None = None  # reference images and video files live here
    source: str = "none"  # input at start: shm:NAME, file:PATH, ndi:NAME, spout:NAME, camera:DEV
    fit: FitMode = "fill"  # how the input is sized to the output
    mask: MaskMode = "ones"  # ones: regenerate everything, guided; alpha: the input's alpha
    hold_s: float = 1.0  # seconds a lost input is held before the blocks go text-only

    def __bool__(self) -> bool:  # `if preset.vace:` and the catalog's bool(vace) mean enabled
        return self.enabled


@dataclass
class Lora:
    """A LoRA loaded at start into the next slot: `loras: [{file: style.safetensors,
    scale: 0.8}]`. The file lies in the assets folder (`vace.assets_dir`, `--assets`)."""

    file: str = ""
    scale: float = 1.0


MAX_LORAS = 4


@dataclass
class EnginePreset:
    """Everything `dreamdeck run` needs to build the engine. See presets/engine/README.md."""

    name: str = ""  # filled from the file name when absent
    description: str = ""
    model: Model = "14b"
    height: int = 480
    width: int = 832
    steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    seed: int = 42
    kv_bias: float = 0.3
    prompt: str = (
        "A slow cinematic long take through a misty pine forest at dawn, soft golden light "
        "filtering through the branches, drifting particles, gentle camera dolly forward."
    )
    transition_blocks: int = 4
    transition_method: TransitionMethod = "slerp"
    decoder: Decoder = "tae"
    dtype: DType = "bf16"
    fp8: bool = False  # transformer linears stored in float8 (about half the memory)
    kv_cache: KVCacheKind = "bf16"  # context K/V in the model dtype, or float8 (half, lossy)
    device: Device = "auto"
    text_encoder: TextPlacement = "gpu"
    attention: Attention = "auto"
    compile: bool = False
    vace: Vace = field(default_factory=Vace)
    loras: list[Lora] = field(default_factory=list)  # loaded at start, slots 1.. (live: lora/*)
    # where LoRA slots keep the base weights they merge from (engine/models/lora.py):
    # "host" (pinned RAM; GPU memory grows by the LoRAs only; a moving strength rides the
    # low-rank side path) or "device" (a GPU copy of the targeted weights: a moving
    # strength is re-merged every block, merges and the return to 0 in ms; big cards)
    lora_pristine: str = "host"
    warmup_blocks: int = 1
    gpus: int = 1  # ranks the stream is split over (engine/parallel); `run --gpus` wins
    outputs: Outputs = field(default_factory=Outputs)
    ports: Ports = field(default_factory=Ports)

    def check(self, where: str = "preset") -> None:
        """Cross-field rules that single-field types cannot say."""
        for key in ("height", "width"):
            v = getattr(self, key)
            if v <= 0 or v % 16:
                raise PresetError(f"{where}: {key}: {v} is not a positive multiple of 16")
        from engine.stream.schedule import StepsError, validate_steps

        try:
            validate_steps(self.steps)
        except StepsError as e:
            raise PresetError(f"{where}: steps: {e}") from None
        if not 0.01 <= self.kv_bias <= 1.0:
            raise PresetError(f"{where}: kv_bias: {self.kv_bias} is outside 0.01..1")
        if not 0 <= self.seed <= 2**31 - 1:
            raise PresetError(f"{where}: seed: {self.seed} is outside 0..2147483647")
        if not 1 <= self.gpus <= 64:
            raise PresetError(f"{where}: gpus: {self.gpus} is outside 1..64")
        if self.transition_blocks < 0:
            raise PresetError(f"{where}: transition_blocks: must be >= 0")
        if self.outputs.shm_slots < 2:
            raise PresetError(f"{where}: outputs.shm_slots: at least 2 slots")
        if not 0.0 <= self.vace.hold_s <= 60.0:
            raise PresetError(f"{where}: vace.hold_s: {self.vace.hold_s} is outside 0..60 s")
        if self.vace.source.strip().lower() not in ("", "none", "off"):
            from engine.runtime.controls import check_source_spec

            try:
                check_source_spec(self.vace.source, self.vace.assets_dir)
            except ValueError as e:
                raise PresetError(f"{where}: vace.source: {e}") from None
        if self.lora_pristine not in ("host", "device"):
            raise PresetError(
                f"{where}: lora_pristine: {self.lora_pristine!r} is not host or device"
            )
        if len(self.loras) > MAX_LORAS:
            raise PresetError(f"{where}: loras: {len(self.loras)} LoRAs, at most {MAX_LORAS}")
        for i, lora in enumerate(self.loras):
            if not lora.file.strip():
                raise PresetError(f"{where}: loras[{i}].file: missing")
            if not -2.0 <= lora.scale <= 2.0:
                raise PresetError(f"{where}: loras[{i}].scale: {lora.scale} is outside -2..2")
        for key in ("osc", "oscquery", "feedback"):
            port = getattr(self.ports, key)
            if not 0 <= port <= 65535:
                raise PresetError(f"{where}: ports.{key}: {port} is not a port number")

    def replace(self, **overrides: Any) -> EnginePreset:
        """A copy with fields overridden (None values are ignored: flag not given)."""
        new = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        new.check("overrides")
        return new

    def control_defaults(self) -> dict[str, Any]:
        """The preset's values for live controls whose registry defaults are fixed."""
        return {
            "seed": self.seed,
            "kv_bias": self.kv_bias,
            "transition/blocks": self.transition_blocks,
            "transition/method": self.transition_method,
            "decoder": self.decoder,
            "vace/source": self.vace.source.strip() or "none",
            "vace/fit": self.vace.fit,
            "vace/mask": self.vace.mask,
        } | {
            k: v
            for n, lora in enumerate(self.loras, start=1)
            for k, v in ((f"lora/{n}/file", lora.file.strip()), (f"lora/{n}/scale", lora.scale))
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- reading -------------------------------------------------------------------------------


def _where(file: str, node: yaml.Node) -> str:
    return f"{file}:{node.start_mark.line + 1}"


def _convert(tp: Any, node: yaml.Node, file: str, key: str) -> Any:
    """Turn a YAML node into a value of type `tp`, or raise PresetError naming the line."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    here = f"{_where(file, node)}: {key}"
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and _is_null(node):
            return None
        others = [a for a in args if a is not type(None)]
        return _convert(others[0], node, file, key)
    if origin is Literal:
        v = _scalar(node, here)
        if v not in args:
            raise PresetError(f"{here}: {v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is list:
        if not isinstance(node, yaml.SequenceNode):
            raise PresetError(f"{here}: expected a list")
        return [_convert(args[0], n, file, f"{key}[{i}]") for i, n in enumerate(node.value)]
    if dataclasses.is_dataclass(tp):
        if "enabled" in {f.name for f in dataclasses.fields(tp)} and isinstance(
            node, yaml.ScalarNode
        ):
            v = _scalar(node, here)  # `vace: true` is shorthand for `vace: {enabled: true}`
            if not isinstance(v, bool):
                raise PresetError(f"{here}: expected true, false or a mapping, got {v!r}")
            return tp(enabled=v)
        return _build(tp, node, file, key + ".")
    v = _scalar(node, here)
    if tp is bool:
        if not isinstance(v, bool):
            raise PresetError(f"{here}: expected true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise PresetError(f"{here}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PresetError(f"{here}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise PresetError(f"{here}: expected a string, got {v!r}")
        return v
    raise TypeError(f"unsupported preset field type {tp!r}")  # a bug in this module


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _scalar(node: yaml.Node, here: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise PresetError(f"{here}: expected a single value")
    return yaml.safe_load(yaml.serialize(node))


def _build(cls: type, node: yaml.Node, file: str, prefix: str = "") -> Any:
    if not isinstance(node, yaml.MappingNode):
        raise PresetError(
            f"{_where(file, node)}: {prefix.rstrip('.') or 'preset'}: expected a mapping"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for knode, vnode in node.value:
        key = knode.value
        if key not in names:
            raise PresetError(
                f"{_where(file, knode)}: unknown key {prefix}{key!s} (known: {', '.join(sorted(names))})"
            )
        if key in values:
            raise PresetError(f"{_where(file, knode)}: {prefix}{key} given twice")
        values[key] = _convert(hints[key], vnode, file, prefix + key)
    return cls(**values)


def parse_preset(text: str, file: str = "<preset>") -> EnginePreset:
    """Parse and validate preset YAML; errors name `file` and the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PresetError(f"{file}{line}: invalid YAML: {problem}") from None
    if node is None:
        raise PresetError(f"{file}: empty preset file")
    preset = _build(EnginePreset, node, file)
    preset.check(file)
    return preset


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`tiny`, `h100-832x480`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise PresetError(f"{p}: preset file not found")
        return p
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise PresetError(
            f"unknown preset {str(name_or_path)!r}; available: {', '.join(available_presets())}"
        )
    return candidate


def load_preset(name_or_path: str | Path) -> EnginePreset:
    path = preset_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PresetError(f"{path}: cannot read: {e}") from None
    preset = parse_preset(text, str(path))
    if not preset.name:
        preset.name = path.stem
    return preset


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
