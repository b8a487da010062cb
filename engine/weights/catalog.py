"""Which model files exist, which a preset needs, and where they live on disk.

Files land in the models folder (`--models-dir`, else `$DREAMDECK_MODELS`, else
`~/.cache/dreamdeck/models`) under `<repo id>/<path in repo>`, so a file's origin is
visible in its path and two repos' files never collide. `dreamdeck run` and `doctor` ask
`missing_files()`; when something is missing they print `download_command()`, which
fetches exactly what that preset needs.

A preset is known here only by four keys: `model` ("14b" | "1.3b" | "tiny"), `decoder`
("wan" | "tae"), `vace` (bool) and `text_encoder` (placement). Callers may pass a dict, an
`EnginePreset`, or a preset name.

Files already in the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``: where `huggingface-cli download` and diffusers put them) are
used where they are, when the models folder lacks them and the cached copy checks out,
so 28 GB that a user already has are neither downloaded nor copied again.
"""

from __future__ import annotations

import os
import shlex
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_MODELS = "DREAMDECK_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/dreamdeck/models")

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
TOKENIZER_DIR = "google/umt5-xxl"


@dataclass(frozen=True)
class ModelFile:
    role: str  # what the engine uses it for; "tokenizer" files share one role (a folder)
    repo: str
    filename: str  # path inside the repo
    size_hint: int = 0  # bytes, for messages before the hub is asked
    optional: bool = False  # absent from some revisions; missing is not an error
    revision: str = "main"  # hub revision (a commit hash pins it)
    sha256: str | None = None  # expected digest when known (checked after download)

    def path(self, models_dir: str | Path | None = None) -> Path:
        """Where the file goes in the models folder (see `find` for where it is)."""
        return resolve_models_dir(models_dir) / self.repo / self.filename

    def find(self, models_dir: str | Path | None = None) -> Path:
        """Where the file is: the models folder's copy if there is one (whole or not: a
        broken one is reported, not silently replaced), else a whole copy in the Hugging
        Face cache, else the models folder path (missing)."""
        own = self.path(models_dir)
        if own.exists():
            return own
        cached = from_hf_cache(self)
        return own if cached is None else cached


@dataclass(frozen=True)
class Missing:
    """A required file that is absent or unusable, with the reason."""

    file: ModelFile
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


GB = 1_000_000_000
FILES: dict[str, ModelFile] = {
    f.role: f
    for f in (
        ModelFile(
            "transformer",
            "krea/krea-realtime-video",
            "krea-realtime-video-14b.safetensors",
            28 * GB,
        ),
        ModelFile("vae", WAN_REPO, "Wan2.1_VAE.pth", 508_000_000),
        ModelFile("text_encoder", WAN_REPO, "models_t5_umt5-xxl-enc-bf16.pth", 11_400_000_000),
        ModelFile("taehv", "madebyollin/taehv", "taew2_1.pth", 23_000_000),
        ModelFile(
            "vace", "Kijai/WanVideo_comfy", "Wan2_1-VACE_module_14B_bf16.safetensors", 6_100_000_000
        ),
        # Frame interpolation (engine/models/rife.py): Practical-RIFE v4.25 `flownet.pkl`,
        # mirrored unchanged by Daydream (model card: licence MIT, "Mirror RIFE v4.25 from
        # Practical-RIFE", commit 52c1970). Not needed by any preset: `dreamdeck download
        # --rife` fetches it, `run --fps 30` uses it. The revision could not be resolved to
        # a full commit hash offline, nor the file's sha256, so both stay unpinned here;
        # `download` still checks the hub's LFS sha256 (its ETag). Pin them after a first
        # download: `revision=<40 hex>`, `sha256=<sha256sum of the file>`. (Searched the
        # stored hub pages again in round 2: only short hashes show, 52c1970 for the weights
        # upload and 36f1cfc for a later config.json; no full hash, no LFS sha256.)
        ModelFile("rife", "daydreamlive/RIFE", "flownet.pkl", 22_700_000),
    )
}
# The UMT5 tokenizer folder as Wan's repos lay it out. The `tokenizers` library loads tokenizer.json;
# spiece.model alone suffices (engine.models.text_encoder falls back to sentencepiece), so
# only it is required and the others are fetched when the repo has them.
TOKENIZER_FILES: tuple[ModelFile, ...] = (
    ModelFile("tokenizer", WAN_REPO, f"{TOKENIZER_DIR}/spiece.model", 4_500_000),
    ModelFile("tokenizer", WAN_REPO, f"{TOKENIZER_DIR}/tokenizer.json", 16_800_000, optional=True),
    ModelFile(
        "tokenizer", WAN_REPO, f"{TOKENIZER_DIR}/tokenizer_config.json", 2_000, optional=True
    ),
    ModelFile(
        "tokenizer", WAN_REPO, f"{TOKENIZER_DIR}/special_tokens_map.json", 2_000, optional=True
    ),
)

MODELS = ("14b", "1.3b", "tiny")
DECODERS = ("wan", "tae")


def resolve_models_dir(models_dir: str | Path | None = None) -> Path:
    """`models_dir`, else $DREAMDECK_MODELS, else ~/.cache/dreamdeck/models (expanded)."""
    if models_dir is None or str(models_dir) == "":
        models_dir = os.environ.get(ENV_MODELS) or DEFAULT_MODELS_DIR
    return Path(models_dir).expanduser()


