"""Reading Wan2.1 LoRA files (safetensors) in the layouts found in the wild, onto our
Wan-native module names.

Layouts (`FORMATS`):
- "diffusers": diffusers / PEFT names (`transformer.blocks.N.attn1.to_q.lora_A.weight`,
  `lora_B`, `attn2` for cross-attention, `ffn.net.0.proj`, `ffn.net.2`, optional
  `.alpha`; `lora_B.bias` is a bias difference);
- "wan": Wan-native / ComfyUI (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
  `lora_up`, `.alpha`; also `lora_A` / `lora_B`);
- "kohya": flattened names (`lora_unet_blocks_N_self_attn_q.lora_down.weight`), as
  musubi-tuner and kohya's scripts write them;
- any of them may carry full differences, `.diff` (a weight) and `.diff_b` (a bias).

Why two passes: the safetensors header alone (a few hundred kB even for a 14B LoRA)
tells the layout, every target, every shape, and so which base model the file fits and
how much memory it needs. `read_lora_header` checks all of that without reading a tensor,
so a controller naming a wrong file gets its error at once, on its own thread;
`load_lora` then reads the tensors (off the generation thread: engine/models/lora.py).

Scale: a low-rank pair adds strength · (alpha / rank) · up @ down to the weight (alpha
defaults to rank, i.e. scale 1, as PEFT and diffusers read files without `.alpha`);
differences add strength · diff.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from engine.models.lora import LoraError

FORMATS = ("diffusers", "wan", "kohya")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
}


# --------------------------------------------------------------------------- names

# Per-block modules, Wan-native name -> diffusers name.
_BLOCK_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Modules outside the blocks, Wan-native -> diffusers.
_TOP_DIFFUSERS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_FROM_DIFFUSERS_BLOCK = {v: k for k, v in _BLOCK_DIFFUSERS.items()}
_FROM_DIFFUSERS_TOP = {v: k for k, v in _TOP_DIFFUSERS.items()}
_WAN_BLOCK = set(_BLOCK_DIFFUSERS)
_WAN_TOP = set(_TOP_DIFFUSERS)
# kohya flattening: "self_attn_q" -> "self_attn.q" (Wan and diffusers spellings both)
_FLAT_BLOCK = {k.replace(".", "_"): k for k in _WAN_BLOCK} | {
    v.replace(".", "_"): k for k, v in _BLOCK_DIFFUSERS.items()
}
_FLAT_TOP = {k.replace(".", "_"): k for k in _WAN_TOP} | {
    v.replace(".", "_"): k for k, v in _TOP_DIFFUSERS.items()
}
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FLAT_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")

# key suffix -> the part of a target it fills
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_A.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".alpha", "alpha"),
)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(layout hint, module name as written, part) of a tensor key, or None if unknown."""
    layout = "wan"
    name = key
    for p in _KOHYA_PREFIXES:
        if name.startswith(p):
            layout, name = "kohya", name[len(p) :]
            break
    else:
        for p in _PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                break
    for suffix, part in _SUFFIXES:
        if name.endswith(suffix):
            return layout, name[: -len(suffix)], part
    return None


