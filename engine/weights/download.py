"""Fetching a preset's model files from the Hugging Face hub, resumably.

Why not plain `hf_hub_download`: the installed huggingface_hub (2.x) downloads to a
process-unique temporary file and deletes it when the process dies, so an interrupted
28 GB download starts again from zero. We keep huggingface_hub for everything else (URLs,
auth headers, HEAD metadata with its error types, the retrying ranged GET with a progress
bar) and own only the partial file: `<dest>.incomplete` next to the destination, continued
with an HTTP Range request on the next run, renamed into place once its size (and, for
LFS files, its sha256) checks out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from engine.weights.catalog import ModelFile, check_file, resolve_models_dir

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DISK_MARGIN = 1_000_000_000  # leave a GB free for everything else


class DownloadError(Exception):
    """A download that cannot proceed; the message says why and what to do."""


@dataclass
class Planned:
    file: ModelFile
    dest: Path
    size: int | None  # bytes, from the hub
    url: str = ""  # where to GET (the hub's redirect target for LFS files)
    etag: str | None = None
    have: int = 0  # bytes already on disk (complete file or partial)
    done: bool = False  # complete and valid: nothing to fetch
    absent: bool = False  # optional file the repo does not have

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + ".incomplete")

    @property
    def to_fetch(self) -> int:
        return 0 if self.done or self.absent else max(0, (self.size or 0) - self.have)


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _explain(e: Exception, f: ModelFile, endpoint: str) -> DownloadError:
    """Turn huggingface_hub / HTTP errors into one actionable line."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{f.repo}/{f.filename}"
    if isinstance(e, GatedRepoError):
        return DownloadError(
            f"{f.repo} is gated: accept its terms at https://huggingface.co/{f.repo} and set HF_TOKEN"
            " to a token of that account (https://huggingface.co/settings/tokens)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return DownloadError(
            f"{f.repo}: repository not found or not accessible (private? set HF_TOKEN to a token"
            " that can read it)"
        )
    if isinstance(e, RevisionNotFoundError):
        return DownloadError(f"{where}: revision not found on the hub")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return DownloadError(
                f"{where}: access denied (HTTP {status}); set HF_TOKEN to a token with read access"
            )
        return DownloadError(f"{where}: the hub answered HTTP {status}: {str(e).splitlines()[0]}")
    return DownloadError(
        f"cannot reach the Hugging Face hub at {endpoint} for {where}: {type(e).__name__}: {e}"
        " (offline, behind a proxy, or a wrong HF_ENDPOINT?)"
    )


