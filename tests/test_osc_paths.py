"""resolve_asset: network-supplied paths stay inside the assets folder."""

from __future__ import annotations

import os

import pytest

from engine.assets import AssetError, resolve_asset


@pytest.fixture
def tree(tmp_path):
    assets = tmp_path / "assets"
    (assets / "refs").mkdir(parents=True)
    (assets / "refs" / "cat.png").write_bytes(b"png")
    (assets / "top.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", assets / "escape.png")  # points outside
    os.symlink(assets / "refs" / "cat.png", assets / "alias.png")  # points inside
    os.symlink(tmp_path, assets / "updir")  # a directory link out
    return assets


@pytest.mark.parametrize(
    "path, expected",
    [
        ("refs/cat.png", "refs/cat.png"),
        ("top.png", "top.png"),
        ("./refs//cat.png", "refs/cat.png"),
        ("refs\\cat.png", "refs/cat.png"),
        ("alias.png", "refs/cat.png"),
    ],
)
def test_inside_paths_resolve(tree, path, expected):
    assert resolve_asset(path, tree) == (tree / expected).resolve()


def test_absolute_inside_is_fine(tree):
    assert resolve_asset(str(tree / "top.png"), tree) == (tree / "top.png").resolve()


@pytest.mark.parametrize(
    "path, word",
    [
        ("../secret.txt", ".."),
        ("refs/../../secret.txt", ".."),
        ("..\\secret.txt", ".."),
        ("/etc/passwd", "outside"),
        ("escape.png", "outside"),
        ("updir/secret.txt", "outside"),
        ("C:\\Windows\\win.ini", "drive letter"),
        ("missing.png", "no such file"),
        ("refs", "not a regular file"),
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("x" * 2000, "more than"),
    ],
)
def test_escapes_and_bad_paths_refused(tree, path, word):
    with pytest.raises(AssetError) as e:
        resolve_asset(path, tree)
    assert word in e.value.reason


def test_missing_assets_dir_and_not_yet_existing_file(tmp_path, tree):
    with pytest.raises(AssetError, match="assets folder does not exist"):
        resolve_asset("x.png", tmp_path / "nope")
    # must_exist=False: a file to be written (a recording) still cannot escape.
    assert (
        resolve_asset("new/take1.mp4", tree, must_exist=False) == tree.resolve() / "new/take1.mp4"
    )
    with pytest.raises(AssetError, match="outside"):
        resolve_asset("updir/x.mp4", tree, must_exist=False)
