"""Start-up: how long each phase took, and compile caches that outlive the process.

A show restarts on the same machine far more often than it starts on a new one, so what
the compiler learned (Inductor's FX-graph and AOTAutograd caches, Triton kernels, autotune
results) is kept on disk under the models folder, one folder per preset, GPU and PyTorch
version: a key that changes whenever the compiled code could. PyTorch already keeps these
in a temporary folder; that folder is shared by everything on the machine and gone at the
next reboot, and a VJ's `dreamdeck warmup --preset P` before the doors open must fill the
cache that the show then reads. PyTorch reads TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR
whenever it looks up its caches, so setting them before the first compile is enough; a user
who set them already keeps theirs.

A warm folder also spares the throwaway warm-up blocks: after a run or `dreamdeck warmup`
has compiled every block variant of the preset, `warm.json` records it (with a fingerprint
of the model code that the compiled graphs came from), and the next `run` of that preset
starts the show at once. Its first blocks load their compiled code from the cache as they
run (a second or two each, measured in docs/PERFORMANCE.md) instead of the screen staying
dark through warm-up blocks whose frames are thrown away. A changed fingerprint, another
preset or a damaged marker means cold: the warm-up runs as before.

`Phases` is a stopwatch with names: `run` logs each phase as it ends and `bench --json`
reports them, so a slow start says where its time went. It also hands out progress bars
(`Phases.bar`) for the long steps: loading the transformer block by block (28 GB for the
14B) and the warm-up blocks, where compilation happens. They are tqdm bars on stderr, as
for downloads and renders, shown only on a terminal (a log file gets the phase lines).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


class Phases:
    """Named wall-clock phases, in the order they ran. Times are seconds."""

    def __init__(
        self,
        *,
        log_each: bool = True,
        t0: float | None = None,
        progress: Callable[[str, int, str], Any] | None = None,
    ) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0  # a perf_counter() reading
        self.times: dict[str, float] = {}
        self.log_each = log_each
        self.progress = progress if progress is not None else terminal_bar

    def bar(self, desc: str, total: int, unit: str = "block") -> Any:
        """A progress bar (``update()``, ``close()``) for a step of `total` units."""
        return self.progress(desc, total, unit)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds
        if self.log_each:
            log.info("start-up: %s took %.1f s", name, seconds)

    def elapsed(self) -> float:
        """Seconds since `t0` (the launch, for `run`)."""
        return time.perf_counter() - self.t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.times.items()}


def terminal_bar(desc: str, total: int, unit: str) -> Any:
    """A tqdm bar on stderr, off when stderr is not a terminal (tqdm's ``disable=None``)."""
    import sys

    import tqdm

    return tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


def ready_line(seconds: float, device: Any, attention: str | None) -> str:
    """The one line that ends the start-up: time to the first frames, memory, backend."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        mem = (
            f"GPU memory {torch.cuda.memory_allocated(idx) / 2**30:.1f} GB in use, peak"
            f" {torch.cuda.max_memory_allocated(idx) / 2**30:.1f} GB"
            f" ({torch.cuda.get_device_name(idx)})"
        )
    else:
        mem = f"host memory peak {_peak_rss_gb():.1f} GB (CPU)"
    return f"ready in {seconds:.1f} s: {mem}, attention {attention or '?'}"


def _peak_rss_gb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB else


def cache_key(preset_name: str, device: Any = None) -> str:
    """Preset, GPU (name and compute capability) and PyTorch version, as a folder name."""
    import torch

    gpu = "cpu"
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        idx = dev.index if dev is not None and dev.index is not None else 0
        major, minor = torch.cuda.get_device_capability(idx)
        gpu = f"{torch.cuda.get_device_name(idx)}-sm{major}{minor}"
    raw = f"{preset_name or 'custom'}-{gpu}-torch{torch.__version__}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw)[:160]


def compile_cache_dir(models_dir: str | Path | None, preset_name: str, device: Any = None) -> Path:
    from engine.weights.catalog import resolve_models_dir

    return resolve_models_dir(models_dir) / "compile-cache" / cache_key(preset_name, device)


def use_compile_cache(
    models_dir: str | Path | None, preset_name: str, device: Any = None
) -> Path | None:
    """Point PyTorch's compile caches at the persistent folder for this preset and GPU.
    Returns the folder, or None when the user's own TORCHINDUCTOR_CACHE_DIR is kept or the
    folder cannot be made (then PyTorch's default temporary cache is used, and we say so)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        log.info(
            "compile cache: %s (TORCHINDUCTOR_CACHE_DIR)", os.environ["TORCHINDUCTOR_CACHE_DIR"]
        )
        return None
    path = compile_cache_dir(models_dir, preset_name, device)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.warning("compile cache: cannot use %s (%s); compiling into a temporary cache", path, e)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    filled = any(p.name not in (ARTIFACTS, WARM_MARK) for p in path.iterdir())
    log.info("compile cache: %s (%s)", path, "reused" if filled else "empty: first compile")
    if not filled:
        load_cache_artifacts(path)
    return path


ARTIFACTS = "artifacts.bin"
WARM_MARK = "warm.json"
# The code whose compiled graphs the cache holds: a change here can mean new graphs, and a
# "warm" start that then compiles for minutes during the first live blocks.
_FINGERPRINT_PACKAGES = ("engine.models", "engine.stream")


def code_fingerprint() -> str:
    """A short hash of the model and stream code (the compiled graphs depend on it)."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for name in _FINGERPRINT_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).parent
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def mark_warm(path: Path | None, preset_name: str, blocks: int) -> None:
    """Record that `blocks` warm-up blocks of `preset_name` compiled into `path`."""
    if path is None or blocks < 1:
        return
    import json

    import torch

    mark = {
        "preset": preset_name,
        "blocks": int(blocks),
        "code": code_fingerprint(),
        "torch": torch.__version__,
    }
    try:
        tmp = path / (WARM_MARK + ".tmp")
        tmp.write_text(json.dumps(mark))
        tmp.replace(path / WARM_MARK)
    except OSError as e:
        log.warning("compile cache: warm marker not written to %s: %s", path, e)


def is_warm(path: Path | None, preset_name: str, blocks: int) -> bool:
    """True when `path` holds a marker of this preset, this code and PyTorch, and at least
    `blocks` warm-up blocks: the throwaway warm-up can be skipped. Anything unreadable or
    odd (a directory, a huge or hostile file) is simply not warm."""
    if path is None:
        return False
    import json

    import torch

    f = path / WARM_MARK
    try:
        if not f.is_file() or f.stat().st_size > 4096:
            return False
        mark = json.loads(f.read_text())
        if not any(p.name not in (WARM_MARK, WARM_MARK + ".tmp") for p in path.iterdir()):
            return False  # the marker outlived the cache it describes
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(mark, dict)
        and mark.get("preset") == preset_name
        and mark.get("code") == code_fingerprint()
        and mark.get("torch") == torch.__version__
        and isinstance(mark.get("blocks"), int)
        and not isinstance(mark.get("blocks"), bool)
        and mark["blocks"] >= blocks
    )


def save_cache_artifacts(path: Path) -> Path | None:
    """Write PyTorch's portable compile artifacts (`torch.compiler.save_cache_artifacts`:
    FX graphs, AOTAutograd, Triton kernels, autotune results of this process) to
    `path/artifacts.bin`. The folder's own caches serve a restart on this machine; the
    artifacts file is what makes a copied models folder start warm on another machine with
    the same GPU and PyTorch. Returns the file, or None when there was nothing to save."""
    import torch

    try:
        got = torch.compiler.save_cache_artifacts()
    except Exception as e:  # noqa: BLE001 - a cache is an optimisation; never fail the show
        log.warning("compile cache: artifacts not saved: %s", e)
        return None
    if not got:
        return None
    data, _info = got
    out = path / ARTIFACTS
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    log.info("compile cache: %d bytes of artifacts saved to %s", len(data), out)
    return out


def load_cache_artifacts(path: Path) -> bool:
    """Preload `path/artifacts.bin` (see save_cache_artifacts) into PyTorch's caches, once,
    before the first compile. A damaged or foreign file is reported and ignored: the show
    then compiles from scratch, it does not fail."""
    import torch

    f = path / ARTIFACTS
    if not f.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(f.read_bytes())
    except Exception as e:  # noqa: BLE001
        log.warning("compile cache: %s not loaded (%s); compiling from scratch", f, e)
        return False
    log.info("compile cache: artifacts loaded from %s", f)
    return info is not None
