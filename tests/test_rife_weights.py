"""The RIFE weights file through the catalog: `dreamdeck download --rife` from a local
stand-in for the hub (tests/test_download.py's real HTTP server), the pinned sha256
check, and the engine's interpolator loading what was downloaded."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest
import torch
from test_download import FakeHub, _cli, quiet  # the same local hub server

from engine.models.rife import random_rife
from engine.runtime.interpolator import InterpolationUnavailable, build_interpolator
from engine.weights import catalog
from engine.weights.download import DownloadError, download_files


def flownet_bytes() -> bytes:
    """A file in Practical-RIFE's layout (full size, random weights, `module.` keys)."""
    buf = io.BytesIO()
    torch.save({f"module.{k}": v for k, v in random_rife(seed=1).state_dict().items()}, buf)
    return buf.getvalue()


@pytest.fixture
def hub():
    h = FakeHub()
    f = catalog.FILES["rife"]
    h.files[(f.repo, f.filename)] = flownet_bytes()
    yield h
    h.close()


def test_download_rife_then_the_engine_interpolates_with_it(tmp_path, hub):
    with pytest.raises(InterpolationUnavailable, match="download --rife"):
        build_interpolator(model="14b", device="cpu", models_dir=tmp_path)
    r = _cli(
        ["--model", "tiny", "--rife"],
        {"HF_ENDPOINT": hub.url, "DREAMDECK_MODELS": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    f = catalog.FILES["rife"]
    path = f.path(tmp_path)
    assert path.read_bytes() == hub.files[(f.repo, f.filename)]
    assert catalog.check_file(path) is None
    interp = build_interpolator(model="14b", device="cpu", models_dir=tmp_path)
    a = torch.randint(0, 256, (64, 64, 4), dtype=torch.uint8)
    b = torch.randint(0, 256, (64, 64, 4), dtype=torch.uint8)
    assert interp.frame(a, b, 0.5).shape == (64, 64, 4)


def test_a_pinned_sha256_that_does_not_match_is_refused(tmp_path, hub):
    f = catalog.FILES["rife"]
    good = hashlib.sha256(hub.files[(f.repo, f.filename)]).hexdigest()
    pinned = dataclasses.replace(f, sha256="0" * 64)
    with pytest.raises(DownloadError, match="not the pinned"):
        download_files([pinned], tmp_path, endpoint=hub.url, say=quiet)
    assert not f.path(tmp_path).exists()
    assert not list(tmp_path.rglob("*.incomplete"))  # the bad file is removed
    ok = dataclasses.replace(f, sha256=good)
    assert download_files([ok], tmp_path, endpoint=hub.url, say=quiet) == [f.path(tmp_path)]


def test_a_broken_weights_file_is_named(tmp_path):
    f = catalog.FILES["rife"]
    p = f.path(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"garbage")
    assert "not a PyTorch checkpoint" in catalog.check_file(p)
    with pytest.raises(InterpolationUnavailable, match="not a PyTorch checkpoint"):
        build_interpolator(model="14b", device="cpu", models_dir=tmp_path)
    p.write_bytes(flownet_bytes()[:5000])  # a download cut short (the zip directory is gone)
    with pytest.raises(InterpolationUnavailable, match="flownet.pkl"):
        build_interpolator(model="14b", device="cpu", models_dir=tmp_path)
    p.write_bytes(b"\x80\x02 an old pickle, cut short")  # passes the header check...
    with pytest.raises(InterpolationUnavailable, match="cannot be used"):  # ...not the load
        build_interpolator(model="14b", device="cpu", models_dir=tmp_path)
