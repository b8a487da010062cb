"""Every `docs/NAME.md §N` a docstring cites exists in this repository's docs/ with a
section N (a citation a reader cannot follow is worse than none)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/([\w.-]+\.md)((?:\s*§\d+,?)*)")


def _citations():
    for py in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("bridges/**/*.py")]):
        for m in CITE.finditer(py.read_text(encoding="utf-8")):
            yield py.relative_to(ROOT), m.group(1), re.findall(r"§(\d+)", m.group(2))


def test_cited_docs_and_sections_exist():
    cites = list(_citations())
    assert len(cites) >= 5  # the model and stream modules cite the streaming model
    for src, name, sections in cites:
        doc = ROOT / "docs" / name
        assert doc.is_file(), f"{src} cites docs/{name}, which does not exist"
        heads = set(re.findall(r"^##\s+(\d+)\.", doc.read_text(encoding="utf-8"), re.M))
        for n in sections:
            assert n in heads, f"{src} cites docs/{name} §{n}, which has no section {n}"


def test_no_bare_citation_of_a_doc_outside_docs():
    bare = re.compile(r"(?<![/\w])(streaming-model|control-surface|targets|architecture)\.md")
    for py in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("bridges/**/*.py")]):
        text = py.read_text(encoding="utf-8")
        assert not bare.search(text), f"{py.relative_to(ROOT)} cites a doc without its path"
