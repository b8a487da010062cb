"""Where the files that ship with dreamdeck are: engine presets, MIDI maps, the
TouchDesigner kit and the example timelines.

In a source checkout they sit at the top of the repository (``presets/``, ``examples/``),
where people edit them. A wheel has no repository: pyproject.toml maps those folders into
this package (``engine/shipped/presets/...``), and `importlib.resources` finds them in
whatever site-packages the wheel went to. The checkout wins when both exist, so an
editable install reads the files being edited.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]

# name -> (folder in the checkout, subpackage in a wheel)
KINDS = {
    "presets/engine": (_REPO / "presets" / "engine", ("presets", "engine")),
    "presets/midi": (_REPO / "presets" / "midi", ("presets", "midi")),
    "presets/mod": (_REPO / "presets" / "mod", ("presets", "mod")),
    "touchdesigner": (_REPO / "examples" / "touchdesigner", ("touchdesigner",)),
    "timelines": (_REPO / "examples" / "timelines", ("timelines",)),
}


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped files of `kind` (a key of `KINDS`). It exists unless
    the installation is broken, which the error says."""
    try:
        checkout, parts = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown shipped folder {kind!r}; one of {', '.join(KINDS)}") from None
    if checkout.is_dir():
        return checkout
    installed = Path(str(resources.files(__name__).joinpath(*parts)))
    if installed.is_dir():
        return installed
    raise FileNotFoundError(
        f"the shipped {kind} folder is missing (looked in {checkout} and {installed});"
        " reinstall dreamdeck"
    )
