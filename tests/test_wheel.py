"""A non-editable install works: the wheel carries the presets, MIDI maps, TouchDesigner kit
and example timelines, and the installed `dreamdeck` finds them with no source tree.

Real build (pip wheel, offline: no build isolation, no dependencies fetched), real virtual
environment (with the system's site-packages, so torch and pip are not installed again), real
`dreamdeck` commands run from an empty folder with no PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject lists packages (it maps the shipped folders, see there): a package added
    to engine/ or bridges/ without a line there would be missing from the wheel."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("engine", "bridges")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages"


def test_shipped_dir_names_what_is_missing():
    from engine.shipped import shipped_dir

    assert (shipped_dir("presets/engine") / "tiny.yaml").is_file()
    assert (shipped_dir("touchdesigner") / "dreamdeck_shm_top.py").is_file()
    with pytest.raises(ValueError, match="unknown shipped folder 'nope'"):
        shipped_dir("nope")


def _copy_source(dst: Path) -> None:
    """The source tree without build leftovers (the build writes into its source folder)."""
    top_only = {".git", "build", "dist", "tests", "recordings", "models", ".whl", ".out"}
    anywhere = shutil.ignore_patterns(
        "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "*.mp4"
    )

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(anywhere(folder, names))
        return skip | (top_only & set(names)) if Path(folder) == ROOT else skip

    shutil.copytree(ROOT, dst, ignore=ignore)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_installs_and_runs_from_anywhere(tmp_path):
    src, wheels, venv, elsewhere = (tmp_path / n for n in ("src", "wheels", "venv", "elsewhere"))
    _copy_source(src)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INPUT"] = "1"

    def sh(*cmd, cwd=elsewhere, timeout=300):
        r = subprocess.run(
            [str(c) for c in cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    pip_offline = ["--no-deps", "--no-build-isolation", "--no-index", "-q"]
    sh(sys.executable, "-m", "pip", "wheel", *pip_offline, "-w", wheels, src)
    (wheel,) = wheels.glob("dreamdeck-*.whl")
    # No pip of its own (ensurepip takes seconds): the system's pip, seen through the system
    # site-packages, installs into the environment that runs it.
    sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    sh(py, "-m", "pip", "install", *pip_offline, wheel)
    shutil.rmtree(src)  # nothing may come from the source tree any more

    where = sh(py, "-c", "import engine.shipped as s; print(s.shipped_dir('presets/midi'))")
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(venv) and (installed / "nanokontrol2.yaml").is_file()
    for kind, name in (("touchdesigner", "dreamdeck_shm_top.py"), ("timelines", None)):
        folder = sh(py, "-c", f"import engine.shipped as s; print(s.shipped_dir('{kind}'))")
        folder = Path(folder.stdout.strip())
        assert folder.is_relative_to(venv)
        assert (folder / name).is_file() if name else any(folder.glob("*.json"))

    dreamdeck = venv / ("Scripts" if os.name == "nt" else "bin") / "dreamdeck"
    run = sh(dreamdeck, "run", "--model", "tiny", "--blocks", "3", "--no-osc", "--no-shm")
    assert "unknown preset" not in run.stderr
    check = sh(dreamdeck, "midi", "check", "nanokontrol2")
    assert f"{installed / 'nanokontrol2.yaml'}: ok:" in check.stdout  # the wheel's copy