def wan_module_name(name: str, layout: str) -> tuple[str, str] | None:
    """(Wan-native module name, layout) for a module as a file names it, or None."""
    if layout == "kohya":
        m = _FLAT_BLOCK_RE.match(name)
        if m and m.group(2) in _FLAT_BLOCK:
            return f"blocks.{int(m.group(1))}.{_FLAT_BLOCK[m.group(2)]}", "kohya"
        if name in _FLAT_TOP:
            return _FLAT_TOP[name], "kohya"
        return None
    m = _BLOCK_RE.match(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest in _WAN_BLOCK:
            return f"blocks.{i}.{rest}", "wan"
        if rest in _FROM_DIFFUSERS_BLOCK:
            return f"blocks.{i}.{_FROM_DIFFUSERS_BLOCK[rest]}", "diffusers"
        return None
    if name in _WAN_TOP:
        return name, "wan"
    if name in _FROM_DIFFUSERS_TOP:
        return _FROM_DIFFUSERS_TOP[name], "diffusers"
    return None


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _DTYPES.get(self.dtype, (None, 4))[1]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor key -> dtype and shape, from the header only. Raises LoraError naming the
    file when it is not a safetensors file or is shorter than its header says."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoraError(f"{p}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or n > size - 8:
                raise LoraError(
                    f"{p}: not a safetensors file (header length {n} does not fit a"
                    f" {size}-byte file){' - truncated?' if 2 <= n <= MAX_HEADER else ''}"
                )
            raw = f.read(n)
    except OSError as e:
        raise LoraError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraError(f"{p}: not a safetensors file (the header is not JSON)") from None
    except RecursionError:  # [[[[...]]]]: a hostile header, not a safetensors one
        raise LoraError(f"{p}: not a safetensors file (the header nests too deep)") from None
    if not isinstance(header, dict):
        raise LoraError(f"{p}: not a safetensors file (the header is not a JSON object)")
    data = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
            raise LoraError(f"{p}: not a safetensors file (bad header entry {key[:80]!r})")
        shape, offsets = v["shape"], v["data_offsets"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise LoraError(f"{p}: not a safetensors file (bad header entry {key[:80]!r})")
        if v["dtype"] not in _DTYPES:
            raise LoraError(f"{p}: {key[:80]}: unsupported dtype {v['dtype']!r}")
        info = TensorInfo(key, v["dtype"], tuple(shape))
        if offsets[1] > data or offsets[1] - offsets[0] != info.nbytes:
            raise LoraError(
                f"{p}: truncated or corrupt: tensor {key[:80]!r} ends at byte {offsets[1]}"
                f" of a {data}-byte data section"
            )
        out[key] = info
    if not out:
        raise LoraError(f"{p}: the file holds no tensors")
    return out


# --------------------------------------------------------------------------- layout


@dataclass
class TargetInfo:
    """What a file does to one module (Wan-native name), from the header."""

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # part -> tensor key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # part -> shape

    @property
    def rank(self) -> int | None:
        d = self.shapes.get("down")
        return d[0] if d else None


@dataclass
class LoraInfo:
    """A LoRA file's layout, read from its header: see `read_lora_header`."""

    path: Path
    format: str
    targets: dict[str, TargetInfo]
    nbytes: int  # of the tensors as stored
    alphas: dict[str, float] = field(default_factory=dict)  # module -> alpha (read on load)

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for t in self.targets.values() if t.rank is not None})

    @property
    def rank(self) -> int | None:
        r = self.ranks
        return max(r) if r else None

    @property
    def base(self) -> str | None:
        """The first model config (engine.models.wan.CONFIGS) whose shapes fit every target."""
        fits = fitting_bases(self)
        return fits[0] if fits else None

    def target_kinds(self) -> list[str]:
        """Module kinds targeted (block index folded: `self_attn.q`, `ffn.0`, `head.head`)."""
        kinds = {_BLOCK_RE.sub(r"\2", m) for m in self.targets}
        return sorted(kinds)

    def blocks(self) -> list[int]:
        return sorted({int(m.group(1)) for t in self.targets if (m := _BLOCK_RE.match(t))})

    def parts(self) -> list[str]:
        return sorted({p for t in self.targets.values() for p in t.keys if p != "alpha"})


def read_lora_header(path: str | os.PathLike) -> LoraInfo:
    """Read and check a LoRA file's layout from its header (no tensor is read). Raises
    LoraError naming the file and what is wrong: not safetensors, truncated, keys of no
    module we have (listing a few), a pair with mismatched ranks, mixed layouts."""
    p = Path(path)
    header = read_safetensors_header(p)
    targets: dict[str, TargetInfo] = {}
    layouts: set[str] = set()
    unknown: list[str] = []
    for key, info in header.items():
        split = _split_key(key)
        mapped = wan_module_name(split[1], split[0]) if split else None
        if mapped is None:
            unknown.append(key)
            continue
        module, layout = mapped
        layouts.add(layout)
        part = split[2]
        t = targets.setdefault(module, TargetInfo(module))
        if part in t.keys:
            raise LoraError(f"{p}: {module} has two {part} tensors ({t.keys[part]}, {key})")
        t.keys[part] = key
        t.shapes[part] = info.shape
    if unknown:
        shown = ", ".join(unknown[:4]) + (
            f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        )
        raise LoraError(
            f"{p}: {len(unknown)} tensor(s) target modules this Wan2.1 transformer does not"
            f" have (or are not LoRA tensors): {shown}"
        )
    fmt = "kohya" if "kohya" in layouts else ("diffusers" if "diffusers" in layouts else "wan")
    for t in targets.values():
        _check_target(p, t)
    return LoraInfo(p, fmt, targets, sum(i.nbytes for i in header.values()))


