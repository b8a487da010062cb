"""The control log: one JSON line per block with the controls that block used.

It is what makes a show replayable: `dreamdeck render show.controls.jsonl` applies the
same changes at the same blocks (at any resolution or step list) and, with the same
model and settings, reproduces the frames.

Format (JSON lines, UTF-8):

- line 1, a header: ``{"dreamdeck": "control-log", "version": 1, "model": ..., "height":
  ..., "width": ..., "fps": 16, "preset": ..., "started": <time.time()>}``
- then one line per block: `BlockControls.to_json()` (``block``, ``time``, ``values``,
  ``changed``, ``events``) plus ``frames`` (frames of this block in the recording, 0 when
  the recorder had to drop the block) and ``prompt`` (the prompt target the block driver
  actually set at this block, if any: live prompt changes start when their encoding is
  ready, which may be a block or two after the change arrived).

Each line is flushed as it is written, so a killed engine leaves a log up to its last block.

Version 2 adds what a recording started mid-show needs to replay exactly. A block depends on
every block since the stream last started afresh (a reset, with no prompt transition under
way: `BlockResult.clean`), so the engine keeps those records (`ControlHistory`) and a
recording that starts later writes them first, as *preamble* lines (``"preamble": true``):
`render` runs them without output, then renders the recorded blocks. The header says
``"clock"`` (``wall``: frames stamped with live output times; ``model``: one frame every
1/16 s, as `render` makes them) and ``"history"``: ``"complete"`` (the preamble, possibly
empty, reaches back to a clean block) or a sentence saying why the recording cannot be
replayed exactly. Block lines also carry ``index``, the stream's block index since its
last reset (0: a fresh stream).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

MAGIC = "control-log"
VERSION = 2
READABLE = (1, 2)
HISTORY_COMPLETE = "complete"
MAX_HISTORY = 200_000  # blocks kept since the last clean block (about 40 h of a live show)


class ControlLogError(ValueError):
    """A control log that cannot be read: names the file and the line."""


def log_path_for(recording: str | Path) -> Path:
    """``show.mp4`` -> ``show.controls.jsonl`` (next to the recording)."""
    p = Path(recording)
    return p.with_name(p.stem + ".controls.jsonl")


class ControlLogWriter:
    """Appends block records; flushes every line (a crash keeps what was written).

    The header is written with the first line (or at `close`), so the history status of a
    recording started mid-show, known only when its first block arrives, goes into it:
    `begin` writes the header with that status and the preamble."""

    def __init__(self, path: str | Path, header: Mapping[str, Any]):
        self.path = Path(path)
        self._f: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._header: dict[str, Any] | None = {
            "dreamdeck": MAGIC,
            "version": VERSION,
            "started": time.time(),
            "history": HISTORY_COMPLETE,
            **header,
        }

    def _write(self, obj: Mapping[str, Any]) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: control log already closed")
        if self._header is not None:
            head, self._header = self._header, None
            self._line(head)
        self._line(obj)

    def _line(self, obj: Mapping[str, Any]) -> None:
        assert self._f is not None
        self._f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._f.flush()

    def begin(self, preamble: list[Mapping[str, Any]], history: str) -> None:
        """Header (with `history`: HISTORY_COMPLETE or why not) and the preamble lines.
        Only before the first block line; later calls change nothing."""
        if self._header is None:
            return
        self._header["history"] = history
        self._write_header()
        for rec in preamble:
            self._write({**rec, "preamble": True})

    def _write_header(self) -> None:
        if self._header is not None:
            head, self._header = self._header, None
            self._line(head)

    def write_block(self, record: Mapping[str, Any]) -> None:
        self._write(record)

    def close(self) -> None:
        if self._f is not None:
            self._write_header()
            self._f.close()
            self._f = None


class ControlHistory:
    """The records since the stream last started afresh: what a recording that starts now
    must carry to be replayed exactly. Bounded: past `max_blocks` records without a clean
    block it gives up (and says so) until the next clean block.

    Only the first record keeps its full ``values``; the rest keep their changes (a replay
    applies ``values`` at its first block and ``changed`` after), so an hour of show costs
    a few megabytes. Written by the generation thread only.
    """

    def __init__(self, max_blocks: int = MAX_HISTORY):
        self.max_blocks = max_blocks
        self._records: list[dict[str, Any]] = []
        self._why: str | None = "no block made yet"

    def add(
        self, record: Mapping[str, Any], *, clean: bool, rest_prompt: Mapping[str, Any] | None
    ) -> None:
        if clean:
            first = dict(record)
            if "prompt" not in first and rest_prompt is not None:
                first["prompt"] = dict(rest_prompt)
            self._records = [first]
            self._why = None
            return
        if self._why is not None:
            return
        if len(self._records) >= self.max_blocks:
            self._records = []
            self._why = (
                f"the stream ran {self.max_blocks} blocks without a reset before the"
                " recording started; send /dd/reset before recording to make it replayable"
            )
            return
        self._records.append({k: v for k, v in record.items() if k != "values"} | {"values": {}})

    def preamble(self) -> tuple[list[dict[str, Any]], str]:
        """(records to write before the recording's first block, history status): the
        status is HISTORY_COMPLETE or why the recording will not replay exactly."""
        if self._why is not None:
            return [], self._why
        return list(self._records), HISTORY_COMPLETE


@dataclass
class ControlLog:
    header: dict[str, Any]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    preamble: list[dict[str, Any]] = field(default_factory=list)

    def reproducible(self) -> str | None:
        """None when `render` can make exactly the recorded frames, else why not."""
        if not self.blocks:
            return "no blocks recorded"
        history = self.header.get("history", HISTORY_COMPLETE)
        if history != HISTORY_COMPLETE:
            return str(history)
        first = self.preamble[0] if self.preamble else self.blocks[0]
        index = first.get("index")
        if index is None:  # version 1: a log that starts at block 0 of the engine replays
            if first["block"] != 0 and "reset" not in first["events"]:
                return (
                    f"the recording started at block {first['block']}, in the middle of the"
                    " stream, and its log carries no history since the last reset"
                    " (recorded by an older dreamdeck)"
                )
        elif index != 0:
            return (
                f"the log starts at stream block {index}, not at a reset: the history"
                " before it is missing"
            )
        for rec in [*self.preamble, *self.blocks]:
            used = rec.get("input")
            if isinstance(used, dict) and (used.get("vace") or used.get("v2v_strength")):
                return (
                    f"block {rec['block']} was made from live input video (VACE or V2V),"
                    " which is not recorded"
                )
        return None

    @property
    def frames(self) -> int:
        return sum(int(b.get("frames", 0)) for b in self.blocks)


def is_control_log(path: str | Path) -> bool:
    """Sniff the first line (cheap; used to tell logs from timelines)."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            first = f.readline()
        return json.loads(first).get("dreamdeck") == MAGIC
    except (OSError, ValueError, AttributeError):
        return False


def read_control_log(path: str | Path) -> ControlLog:
    """Read a log. A torn last line (the engine was killed mid-write) is dropped with a
    warning; any other bad line is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ControlLogError(f"{path}: cannot read: {e}") from None
    if not lines:
        raise ControlLogError(f"{path}: empty control log")
    records = list(_parse(path, lines))
    header = records[0]
    if header.get("dreamdeck") != MAGIC:
        raise ControlLogError(f"{path}:1: not a dreamdeck control log (no header line)")
    if header.get("version") not in READABLE:
        raise ControlLogError(
            f"{path}:1: control log version {header.get('version')!r}, expected one of"
            f" {', '.join(map(str, READABLE))}"
        )
    log = ControlLog(header=header)
    prev = -1
    for lineno, rec in enumerate(records[1:], start=2):
        for key, tp in (("block", int), ("values", dict), ("changed", dict), ("events", list)):
            if not isinstance(rec.get(key), tp):
                raise ControlLogError(f"{path}:{lineno}: {key}: missing or not a {tp.__name__}")
        if rec["block"] <= prev:
            raise ControlLogError(f"{path}:{lineno}: block {rec['block']} does not follow {prev}")
        prev = rec["block"]
        if rec.get("preamble") is True:
            if log.blocks:
                raise ControlLogError(f"{path}:{lineno}: a preamble line after recorded blocks")
            log.preamble.append(rec)
        else:
            log.blocks.append(rec)
    return log


def _parse(path: Path, lines: list[str]) -> Iterator[dict[str, Any]]:
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # torn last line of a killed engine: said, then dropped
                log.warning(
                    "%s:%d: the last line is cut off (the engine stopped while writing it);"
                    " using the %d complete lines before it",
                    path,
                    i,
                    i - 1,
                )
                return
            raise ControlLogError(f"{path}:{i}: not JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ControlLogError(f"{path}:{i}: expected a JSON object")
        yield obj
