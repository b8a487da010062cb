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
VERSION = 1


class ControlLogError(ValueError):
    """A control log that cannot be read: names the file and the line."""


def log_path_for(recording: str | Path) -> Path:
    """``show.mp4`` -> ``show.controls.jsonl`` (next to the recording)."""
    p = Path(recording)
    return p.with_name(p.stem + ".controls.jsonl")


class ControlLogWriter:
    """Appends block records; flushes every line (a crash keeps what was written)."""

    def __init__(self, path: str | Path, header: Mapping[str, Any]):
        self.path = Path(path)
        self._f: IO[str] | None = self.path.open("w", encoding="utf-8")
        head = {"dreamdeck": MAGIC, "version": VERSION, "started": time.time(), **header}
        self._write(head)

    def _write(self, obj: Mapping[str, Any]) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: control log already closed")
        self._f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._f.flush()

    def write_block(self, record: Mapping[str, Any]) -> None:
        self._write(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class ControlLog:
    header: dict[str, Any]
    blocks: list[dict[str, Any]] = field(default_factory=list)

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
    if header.get("version") != VERSION:
        raise ControlLogError(
            f"{path}:1: control log version {header.get('version')!r}, expected {VERSION}"
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
