"""Timelines and control logs turned into per-block registry changes.

Two kinds of show file:

- Daydream Scope's exported timelines, versions 2.0 and 2.1: ``{"version", "prompts":
  [segments], "settings": {...}}``, where a segment is ``{"startTime", "endTime",
  "prompts": [{"text", "weight" 0..100}], "transitionSteps",
  "temporalInterpolationMethod"}`` on a time axis in seconds of output video, and the
  settings hold ``pipelineId``, ``resolution`` {height, width}, ``seed``,
  ``denoisingSteps``, ``kvCacheAttentionBias``, ``quantization`` (null or
  ``"fp8_e4m3fn"``) and, from 2.1, ``loras`` ([{path, scale, mergeMode}]). Scope makes
  them for several pipelines; one made for another pipeline than Krea Realtime renders
  here with a warning (prompts and timing carry over, the picture will not). Unknown keys
  are kept (``Show.extra``) with a warning.
- Our control logs (``*.controls.jsonl``, engine/runtime/control_log.py): the controls
  every block of a recorded show used, replayed block for block.

Time to blocks, at the model's 16 fps: block 0 makes frames 0..8, block k >= 1 frames
9 + 12(k-1) .. 9 + 12k - 1. A segment starting at T seconds applies from the first block
whose first frame is at or after 16·T. A show of D seconds renders the fewest blocks
that make at least round(16·D) frames.

A bridge: this module only produces registry changes; `dreamdeck render` (and a live
timeline player) apply them with `registry.set_many` before `registry.begin_block`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.runtime.control_log import ControlLogError, is_control_log, read_control_log

log = logging.getLogger(__name__)

FPS = 16
FIRST_BLOCK_FRAMES = 9
BLOCK_FRAMES = 12
MAX_PROMPTS = 8

SEGMENT_KEYS = {"startTime", "endTime", "prompts", "transitionSteps", "temporalInterpolationMethod"}
# Known keys that do not steer a text-to-video render here (chunk indices are derived from
# times; noise/cache/quantisation settings belong to Daydream's own pipeline or to V2V).
SEGMENT_IGNORED = {"startChunk", "endChunk", "initCache", "softCut"}
SETTINGS_KEYS = {
    "resolution",
    "seed",
    "denoisingSteps",
    "kvCacheAttentionBias",
    "loras",  # v2.1: [{"path": ..., "scale": ...}]: loaded into lora/1.. at block 0
    "loraMergeStrategy",  # v2.1: how Daydream fixes strengths; ours stay live (read, noted)
    "pipelineId",
    "quantization",
}
SETTINGS_IGNORED = {"inputMode", "noiseScale", "noiseController", "manageCache"}
VERSIONS = ("2.0", "2.1")
KREA_PIPELINE = "krea-realtime-video"
QUANTIZATION = {"fp8_e4m3fn": "fp8"}  # Scope's name -> ours (preset `fp8`)
MAX_LORAS = 4  # the engine's LoRA slots
TOP_KEYS = {"prompts", "settings", "version"}
TOP_IGNORED = {"exportedAt", "recording", "recordingDuration"}
METHODS = ("linear", "slerp")


class TimelineError(ValueError):
    """A show file that cannot be used: names the file and the JSON path (prompts[2].endTime)."""


class ShowWarnings:
    """Warnings about one show file, summarised: the first `per_kind` of each kind are
    logged, the rest counted and reported in one line each by `summarise()`. One timeline
    with thousands of segments carrying the same unknown key once wrote 9,865 lines."""

    def __init__(self, path: Path | str, per_kind: int = 3):
        self.path = path
        self.per_kind = per_kind
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self._summarised: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n == 1:
            self.examples[kind] = message
        if n <= self.per_kind:
            log.warning("%s", message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summarise(self) -> None:
        """One line per kind for what was not logged since the last summary (parsing and
        rendering each summarise; nothing is counted twice)."""
        for kind, n in self.counts.items():
            unlogged = n - self.per_kind - self._summarised.get(kind, 0)
            if unlogged > 0:
                log.warning("%s: %d more warnings like this: %s", self.path, unlogged, kind)
                self._summarised[kind] = self._summarised.get(kind, 0) + unlogged


def first_frame(block: int) -> int:
    return 0 if block == 0 else FIRST_BLOCK_FRAMES + BLOCK_FRAMES * (block - 1)


def block_frames(block: int) -> int:
    return FIRST_BLOCK_FRAMES if block == 0 else BLOCK_FRAMES


def block_at(seconds: float) -> int:
    """The first block whose first frame is at or after 16·seconds."""
    f = FPS * seconds - 1e-9  # a time written as 0.75 means frame 12, not 12.000000001
    if f <= 0:
        return 0
    return 1 + max(0, math.ceil((f - FIRST_BLOCK_FRAMES) / BLOCK_FRAMES))


def blocks_for(seconds: float) -> int:
    """The fewest blocks that make at least round(16·seconds) frames (at least one)."""
    frames = round(FPS * seconds)
    if frames <= FIRST_BLOCK_FRAMES:
        return 1
    return 1 + math.ceil((frames - FIRST_BLOCK_FRAMES) / BLOCK_FRAMES)


@dataclass
class Segment:
    start: float
    end: float | None
    prompts: list[tuple[str, float]]  # weights 0..1
    transition_blocks: int | None = None
    transition_method: str | None = None

    @property
    def block(self) -> int:
        return block_at(self.start)


@dataclass
class Show:
    """A show file, ready to apply block by block."""

    path: Path
    kind: str  # "timeline" | "control-log"
    blocks: int
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    steps: list[int] | None = None
    kv_bias: float | None = None
    quantization: str | None = None  # "fp8" (weights in float8) or None
    lora_merge: str | None = None  # v2.1 loraMergeStrategy (read; strengths stay live here)
    pipeline: str | None = None  # the Scope pipeline the timeline was made for
    segments: list[Segment] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, scale), v2.1
    records: list[dict[str, Any]] = field(default_factory=list)  # control logs
    # control logs of recordings started mid-show: the first `lead_in` records are the
    # history before the recording (run to rebuild the stream's state, not output)
    lead_in: int = 0
    # control logs: why a render cannot make exactly the recorded frames, or None
    inexact: str | None = None
    header: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept
    warnings: ShowWarnings | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.warnings is None:
            self.warnings = ShowWarnings(self.path)

    def changes_at(
        self, block: int, *, skip: frozenset[str] = frozenset(), known: Any = None
    ) -> tuple[dict[str, Any], list[str]]:
        """(registry changes, trigger paths) to apply before `block` begins. `skip` drops
        paths the caller overrides (e.g. ``steps`` when --steps is given); `known`, when
        given, is a container of declared paths (unknown ones are dropped with a warning)."""
        if self.kind == "timeline":
            changes = self._timeline_changes(block)
            events: list[str] = []
        else:
            changes, events = self._log_changes(block)
        out = {}
        for k, v in changes.items():
            if k in skip:
                continue
            if known is not None and k not in known:
                assert self.warnings is not None
                self.warnings.warn(
                    f"unknown control {k!r} skipped",
                    f"{self.path}: block {block}: unknown control {k!r} skipped",
                )
                continue
            out[k] = v
        return out, [e for e in events if known is None or e in known]

    def prompt_at(self, block: int) -> dict[str, Any] | None:
        """For control logs: the prompt target the recorded engine actually set at this
        block (see control_log.py), so replay starts transitions where the show did."""
        if self.kind != "control-log" or block >= len(self.records):
            return None
        return self.records[block].get("prompt")

    def _timeline_changes(self, block: int) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if block == 0:
            if self.seed is not None:
                changes["seed"] = self.seed
            if self.steps is not None:
                changes["steps"] = list(self.steps)
            if self.kv_bias is not None:
                changes["kv_bias"] = self.kv_bias
            for n, (file, scale) in enumerate(self.loras, start=1):
                changes[f"lora/{n}/file"] = file
                changes[f"lora/{n}/scale"] = scale
        for seg in self.segments:
            if seg.block != block:
                continue
            # Several segments on one block: the last one wins (set_many keeps the latest).
            if seg.transition_blocks is not None:
                changes["transition/blocks"] = seg.transition_blocks
            if seg.transition_method is not None:
                changes["transition/method"] = seg.transition_method
            changes["prompts"] = [[t, w] for t, w in seg.prompts]
        return changes

    def _log_changes(self, block: int) -> tuple[dict[str, Any], list[str]]:
        if block >= len(self.records):
            return {}, []
        rec = self.records[block]
        # Block 0 applies the whole recorded state, so defaults of this build do not matter.
        changes = dict(rec["values"]) if block == 0 else dict(rec["changed"])
        return changes, list(rec["events"])


def load_show(path: str | Path) -> Show:
    """A Daydream v2.0 timeline (.json) or a dreamdeck control log (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise TimelineError(f"{path}: file not found")
    if is_control_log(path):
        return _load_control_log(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise TimelineError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise TimelineError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return parse_timeline(data, path)


def _load_control_log(path: Path) -> Show:
    try:
        clog = read_control_log(path)
    except ControlLogError as e:
        raise TimelineError(str(e)) from None
    if not clog.blocks:
        raise TimelineError(f"{path}: control log without blocks")
    h = clog.header
    records = clog.preamble + clog.blocks
    first = records[0]["values"]
    return Show(
        path=path,
        kind="control-log",
        blocks=len(clog.blocks),
        lead_in=len(clog.preamble),
        inexact=clog.reproducible(),
        height=h.get("height"),
        width=h.get("width"),
        seed=first.get("seed"),
        steps=first.get("steps"),
        kv_bias=first.get("kv_bias"),
        records=records,
        header=h,
    )


def _bounds(lo: float | None, hi: float | None) -> str:
    """'0..100', 'at least 0' or 'at most 8': never '0..None'."""
    if lo is not None and hi is not None:
        return f"outside {lo}..{hi}"
    return f"below the minimum {lo}" if lo is not None else f"above the maximum {hi}"


def _num(x: Any, where: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TimelineError(f"{where}: expected a number, got {x!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise TimelineError(f"{where}: {x} is {_bounds(lo, hi)}")
    return float(x)


def _int(x: Any, where: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TimelineError(f"{where}: expected an integer, got {x!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise TimelineError(f"{where}: {x} is {_bounds(lo, hi)}")
    return x


_INDEX = re.compile(r"\[\d+\]")


def _unknown(
    obj: Mapping[str, Any],
    known: set[str],
    ignored: set[str],
    where: str,
    file: Path,
    extra: dict,
    warnings: ShowWarnings | None = None,
) -> None:
    for k in obj:
        if k in known:
            continue
        if k in ignored:
            log.debug("%s: %s%s: not used by dreamdeck", file, where, k)
            continue
        message = f"{file}: {where}{k}: unknown key kept, not used"
        if warnings is None:
            log.warning("%s", message)
        else:  # one kind per key, whatever the segment: prompts[].color
            kind = _INDEX.sub("[]", where)
            warnings.warn(f"unknown key {kind}{k}", message)
        extra[f"{where}{k}"] = obj[k]


def parse_timeline(data: Any, path: str | Path = "<timeline>") -> Show:
    """Validate a Daydream v2.0 timeline; errors name the file and the JSON path."""
    path = Path(path)

    def err(where: str, why: str) -> TimelineError:
        return TimelineError(f"{path}: {where}: {why}")

    if not isinstance(data, dict):
        raise TimelineError(f"{path}: expected a JSON object with prompts and settings")
    extra: dict[str, Any] = {}
    warnings = ShowWarnings(path)
    version = data.get("version")
    if version is None:
        raise err("version", 'missing (expected "2.0")')
    if not isinstance(version, str) or not version.startswith("2."):
        raise err("version", f"{version!r} is not a version 2 timeline")
    if version not in VERSIONS:
        log.warning("%s: timeline version %s, read as %s", path, version, VERSIONS[-1])
    _unknown(data, TOP_KEYS, TOP_IGNORED, "", path, extra, warnings)

    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise err("settings", "expected an object")
    _unknown(settings, SETTINGS_KEYS, SETTINGS_IGNORED, "settings.", path, extra, warnings)
    height = width = seed = kv_bias = None
    steps = None
    if "resolution" in settings:
        res = settings["resolution"]
        if not isinstance(res, dict):
            raise err("settings.resolution", 'expected {"height": H, "width": W}')
        for key in ("height", "width"):
            if key not in res:
                raise err(f"settings.resolution.{key}", "missing")
            v = _int(res[key], f"{path}: settings.resolution.{key}", lo=16, hi=4096)
            if v % 16:
                raise err(f"settings.resolution.{key}", f"{v} is not a multiple of 16")
            if key == "height":
                height = v
            else:
                width = v
    if settings.get("seed") is not None:
        seed = _int(settings["seed"], f"{path}: settings.seed", lo=0, hi=2**31 - 1)
    if settings.get("denoisingSteps") is not None:
        raw = settings["denoisingSteps"]
        if not isinstance(raw, list) or not raw:
            raise err("settings.denoisingSteps", "expected a non-empty list of timesteps")
        from engine.stream.schedule import StepsError, validate_steps

        try:
            steps = list(validate_steps(raw))
        except StepsError as e:
            raise err("settings.denoisingSteps", str(e)) from None
    if settings.get("kvCacheAttentionBias") is not None:
        kv_bias = _num(
            settings["kvCacheAttentionBias"],
            f"{path}: settings.kvCacheAttentionBias",
            lo=0.01,
            hi=1.0,
        )

    pipeline = settings.get("pipelineId")
    if pipeline is not None and not isinstance(pipeline, str):
        raise err("settings.pipelineId", f"expected a string, got {pipeline!r}")
    if pipeline is not None and pipeline != KREA_PIPELINE:
        log.warning(
            "%s: this timeline was made for Scope's %r pipeline, not %r: dreamdeck renders"
            " its prompts and timing with Krea Realtime, so the picture will differ",
            path,
            pipeline,
            KREA_PIPELINE,
        )
    quantization = None
    if settings.get("quantization") is not None:
        q = settings["quantization"]
        if q not in QUANTIZATION:
            raise err(
                "settings.quantization",
                f"{q!r} is not one of null, {', '.join(map(repr, QUANTIZATION))}",
            )
        quantization = QUANTIZATION[q]
    loras = _loras(settings, path, err)

    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise err("prompts", "expected a non-empty list of segments")
    segments: list[Segment] = []
    for i, seg in enumerate(prompts):
        where = f"prompts[{i}]"
        if not isinstance(seg, dict):
            raise err(where, "expected an object")
        _unknown(seg, SEGMENT_KEYS, SEGMENT_IGNORED, f"{where}.", path, extra, warnings)
        if "startTime" not in seg:
            raise err(f"{where}.startTime", "missing")
        start = _num(seg["startTime"], f"{path}: {where}.startTime", lo=0)
        end = None
        if seg.get("endTime") is not None:
            end = _num(seg["endTime"], f"{path}: {where}.endTime", lo=0)
            if end <= start:
                raise err(f"{where}.endTime", f"{end} is not after startTime {start}")
        if segments and start < segments[-1].start:
            raise err(
                f"{where}.startTime",
                f"{start} is before the previous segment's {segments[-1].start}",
            )
        items = seg.get("prompts")
        if not isinstance(items, list) or not items:
            raise err(f"{where}.prompts", 'expected a non-empty list of {"text", "weight"}')
        if len(items) > MAX_PROMPTS:
            raise err(f"{where}.prompts", f"{len(items)} prompts, at most {MAX_PROMPTS}")
        weighted: list[tuple[str, float]] = []
        for j, item in enumerate(items):
            iw = f"{where}.prompts[{j}]"
            if not isinstance(item, dict):
                raise err(iw, 'expected {"text": ..., "weight": 0..100}')
            _unknown(item, {"text", "weight"}, set(), f"{iw}.", path, extra, warnings)
            text = item.get("text")
            if not isinstance(text, str) or not text.strip():
                raise err(f"{iw}.text", "missing or empty")
            weight = _num(item.get("weight", 100), f"{path}: {iw}.weight", lo=0, hi=100)
            weighted.append((text, weight / 100.0))
        if all(w == 0 for _, w in weighted):
            raise err(f"{where}.prompts", "all weights are 0")
        tb = tm = None
        if seg.get("transitionSteps") is not None:
            tb = _int(seg["transitionSteps"], f"{path}: {where}.transitionSteps", lo=0, hi=64)
        if seg.get("temporalInterpolationMethod") is not None:
            tm = seg["temporalInterpolationMethod"]
            if tm not in METHODS:
                raise err(
                    f"{where}.temporalInterpolationMethod",
                    f"{tm!r} is not one of {', '.join(METHODS)}",
                )
        segments.append(Segment(start, end, weighted, tb, tm))

    if segments[0].block != 0:
        log.warning(
            "%s: the first segment starts at %ss; it applies from block 0", path, segments[0].start
        )
        segments[0].start = 0.0
    by_block: dict[int, int] = {}
    for i, s in enumerate(segments):
        if s.block in by_block:
            warnings.warn(
                "segments starting in the same block (the later one wins)",
                f"{path}: prompts[{by_block[s.block]}] and prompts[{i}] start in the same block"
                f" {s.block}: the later one wins",
            )
        by_block[s.block] = i
    warnings.summarise()  # what parsing found; render summarises what playing finds
    duration = max(s.end if s.end is not None else s.start for s in segments)
    return Show(
        path=path,
        kind="timeline",
        blocks=blocks_for(duration),
        height=height,
        width=width,
        seed=seed,
        steps=steps,
        kv_bias=kv_bias,
        quantization=quantization,
        pipeline=pipeline,
        segments=segments,
        loras=loras,
        lora_merge=settings.get("loraMergeStrategy"),
        extra=extra,
        warnings=warnings,
    )


def _loras(settings: Mapping[str, Any], path: Path, err: Any) -> list[tuple[str, float]]:
    """v2.1 `settings.loras`: (file, scale) for the lora/{n} slots. A path from another
    machine (absolute, or with a drive letter) is looked up by its file name in the
    assets folder; whether the file is there is checked when render applies it (a
    missing one is reported by name and the show renders without it)."""
    raw = settings.get("loras")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise err("settings.loras", 'expected a list of {"path": ..., "scale": ...}')
    if len(raw) > MAX_LORAS:
        raise err("settings.loras", f"{len(raw)} LoRAs, at most {MAX_LORAS} slots")
    out = []
    for i, item in enumerate(raw):
        where = f"settings.loras[{i}]"
        if not isinstance(item, dict):
            raise err(where, 'expected {"path": ..., "scale": ...}')
        name = next((item[k] for k in ("path", "file", "name") if k in item), None)
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            raise err(f"{where}.path", "missing, empty or not a file name")
        mode = item.get("mergeMode")  # Scope's per-LoRA choice; ours stay live
        if mode is not None and not isinstance(mode, str):
            raise err(f"{where}.mergeMode", f"expected a string, got {mode!r}")
        text = name.strip().replace("\\", "/")
        if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            text = text.rsplit("/", 1)[-1]
        scale = _num(item.get("scale", 1.0), f"{path}: {where}.scale", lo=-2.0, hi=2.0)
        out.append((text, scale))
    strategy = settings.get("loraMergeStrategy")
    if strategy is not None and not isinstance(strategy, str):
        raise err("settings.loraMergeStrategy", f"expected a string, got {strategy!r}")
    if strategy is not None and raw:
        log.info(
            "%s: loraMergeStrategy %r: dreamdeck keeps LoRA strengths live (no choice needed)",
            path,
            strategy,
        )
    return out
