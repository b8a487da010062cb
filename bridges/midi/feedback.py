"""MIDI out: current values back to controllers that show them (LED rings, pad lights,
motorised faders), for every mapping with ``feedback:``.

Registry listeners run on the generation thread at each block boundary, so they only
queue: a sender thread does the MIDI output. The queue keeps the latest messages per
mapping, so a burst of changes cannot pile up behind a slow port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from bridges.midi.messages import Router
from engine.runtime.registry import Change

log = logging.getLogger(__name__)


class Feedback:
    def __init__(self, router: Router, send: Callable[[Any], None]):
        self.router = router
        self.send = send
        self._paths = router.feedback_paths()
        self._pending: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._unsubscribe = router.registry.subscribe(self._on_change) if self._paths else None
        self._thread: threading.Thread | None = None

    def _on_change(self, change: Change) -> None:
        for i in self._paths.get(change.path, ()):
            msgs = self.router.feedback_messages(i, change.value)
            if msgs:
                with self._cond:
                    self._pending[i] = msgs
                    self._cond.notify()

    def refresh(self) -> None:
        """Queue every fed-back value (after a port opens: LEDs show the state at once)."""
        reg = self.router.registry
        with self._cond:
            for path, idx in self._paths.items():
                value = reg.get(path)
                for i in idx:
                    # a refresh must show the value even if this control set it
                    st = self.router.state[i]
                    sent, st.sent = st.sent, None
                    try:
                        msgs = self.router.feedback_messages(i, value)
                    finally:
                        st.sent = sent
                    if msgs:
                        self._pending[i] = msgs
            self._cond.notify()

    def flush(self) -> int:
        """Send what is queued now (the sender thread's step; tests call it directly)."""
        with self._cond:
            batch, self._pending = self._pending, {}
        n = 0
        for msgs in batch.values():
            for m in msgs:
                try:
                    self.send(m)
                    n += 1
                except Exception:  # noqa: BLE001 - feedback must not stop anything
                    log.exception("MIDI feedback failed")
        return n

    def start(self) -> Feedback:
        self._thread = threading.Thread(target=self._run, name="dreamdeck-midi-out", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            self.flush()

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