def _check_target(path: Path, t: TargetInfo) -> None:
    s = t.shapes
    has_pair = "down" in s or "up" in s
    if has_pair and not ("down" in s and "up" in s):
        missing = "up (lora_B / lora_up)" if "down" in s else "down (lora_A / lora_down)"
        raise LoraError(f"{path}: {t.module}: the {missing} half of the pair is missing")
    if has_pair:
        d, u = s["down"], s["up"]
        if len(d) != 2 or len(u) != 2 or d[0] != u[1] or d[0] == 0:
            raise LoraError(
                f"{path}: {t.module}: down {list(d)} and up {list(u)} are not a rank-r pair"
            )
    if "alpha" in s and len(s["alpha"]) > 1:
        raise LoraError(
            f"{path}: {t.module}: alpha has shape {list(s['alpha'])}, expected a scalar"
        )
    if "alpha" in s and not has_pair:
        raise LoraError(f"{path}: {t.module}: alpha without a lora_down/lora_up pair")
    if not has_pair and "diff" not in s and "diff_b" not in s:
        raise LoraError(f"{path}: {t.module}: nothing to apply")


# --------------------------------------------------------------------------- bases


@cache
def _param_shapes(config: str) -> dict[str, tuple[int, ...]]:
    """Wan-native parameter name -> shape of a model config (built on meta: no memory)."""
    from engine.models.wan import CONFIGS, WanModel

    with torch.device("meta"):
        m = WanModel(CONFIGS[config])
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def expected_shapes(t: TargetInfo, config: str) -> dict[str, tuple[int, ...]] | None:
    """The shapes each part of `t` must have on a model of `config`; None if that model
    has no such module (a block index past its layers)."""
    shapes = _param_shapes(config)
    w, b = shapes.get(t.module + ".weight"), shapes.get(t.module + ".bias")
    if w is None:
        return None
    out: dict[str, tuple[int, ...]] = {"diff": w}
    if b is not None:
        out["diff_b"] = b
    if len(w) == 2:
        r = t.rank or 0
        out["down"], out["up"] = (r, w[1]), (w[0], r)
    return out


def mismatch(t: TargetInfo, config: str) -> str | None:
    """Why `t` does not fit a model of `config` (its shape and the model's), or None."""
    want = expected_shapes(t, config)
    if want is None:
        return f"{t.module}: no such module in the {config} model"
    for part, shape in t.shapes.items():
        if part == "alpha":
            continue
        if part not in want:
            return f"{t.module}.{part}: the {config} model has no such parameter"
        if tuple(shape) != want[part]:
            return f"{t.module}.{part}: file {list(shape)}, {config} model {list(want[part])}"
    return None


def fitting_bases(info: LoraInfo, configs: Iterable[str] | None = None) -> list[str]:
    from engine.models.wan import CONFIGS

    out = []
    for c in configs or CONFIGS:
        if all(mismatch(t, c) is None for t in info.targets.values()):
            out.append(c)
    return out


def check_fits(info: LoraInfo, config: str) -> None:
    """Raise LoraError when the file does not fit a model of `config`, naming both shapes
    (and the model it does fit, if any)."""
    for t in info.targets.values():
        why = mismatch(t, config)
        if why is not None:
            other = info.base
            fits = f"; the file fits the {other} model" if other and other != config else ""
            raise LoraError(f"{info.path}: made for another model: {why}{fits}")


# --------------------------------------------------------------------------- tensors