def _is_not_found(e: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(e, EntryNotFoundError):
        return True
    status = getattr(getattr(e, "response", None), "status_code", None)
    return (
        isinstance(e, HfHubHTTPError)
        and not isinstance(e, RepositoryNotFoundError)
        and status == 404
    )


def plan(
    files: Sequence[ModelFile],
    models_dir: str | Path | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    revision: str = "main",
) -> list[Planned]:
    """What each file needs. Complete, valid files are not looked up (works offline); the
    others get a HEAD request for size, etag and download location."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    ep = _endpoint(endpoint)
    root = resolve_models_dir(models_dir)
    out = []
    for f in files:
        p = Planned(f, f.find(root), None)  # the Hugging Face cache's copy, if whole
        if check_file(p.dest) is None:
            p.done, p.size = True, p.dest.stat().st_size
            p.have = p.size
            out.append(p)
            continue
        p.dest = root / f.repo / f.filename  # fetched into the models folder
        rev = f.revision if f.revision != "main" else revision
        url = hf_hub_url(f.repo, f.filename, revision=rev, endpoint=ep)
        try:
            meta = get_hf_file_metadata(url, token=token, endpoint=ep, timeout=10)
        except Exception as e:
            if f.optional and _is_not_found(e):
                p.absent = True
                out.append(p)
                continue
            raise _explain(e, f, ep) from None
        if meta.commit_hash is None or meta.etag is None:
            raise DownloadError(
                f"{url}: the answer lacks the hub's X-Repo-Commit/ETag headers; is HF_ENDPOINT ({ep}) a"
                " Hugging Face hub?"
            )
        p.size, p.etag, p.url = meta.size, meta.etag, meta.location or url
        if p.partial.is_file():
            p.have = p.partial.stat().st_size
            if p.size is not None and p.have > p.size:  # not ours, or the file changed: restart
                p.partial.unlink()
                p.have = 0
        out.append(p)
    return out


def free_space(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(
    plans: Sequence[Planned], models_dir: str | Path | None = None, margin: int = DISK_MARGIN
) -> int:
    """Bytes still to fetch; DownloadError when they do not fit on the disk."""
    need = sum(p.to_fetch for p in plans)
    root = resolve_models_dir(models_dir)
    free = free_space(root)
    if need and need + margin > free:
        raise DownloadError(
            f"not enough disk space in {root}: {need / 1e9:.1f} GB to download (+{margin / 1e9:.0f} GB"
            f" margin) but {free / 1e9:.1f} GB free; free some space or pick another --models-dir"
        )
    return need


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    p: Planned, *, token: str | bool | None = None, endpoint: str | None = None, verify: bool = True
) -> Path:
    """Download one planned file into place, continuing its `.incomplete` part if any."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if p.done or p.absent:
        return p.dest
    ep = _endpoint(endpoint)
    headers = build_hf_headers(token=token)
    if urlparse(p.url).netloc != urlparse(ep).netloc:
        headers.pop("authorization", None)  # signed CDN urls must not get the hub token
    p.dest.parent.mkdir(parents=True, exist_ok=True)
    have = p.partial.stat().st_size if p.partial.is_file() else 0
    if have:
        log.info("%s: resuming at %.1f MB", p.file.filename, have / 1e6)
    try:
        with p.partial.open("ab") as out:
            http_get(
                p.url,
                out,
                resume_size=have,
                headers=headers,
                expected_size=p.size,
                displayed_filename=Path(p.file.filename).name,
            )
    except Exception as e:
        got = p.partial.stat().st_size if p.partial.is_file() else 0
        err = _explain(e, p.file, ep)
        raise DownloadError(
            f"{err} ({got / 1e6:.1f} MB kept in {p.partial}; run again to resume)"
        ) from None
    size = p.partial.stat().st_size
    if p.size is not None and size != p.size:
        raise DownloadError(
            f"{p.partial}: {size} bytes after download, the hub says {p.size}; run again to resume"
        )
    if verify and p.etag and _SHA256.match(p.etag):
        digest = _sha256(p.partial)
        if digest != p.etag:
            p.partial.unlink()
            raise DownloadError(
                f"{p.file.repo}/{p.file.filename}: sha256 {digest} does not match the hub's {p.etag};"
                " the partial file was removed, run again"
            )
    if verify and p.file.sha256:
        digest = _sha256(p.partial)
        if digest != p.file.sha256:
            p.partial.unlink()
            raise DownloadError(
                f"{p.file.repo}/{p.file.filename}: sha256 {digest} is not the pinned"
                f" {p.file.sha256}; the partial file was removed"
            )
    os.replace(p.partial, p.dest)
    why = check_file(p.dest)
    if why is not None:
        raise DownloadError(f"{p.dest}: downloaded but unusable: {why}")
    return p.dest


def download_files(
    files: Sequence[ModelFile],
    models_dir: str | Path | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    verify: bool = True,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Plan, check the disk, fetch. Returns the paths of all present files."""
    plans = plan(files, models_dir, endpoint=endpoint, token=token)
    need = check_disk(plans, models_dir)
    for p in plans:
        if p.done:
            say(f"present   {p.dest} ({p.size / 1e6:.1f} MB)")
        elif p.absent:
            say(f"skipped   {p.file.repo}/{p.file.filename} (optional, not in the repo)")
    if need:
        say(f"to download: {need / 1e9:.2f} GB into {resolve_models_dir(models_dir)}")
    paths = []
    for p in plans:
        if p.absent:
            continue
        if not p.done:
            fetch(p, token=token, endpoint=endpoint, verify=verify)
            say(f"done      {p.dest}")
        paths.append(p.dest)
    return paths
