"""`dreamdeck osc`: the reference lists every address; docs/osc.md is current; --send works."""

from __future__ import annotations

import html
from pathlib import Path

from osc_helpers import Listener

from bridges.osc.addresses import BRIDGE_ADDRESSES
from bridges.osc.reference import render_markdown
from engine.cli import main
from engine.runtime.controls import make_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "osc.md"


def test_docs_osc_md_is_generated_from_the_registry():
    assert DOC.read_text(encoding="utf-8") == render_markdown(make_registry()), (
        "docs/osc.md is stale: run `dreamdeck osc --markdown > docs/osc.md`"
    )


def test_list_and_html_show_every_address(capsys, tmp_path):
    assert main(["osc", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    reg = make_registry()
    for p in reg:
        assert p.address in lines, p.address
        assert p.description in lines[p.address]
        if p.range:
            lo, hi = (int(x) if float(x).is_integer() else x for x in p.range)
            assert f"{lo}..{hi}" in lines[p.address]
    for b in BRIDGE_ADDRESSES:
        assert b.address in lines
    page = tmp_path / "osc.html"
    assert main(["osc", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    for p in reg:
        assert f"<td>{html.escape(p.address)}</td>" in text


def test_send_and_usage_errors(capsys):
    fb = Listener()
    try:
        assert (
            main(["osc", "--send", "/dd/prompt", "a forest", "--to", f"127.0.0.1:{fb.port}"]) == 0
        )
        assert (
            main(["osc", "--send", "/dd/steps", "1000", "500", "--to", f"127.0.0.1:{fb.port}"]) == 0
        )
        fb.wait(lambda a, args: a == "/dd/prompt" and args == ("a forest",))
        fb.wait(lambda a, args: a == "/dd/steps" and args == (1000, 500))
    finally:
        fb.close()
    assert main(["osc"]) == 2
    assert main(["osc", "--send", "dd/x"]) == 2
    assert main(["osc", "--send", "/dd/x", "--to", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--send" in err and "--to" in err