@dataclass(frozen=True)
class Needs:
    """The few preset keys the catalog cares about."""

    model: str = "14b"
    decoder: str = "tae"
    vace: bool = False
    text_encoder: str = "gpu"
    preset: str | None = None  # the preset's name, when it came from one (for the command)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is not one of {', '.join(MODELS)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if not isinstance(self.vace, bool):
            raise ValueError(f"vace must be true or false, got {self.vace!r}")


def needs_of(preset_like: Any) -> Needs:
    """A Needs from a dict, a preset object (attributes), a preset name or path, or a Needs."""
    if isinstance(preset_like, Needs):
        return preset_like
    name = None
    if isinstance(preset_like, (str, Path)):
        from engine.runtime.presets import load_preset

        preset_like = load_preset(preset_like)
    if isinstance(preset_like, Mapping):
        get = preset_like.get
    else:
        name = getattr(preset_like, "name", None) or None

        def get(key, default=None):
            return getattr(preset_like, key, default)

    d = Needs()
    return Needs(
        model=str(get("model", d.model)),
        decoder=str(get("decoder", d.decoder)),
        vace=bool(get("vace", d.vace)),
        text_encoder=str(get("text_encoder", d.text_encoder)),
        preset=get("preset", None) if isinstance(preset_like, Mapping) else name,
    )


def required_files(preset_like: Any) -> list[ModelFile]:
    """The files a preset needs, optional ones included (they are fetched when present).

    The Wan VAE is needed with either decoder: the stream re-encodes its anchor frame
    with it (and VACE encodes its inputs with it). 1.3B has no transformer in the catalog
    (no licence-compatible streaming 1.3B checkpoint to point at): bring your own file.
    """
    n = needs_of(preset_like)
    if n.model == "tiny":
        return []
    files = []
    if n.model == "14b":
        files.append(FILES["transformer"])
    files += [FILES["vae"], FILES["text_encoder"], *TOKENIZER_FILES]
    if n.decoder == "tae":
        files.append(FILES["taehv"])
    if n.vace:
        if n.model != "14b":
            raise ValueError("VACE weights exist for the 14b model only")
        files.append(FILES["vace"])
    return files


def check_file(path: Path) -> str | None:
    """Why `path` is unusable (missing, empty, truncated, wrong format), or None if it looks
    whole. Cheap: reads headers and the zip directory only, never the tensors."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    if path.suffix == ".safetensors":
        from engine.weights.checkpoint import WeightsError, _check_safetensors_header

        try:
            _check_safetensors_header(path)
        except WeightsError as e:
            return str(e).removeprefix(f"{path}: ")
    elif path.suffix in (".pth", ".pt", ".pkl"):
        # torch.save writes a zip whose directory sits at the end: a truncated download
        # has none. (Old pickle-only files are accepted if they start like a pickle.)
        if not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                head = f.read(2)
            if not (len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)):
                return "truncated or not a PyTorch checkpoint (no zip directory)"
    elif path.suffix == ".json":
        import json

        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"invalid JSON ({e})"
    elif path.name == "spiece.model":
        with path.open("rb") as f:
            head = f.read(1)
        if head != b"\x0a":  # a serialised ModelProto starts with field 1 (pieces)
            return "not a sentencepiece model"
    return None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment on every call (as the hub
    library does at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def from_hf_cache(f: ModelFile) -> Path | None:
    """A whole copy of `f` in the Hugging Face cache (its main revision), or None. Reads
    only the local cache: no network."""
    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    try:
        hit = try_to_load_from_cache(f.repo, f.filename, cache_dir=str(cache))
    except Exception:  # noqa: BLE001 - a damaged cache is simply not used
        return None
    if not isinstance(hit, str):
        return None
    path = Path(hit)
    return path if check_file(path) is None else None


def missing_files(preset_like: Any, models_dir: str | Path | None = None) -> list[Missing]:
    """Required files that are absent or fail the header check (optional ones skipped)."""
    out = []
    for f in required_files(preset_like):
        p = f.find(models_dir)
        why = check_file(p)
        if why is not None and not (f.optional and why == "missing"):
            out.append(Missing(f, p, why))
    return out


def resolve_files(preset_like: Any, models_dir: str | Path | None = None) -> dict[str, Path]:
    """role -> path for a preset's files; "tokenizer" maps to the tokenizer folder."""
    out: dict[str, Path] = {}
    for f in required_files(preset_like):
        p = f.find(models_dir)
        if f.role == "tokenizer":
            # one folder for the tokenizer files: where they are (an absent optional
            # file must not point the folder back at an empty models folder)
            if p.is_file() or "tokenizer" not in out:
                out["tokenizer"] = p.parent
            continue
        out[f.role] = p
    return out


def download_command(preset_like: Any, models_dir: str | Path | None = None) -> str:
    """The exact `dreamdeck download ...` that fetches what `preset_like` needs."""
    n = needs_of(preset_like)
    args = ["dreamdeck", "download"]
    if n.preset:
        args += ["--preset", n.preset]
    else:
        args += ["--model", n.model, "--decoder", n.decoder]
        if n.vace:
            args.append("--vace")
    if models_dir is not None:
        args += ["--models-dir", str(models_dir)]
    return shlex.join(args)
