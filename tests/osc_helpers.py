"""Shared helpers for the OSC tests: a real UDP feedback listener and a block loop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from bridges.osc.wire import decode


class Listener:
    """Receives feedback on a real loopback UDP socket and keeps every message."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self.messages: list[tuple[str, tuple[Any, ...]]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            with self._cond:
                self.messages += [(m.address, m.args) for m in decode(data)]
                self._cond.notify_all()

    def wait(self, pred: Callable[[str, tuple], bool], timeout: float = 2.0):
        """The first message (from the start) matching pred, waiting up to timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for m in self.messages[seen:]:
                    if pred(*m):
                        return m
                seen = len(self.messages)
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching feedback in {timeout} s; last: {self.messages[-5:]}"
                    )
                self._cond.wait(left)

    def on(self, address: str) -> list[tuple]:
        with self._cond:
            return [a for ad, a in self.messages if ad == address]

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        self._stop = True
        self._t.join(1)
        self.sock.close()


class BlockLoop:
    """Stands in for the generation thread: calls registry.begin_block at a steady rate
    (the real registry), keeping the last blocks' controls."""

    def __init__(self, registry, period: float = 0.005, keep: int = 256) -> None:
        self.registry, self.period, self.keep = registry, period, keep
        self.blocks: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            c = self.registry.begin_block(i)
            self.blocks.append(c)
            del self.blocks[: -self.keep]  # bounded: the flood test watches memory
            i += 1
            time.sleep(self.period)

    def close(self) -> None:
        self._stop.set()
        self._t.join(1)