@dataclass
class LoraTarget:
    """One module's update: strength · (scale · up @ down + diff), bias += strength · diff_b."""

    module: str
    down: Tensor | None = None  # [r, in]
    up: Tensor | None = None  # [out, r]
    alpha: float | None = None
    diff: Tensor | None = None  # the weight's shape
    diff_b: Tensor | None = None  # the bias's shape

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (1 when the file has no alpha)."""
        if self.down is None or self.alpha is None:
            return 1.0
        return float(self.alpha) / self.rank


@dataclass
class LoraFile:
    info: LoraInfo
    targets: dict[str, LoraTarget]

    @property
    def path(self) -> Path:
        return self.info.path


def load_lora(path: str | os.PathLike, info: LoraInfo | None = None) -> LoraFile:
    """Read a LoRA file's tensors (on the CPU, as stored). `info` from
    `read_lora_header` (read here when not given). Raises LoraError on a file that
    changed or cannot be read."""
    from safetensors import SafetensorError, safe_open

    info = info or read_lora_header(path)
    p = Path(path)
    targets: dict[str, LoraTarget] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for name, t in info.targets.items():
                lt = LoraTarget(name)
                for part, key in t.keys.items():
                    x = f.get_tensor(key)
                    if part == "alpha":
                        a = float(x.float().reshape(-1)[0]) if x.numel() else None
                        if a is not None and not (a == a and abs(a) < 1e30):
                            raise LoraError(f"{p}: {name}: alpha is not a finite number")
                        lt.alpha = a
                    else:
                        if not x.is_floating_point():
                            raise LoraError(f"{p}: {key}: not a floating-point tensor")
                        setattr(lt, part, x)
                targets[name] = lt
    except SafetensorError as e:
        raise LoraError(f"{p}: cannot read the tensors: {e}") from None
    except OSError as e:
        raise LoraError(f"{p}: cannot read: {e}") from None
    return LoraFile(info, targets)


def read_alphas(info: LoraInfo) -> dict[str, float | None]:
    """module -> alpha (None where the file has none), reading only the alpha scalars."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, float | None] = {}
    try:
        with safe_open(str(info.path), framework="pt", device="cpu") as f:
            for name, t in info.targets.items():
                key = t.keys.get("alpha")
                out[name] = float(f.get_tensor(key).float().reshape(-1)[0]) if key else None
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{info.path}: cannot read: {e}") from None
    return out


def device_bytes(info: LoraInfo, dtype: torch.dtype) -> int:
    """Bytes the file's tensors take on the device once cast to `dtype`."""
    el = torch.tensor([], dtype=dtype).element_size()
    n = 0
    for t in info.targets.values():
        for part, shape in t.shapes.items():
            if part != "alpha":
                n += math.prod(shape) * el
    return n


def check_lora(
    path: str | os.PathLike,
    config: str | None,
    dtype: torch.dtype = torch.bfloat16,
    max_bytes: int | None = None,
) -> LoraInfo:
    """Header-only checks (fast, no tensor read): a safetensors LoRA of a known layout
    that fits a model of `config` and the memory budget. Raises LoraError naming the
    file and the problem."""
    info = read_lora_header(path)
    if config is not None:
        check_fits(info, config)
    need = device_bytes(info, dtype)
    if max_bytes is not None and need > max_bytes:
        raise LoraError(
            f"{info.path}: needs {need / 2**20:.1f} MiB on the device, over the LoRA"
            f" memory budget of {max_bytes / 2**20:.1f} MiB"
        )
    return info


def summary(info: LoraInfo, alphas: dict[str, float | None] | None = None) -> dict:
    """`dreamdeck lora inspect`'s JSON: format, rank, alpha, targets, base (and details)."""
    alpha_set = sorted({a for a in (alphas or {}).values() if a is not None})
    return {
        "file": str(info.path),
        "format": info.format,
        "rank": info.rank,
        "ranks": info.ranks,
        "alpha": alpha_set[0] if len(alpha_set) == 1 else (alpha_set or None),
        "scale": (alpha_set[0] / info.rank) if len(alpha_set) == 1 and info.rank else None,
        "targets": info.target_kinds(),
        "modules": len(info.targets),
        "blocks": len(info.blocks()),
        "parts": info.parts(),
        "base": info.base,
        "bytes": info.nbytes,
    }
