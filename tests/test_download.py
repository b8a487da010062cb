"""`dreamdeck download` against a local stand-in for the Hugging Face hub.

The server speaks the few routes huggingface_hub uses for a file: HEAD/GET
`/{repo}/resolve/{revision}/{filename}` with X-Repo-Commit, ETag (sha256 for the large files,
as the hub does for LFS), Content-Length and Range requests, and X-Error-Code on errors.
It is a real HTTP server on 127.0.0.1, not a mock.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from engine.weights import catalog
from engine.weights.download import DownloadError, Planned, check_disk, download_files

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def safetensors_bytes(n: int = 64) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(4 * n)


def pth_bytes(n: int = 64) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n)}, buf)
    return buf.getvalue()


def hub_files() -> dict[tuple[str, str], bytes]:
    files = {}
    for f in [*catalog.FILES.values(), *catalog.TOKENIZER_FILES]:
        if f.filename.endswith("special_tokens_map.json"):
            continue  # optional and absent: must be skipped, not fail
        if f.filename.endswith(".safetensors"):
            data = safetensors_bytes(4096)
        elif f.filename.endswith(".pth"):
            data = pth_bytes(2048)
        elif f.filename.endswith(".json"):
            data = b'{"model_max_length": 512}'
        else:
            data = b"\x0a" + os.urandom(300)  # starts like a sentencepiece ModelProto
        files[(f.repo, f.filename)] = data
    return files


class FakeHub:
    def __init__(self):
        self.files = hub_files()
        self.gated: set[str] = set()
        self.log: list[tuple[str, str, str | None]] = []
        self.sent: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _route(self, body: bool):
                range_ = self.headers.get("Range")
                hub.log.append((self.command, self.path, range_))
                m = re.match(r"^/(.+?/.+?)/resolve/([^/]+)/(.+)$", self.path)
                if not m:
                    self.send_response(404)
                    self.end_headers()
                    return
                repo, filename = m.group(1), m.group(3)
                if repo in hub.gated:
                    self.send_response(401)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to this repo is restricted")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files.get((repo, filename))
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                large = filename.endswith((".safetensors", ".pth"))
                etag = hashlib.sha256(data).hexdigest() if large else hashlib.sha1(data).hexdigest()
                start = 0
                if range_ and (r := re.match(r"bytes=(\d+)-$", range_)):
                    start = int(r.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    # counted before the write: once the client has read it all, the test
                    # may look at once (after the write, this thread could still be behind)
                    hub.sent[filename] = hub.sent.get(filename, 0) + len(data) - start
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._route(False)

            def do_GET(self):
                self._route(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


def quiet(_: str) -> None:
    pass


def test_fetches_exactly_what_the_preset_needs(tmp_path, hub):
    needs = catalog.Needs(model="14b", decoder="tae", vace=False)
    files = catalog.required_files(needs)
    paths = download_files(files, tmp_path, endpoint=hub.url, say=quiet)
    assert catalog.missing_files(needs, tmp_path) == []
    for f in files:
        p = f.path(tmp_path)
        if f.optional and (f.repo, f.filename) not in hub.files:
            assert not p.exists()
            continue
        assert p in paths and p.read_bytes() == hub.files[(f.repo, f.filename)]
    got = {path.split("/resolve/")[1] for _, path, _ in hub.log}
    assert not any("VACE" in g for g in got)  # not asked for
    assert not list(tmp_path.rglob("*.incomplete"))
    hub.log.clear()
    download_files(files, tmp_path, endpoint=hub.url, say=quiet)  # all present: nothing fetched
    assert [c for c, p, _ in hub.log if c == "GET"] == []


def test_resumes_a_partial_file(tmp_path, hub):
    f = catalog.FILES["transformer"]
    data = hub.files[(f.repo, f.filename)]
    part = f.path(tmp_path).with_name(f.path(tmp_path).name + ".incomplete")
    part.parent.mkdir(parents=True)
    cut = len(data) * 3 // 5
    part.write_bytes(data[:cut])
    download_files([f], tmp_path, endpoint=hub.url, say=quiet)
    assert f.path(tmp_path).read_bytes() == data and not part.exists()
    assert ("GET", f"/{f.repo}/resolve/main/{f.filename}", f"bytes={cut}-") in hub.log
    assert hub.sent[f.filename] == len(data) - cut


def test_corrupt_partial_is_caught_by_sha256(tmp_path, hub):
    f = catalog.FILES["vae"]
    data = hub.files[(f.repo, f.filename)]
    part = f.path(tmp_path).with_name(f.path(tmp_path).name + ".incomplete")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * (len(data) // 2))
    with pytest.raises(DownloadError, match="sha256"):
        download_files([f], tmp_path, endpoint=hub.url, say=quiet)
    assert not part.exists() and not f.path(tmp_path).exists()
    download_files([f], tmp_path, endpoint=hub.url, say=quiet)  # the next run starts clean
    assert f.path(tmp_path).read_bytes() == data


def test_gated_repo_and_missing_file_messages(tmp_path, hub):
    hub.gated.add("krea/krea-realtime-video")
    with pytest.raises(DownloadError, match="HF_TOKEN"):
        download_files([catalog.FILES["transformer"]], tmp_path, endpoint=hub.url, say=quiet)
    gone = catalog.ModelFile("x", "madebyollin/taehv", "nope.pth")
    with pytest.raises(DownloadError, match="nope.pth"):
        download_files([gone], tmp_path, endpoint=hub.url, say=quiet)
    assert not (tmp_path / "krea").exists()


def test_disk_check_refuses_before_fetching(tmp_path):
    f = catalog.FILES["transformer"]
    huge = Planned(f, f.path(tmp_path), size=10**18)
    with pytest.raises(DownloadError, match="not enough disk space"):
        check_disk([huge], tmp_path)
    assert check_disk([Planned(f, f.path(tmp_path), size=10, done=True)], tmp_path) == 0


def _cli(args, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DREAMDECK_MODELS", "HF_ENDPOINT")}
    env.update({"HF_HUB_DISABLE_TELEMETRY": "1", **env_extra})
    return subprocess.run(
        [sys.executable, "-m", "engine", "download", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_download_through_hf_endpoint(tmp_path, hub):
    r = _cli(
        ["--decoder", "wan", "--vace"], {"HF_ENDPOINT": hub.url, "DREAMDECK_MODELS": str(tmp_path)}
    )
    assert r.returncode == 0, r.stderr
    assert catalog.missing_files({"model": "14b", "decoder": "wan", "vace": True}, tmp_path) == []
    assert not catalog.FILES["taehv"].path(tmp_path).exists()  # wan decoder: no TAEHV
    assert catalog.FILES["vace"].path(tmp_path).exists()


def test_cli_download_hub_down(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _cli(["--models-dir", str(tmp_path)], {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert r.returncode == 1
    assert "cannot reach the Hugging Face hub" in r.stderr
    assert not list(tmp_path.rglob("*.safetensors"))
    r = _cli(["--preset", "no-such-preset"], {})
    assert r.returncode == 2 and "no-such-preset" in r.stderr
