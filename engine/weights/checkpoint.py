"""Reading checkpoint files and putting them into modules, with errors that name the
file and the key.

Both formats the model family ships in are read here: safetensors (memory-mapped, so a
28 GB file never needs a second full copy in host memory) and PyTorch `.pth` (loaded with
``weights_only=True`` and ``mmap=True``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class WeightsError(Exception):
    """A weights file is missing, unreadable or does not fit the model. The message names
    the file (and the key, where one is at fault)."""


def _check_safetensors_header(path: Path) -> None:
    """Catch a truncated download before safetensors reports something cryptic."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise WeightsError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path}: truncated file: its header needs {8 + n + end} bytes but the file has {size}"
            " (an interrupted download? run `dreamdeck download` again to resume)"
        )


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.pth`/`.pt` file, memory-mapped where possible."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        _check_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: cannot read safetensors file: {e}") from None
    try:
        sd = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}"
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return dict(sd)


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Drop `prefix` when every key carries it (some exports wrap the model)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_state_dict(
    module: nn.Module, sd: Mapping[str, torch.Tensor], *, file: str | Path, strict: bool = True
) -> None:
    """Raise WeightsError unless `sd`'s tensors have `module`'s shapes and (strict) `sd`
    has exactly `module`'s keys. Names the file, the keys and both shapes."""
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}")
        raise WeightsError(f"{file}: does not fit {type(module).__name__}: " + "; ".join(parts))
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{file}: key {k!r} has shape {tuple(v.shape)} in the file but the model expects"
                f" {tuple(own[k].shape)} (wrong model size or a different checkpoint?)"
            )


def assign_state_dict(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    file: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> None:
    """Put `sd` into `module` by assignment (no second copy when dtype and device match),
    after checking keys and shapes. The module may live on the meta device.

    Errors name the file, the key and both shapes. Buffers that are not in the module's
    state dict (non-persistent) are left as they are.
    """
    own = module.state_dict(keep_vars=True)
    check_state_dict(module, sd, file=file, strict=strict)
    converted = {}
    for k, v in sd.items():
        if k not in own:
            continue
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else own[k].dtype
        if own[k].is_meta:
            target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        target_device = (
            device if device is not None else (v.device if own[k].is_meta else own[k].device)
        )
        converted[k] = v.to(device=target_device, dtype=target_dtype)
    module.load_state_dict(converted, strict=False, assign=True)


def materialize_(module: nn.Module, device: str | torch.device) -> nn.Module:
    """`module.to_empty(device=device)` for a module built on the meta device, without
    `torch.empty_like`: on meta tensors that goes through torch._refs, whose first call
    imports sympy (about a second of CPU in every process that builds a model, each
    `dreamdeck run --model tiny` and every rank of a CPU world among them)."""
    device = torch.device(device)
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
