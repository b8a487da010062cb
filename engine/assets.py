"""File paths that arrive from the network, confined to the assets folder.

A performer's controller may name a reference image (``/dd/vace/ref/1 "cat.png"``) or a
control video; the engine must never open a file outside the folder it was given, whatever
the path says: no ``..``, no absolute paths elsewhere, no symlink that points out, no
device files. OSC, the timeline player and VACE all resolve through `resolve_asset`.
It sits at the top of `engine` (no imports of its own) so the stream and the runtime can
both use it without the stream depending on the runtime.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

MAX_PATH = 1024  # characters; a longer path from a controller is a mistake


class AssetError(ValueError):
    """A path that cannot be used: outside the assets folder, missing, or not a file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def resolve_asset(
    path: str | os.PathLike[str], assets_dir: str | os.PathLike[str], *, must_exist: bool = True
) -> Path:
    """The real path of `path` inside `assets_dir`, or AssetError naming why not.

    Relative paths are taken from `assets_dir`; backslashes count as separators (paths
    typed on Windows); an absolute path is allowed only if it lies inside. Symlinks are
    followed and the *target* must lie inside too. With ``must_exist`` (the default) the
    result is an existing regular file.
    """
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise AssetError(repr(raw)[:120], "path must be text")
    shown = raw[:120]
    if not raw.strip():
        raise AssetError(shown, "empty path")
    if len(raw) > MAX_PATH:
        raise AssetError(shown, f"path of {len(raw)} characters, more than {MAX_PATH}")
    if "\x00" in raw:
        raise AssetError(shown, "path contains a NUL character")
    root = Path(assets_dir).resolve()
    if not root.is_dir():
        raise AssetError(str(assets_dir), "assets folder does not exist")
    text = raw.replace("\\", "/")
    if len(text) >= 2 and text[1] == ":" and text[0].isalpha():
        raise AssetError(shown, "a drive letter path is outside the assets folder")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise AssetError(shown, "'..' is not allowed in asset paths")
    candidate = Path(text) if text.startswith("/") else root / text
    try:
        real = candidate.resolve(strict=must_exist)
    except FileNotFoundError:
        raise AssetError(shown, "no such file in the assets folder") from None
    except (OSError, RuntimeError) as e:  # symlink loops, permission
        raise AssetError(shown, f"cannot resolve: {e}") from None
    if real != root and not real.is_relative_to(root):
        raise AssetError(shown, "outside the assets folder")
    if must_exist:
        try:
            mode = real.stat().st_mode
        except OSError as e:
            raise AssetError(shown, f"cannot read: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise AssetError(shown, "not a regular file")
    return real
