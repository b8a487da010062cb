"""The address reference, generated from the registry: `dreamdeck osc --list`, the HTML
page (`--html FILE`) and docs/osc.md (`--markdown`; a test keeps the file current)."""

from __future__ import annotations

import html
from typing import Any

from bridges.osc.addresses import describe
from engine.runtime.registry import Registry

COLUMNS = ("address", "args", "type", "range", "default", "description")

INTRO = """\
# OSC reference

Generated from the control registry by `dreamdeck osc --markdown > docs/osc.md`; do not
edit by hand (a test compares).

`dreamdeck run` listens for OSC on UDP **127.0.0.1:9137** (`--osc-host 0.0.0.0` for the
network, `--osc-port`, `--no-osc`). OSCQuery (HTTP JSON) is on port **9138**
(`--oscquery-port`, `--no-oscquery`) and announced on zeroconf as `_oscjson._tcp` and
`_osc._udp` (`--no-zeroconf`) only when OSC listens beyond loopback, and then only on the
interfaces it listens on. OSCQuery serves at most 16 connections at once, each for at most
10 s, and answers only requests whose Host header is an IP address, `localhost`, this
machine's name (or `NAME.local`) or a name given to `--oscquery-allow-host` (DNS rebinding).

## Conventions

- One namespace, `/dd/...`, lower case, 1-based slots. Addresses are case-sensitive, as
  in OSC: `/dd/SEED` is an unknown address. A trailing `/` is ignored.
- Address patterns (OSC 1.0): `/dd/prompt/*/weight 0` mutes every slot,
  `/dd/prompt/{1,3}/weight 1`, `/dd/prompt/[2-4]/text "fog"`, `[!1]` for all but one;
  `*` and `?` stay within one level, and OSC 1.1's `//` spans any number of levels
  (`/dd//weight`). Every match takes the same arguments, all in the same block; a pattern
  that matches nothing, or a value that does not fit one of the matches, changes nothing.
  Patterns are matched in linear time and bounded: at most 256 characters, 8 levels and
  16 `{...}` alternatives; a reversed range such as `[9-1]` is an error.
- Numbers: a float is accepted where an int is declared (rounded). Out-of-range values are
  clamped, and a `/dd/warning` (address, message) says so.
- Booleans: `1`/`0`, `T`/`F`, or `on`/`off` strings. Feedback sends them as int 0/1
  (TouchDesigner's OSC In CHOP makes channels of numbers).
- Triggers fire on any non-zero value, on no argument, or on `I` (impulse); `0` does
  nothing (TouchDesigner's pulse release).
- Strings go on their own addresses. Several string arguments to a text address are
  joined with spaces (an OSC Out DAT may split a sentence).
- Lists: `/dd/steps 1000 750` as several ints, or one string `"[1000, 750]"`.
  `/dd/prompts` takes one JSON string: `[["a forest", 1.0], ["fog", 0.5]]`.
- Bundles are one transaction: all their changes land in the same block, or, if any
  message in the bundle is bad, none do (each bad message is reported on `/dd/error`).
  A future timetag schedules the bundle for that time (at most an hour ahead); the
  receiver never waits. Changes are quantised to the beat when quantise is on.
- Prompt changes (`/dd/prompt...`, `/dd/prompts`, `/dd/transition/*`) sent on their own
  do not wait for the next block: once encoded, they join the block being made at its
  next denoising step, so they show in that block's frames. Sent together with any other
  change (or modulated), they land with it at the next block, as everything else does.
- Feedback: every applied value is echoed on its own address, whoever changed it (OSC,
  MIDI, timeline), to `--osc-feedback HOST:PORT`, or else to the last sender's host on
  port **9139** (`--osc-feedback-port`; `--no-osc-feedback` for none). A new feedback
  target first gets every current value. `/dd/status/*` about once a second.
- Errors: every rejected message is answered on `/dd/error` with its address (`?` when
  the packet could not be parsed) and the reason; nothing of a rejected message or
  bundle is applied. Problems the engine finds on its own (an output that lost its
  target, an audio input gone, a recording that failed, a block that failed) are sent
  once each on `/dd/error` with the address `engine`, and stay on `/dd/status/last_error`.
- Limits: datagrams over 64 KiB and messages with more than 64 arguments are refused;
  strings longer than the parameter's limit (4096 characters; 32768 for `/dd/prompts`)
  are refused. `--osc-allow IP,IP` accepts only those senders (and loopback); others are
  dropped without an answer. When OSC listens beyond loopback, `/dd/get` is answered only
  to loopback and `--osc-allow` senders (a forged UDP sender would otherwise turn the
  engine into a reflector); repeated errors are summarised in the log, not repeated. Messages to the addresses the bridge sends (`/dd/error`,
  `/dd/warning`, `/dd/status/*`) are ignored, so a feedback loop cannot echo forever.
- File paths (reference images, control videos) are resolved only inside the assets
  folder.

## Addresses
"""


def render_text(registry: Registry) -> str:
    rows = describe(registry)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS[:-1]}
    widths = {c: min(w, 40) for c, w in widths.items()}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS[:-1]) + "  DESCRIPTION"]
    for r in rows:
        cells = [str(r[c])[: widths[c]].ljust(widths[c]) for c in COLUMNS[:-1]]
        lines.append("  ".join(cells) + "  " + r["description"])
    return "\n".join(lines) + "\n"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(registry: Registry) -> str:
    rows = describe(registry)
    params = [r for r in rows if r["type"] not in ("query", "feedback")]
    bridge = [r for r in rows if r["type"] in ("query", "feedback")]
    out = [INTRO]
    out.append("| address | args | type | range | default | applies | description |")
    out.append("|---|---|---|---|---|---|---|")
    for r in params:
        out.append(
            f"| `{r['address']}` | {_md(r['args'])} | {_md(r['type'])} | {_md(r['range'])} | "
            f"{_md(r['default'])} | {_md(r['applies'])} | {_md(r['description'])} |"
        )
    out.append("\n## Queries and feedback\n")
    out.append("| address | args | direction | description |")
    out.append("|---|---|---|---|")
    for r in bridge:
        direction = "to dreamdeck" if r["type"] == "query" else "from dreamdeck"
        out.append(
            f"| `{r['address']}` | {_md(r['args'])} | {direction} | {_md(r['description'])} |"
        )
    return "\n".join(out) + "\n"


def render_html(registry: Registry) -> str:
    rows = describe(registry)
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS) + "</tr>"
        for r in rows
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dreamdeck OSC reference</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #333; text-align: left; }}
td:first-child {{ font-family: monospace; color: #8cf; white-space: nowrap; }}
</style></head><body>
<h1>dreamdeck OSC reference</h1>
<p>UDP 127.0.0.1:9137 by default; feedback to the last sender's host on port 9139; OSCQuery on HTTP port 9138.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></body></html>
"""
