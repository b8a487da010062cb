"""Model files already in the Hugging Face cache are used where they are: nothing is
downloaded or copied. A real cache layout on disk (models--ORG--NAME/refs/main and
snapshots/COMMIT/...), read through huggingface_hub's own lookup; no network at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_download import COMMIT, hub, hub_files  # noqa: F401 - hub: the stand-in hub fixture

from engine.weights import catalog
from engine.weights.download import download_files

NEEDS = catalog.Needs(model="14b", decoder="tae", vace=False)


def fill_hf_cache(cache: Path, files) -> dict[str, Path]:
    data = hub_files()
    where = {}
    for f in files:
        if (f.repo, f.filename) not in data:
            continue  # the optional file the repo lacks
        repo = cache / ("models--" + f.repo.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        p = repo / "snapshots" / COMMIT / f.filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data[(f.repo, f.filename)])
        where[f.filename] = p
    return where


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    return fill_hf_cache(c, catalog.required_files(NEEDS))


def test_files_in_the_hf_cache_are_used_in_place(tmp_path, cache, hub):  # noqa: F811
    models = tmp_path / "models"
    assert catalog.missing_files(NEEDS, models) == []
    files = catalog.resolve_files(NEEDS, models)
    assert files["transformer"] == cache["krea-realtime-video-14b.safetensors"]
    assert files["tokenizer"] == cache["google/umt5-xxl/tokenizer.json"].parent
    said: list[str] = []
    paths = download_files(catalog.required_files(NEEDS), models, endpoint=hub.url, say=said.append)
    assert set(paths) == set(cache.values())
    assert not models.exists() or not any(models.rglob("*"))  # nothing copied
    # nothing fetched; the hub was asked only about the optional file nobody has
    assert [c for c, _, _ in hub.log if c == "GET"] == []
    asked = {path.split("/resolve/")[1] for _, path, _ in hub.log}
    assert asked == {"main/google/umt5-xxl/special_tokens_map.json"}, asked
    assert sum(line.startswith("present") for line in said) == len(cache), said


def test_a_broken_cached_copy_is_not_used_and_the_models_folder_wins(tmp_path, cache):
    models = tmp_path / "models"
    model = cache["krea-realtime-video-14b.safetensors"]
    model.write_bytes(model.read_bytes()[:40])  # truncated
    missing = catalog.missing_files(NEEDS, models)
    f = catalog.FILES["transformer"]
    assert [(m.path, m.reason) for m in missing] == [(f.path(models), "missing")]
    # a copy in the models folder is the one used, whatever the cache holds
    own = f.path(models)
    own.parent.mkdir(parents=True)
    own.write_bytes(hub_files()[(f.repo, f.filename)])
    assert catalog.resolve_files(NEEDS, models)["transformer"] == own
    assert catalog.missing_files(NEEDS, models) == []


def test_no_cache_folder_means_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nowhere"))
    models = tmp_path / "models"
    f = catalog.FILES["transformer"]
    assert f.find(models) == f.path(models)
    assert f.path(models) in [m.path for m in catalog.missing_files(NEEDS, models)]
