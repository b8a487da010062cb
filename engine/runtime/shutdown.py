"""A shutdown that always ends: SIGTERM/SIGINT stop the engine within a few seconds in every
state, even with the generation thread stuck in a block or a control thread stuck holding
the registry.

Why a watchdog and not just a join with a timeout: the orderly shutdown runs on the main
thread and may itself be what is stuck (closing a bridge whose thread never returns,
taking the registry lock a stuck listener holds). So the signal arms a thread of its own
that gives the orderly shutdown `grace` seconds; if it has not finished by then, it closes
what would outlive the process (the recording first, so the mp4 and its control log are
complete; then the outputs, which removes the shared-memory ring), each on a thread with a
deadline so one stuck part cannot hold up the rest, and ends the process with
`os._exit(ABANDONED)`, a non-zero code that says something had to be abandoned. Sockets
(the bridges' ports) are released by the exit itself. A second signal abandons at once.

`faulthandler`'s watchdog, a C thread that needs no interpreter lock, is armed as a
backstop a little after that: if even the watchdog thread cannot run, it dumps every
thread's stack to stderr (where the hang is) and exits. What no Python code can interrupt
is an extension call that holds the interpreter lock and never returns *before* the signal
handler runs (Python runs signal handlers between bytecodes): that needs SIGKILL, which
still leaves a playable recording (the mp4 is written fragmented).

Test hooks (`DREAMDECK_TEST_HANG`): `block` makes the generation thread hang for good after
its third block; `control` makes a control thread take the registry's lock and never give
it back. They exist so the tests can prove the above on a real process; nothing else reads
the variable.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GRACE_S = 3.0  # the orderly shutdown's time
PART_S = 0.5  # each part's time when abandoning, unless the part names its own
RECORDING_S = 1.0  # the recording's: encoding the blocks still queued (grace + parts < 5 s)
BACKSTOP_S = 0.5  # past the parts' time: faulthandler ends the process
ABANDONED = 3  # exit code: the shutdown had to abandon something
TEST_HANG_ENV = "DREAMDECK_TEST_HANG"


class ShutdownWatchdog:
    """``arm()`` from the signal handler, ``done()`` when the orderly shutdown finished.

    `parts` returns, when called at expiry, the ``(name, close)`` or ``(name, close,
    seconds)`` parts to close, in order (it is called late so it sees the recorder in use
    at that moment); a part without seconds gets `part_s`."""

    def __init__(
        self,
        parts: Callable[[], list[tuple[str, Callable[[], Any]]]],
        *,
        grace: float = GRACE_S,
        part_s: float = PART_S,
        exit: Callable[[int], Any] = os._exit,
    ):
        self.parts = parts
        self.grace, self.part_s = grace, part_s
        self._exit = exit
        self._armed_at: float | None = None
        self._done = threading.Event()
        self._now = threading.Event()  # a second signal: abandon at once
        self._lock = threading.Lock()
        self.abandoned: list[str] = []

    @property
    def armed(self) -> bool:
        return self._armed_at is not None

    def arm(self) -> None:
        """Start counting (idempotent; a second call abandons at once). Safe in a signal
        handler: it only starts a thread."""
        with self._lock:
            if self._armed_at is not None:
                self._now.set()
                return
            self._armed_at = time.monotonic()
        threading.Thread(target=self._watch, name="dreamdeck-shutdown", daemon=True).start()

    def done(self) -> float | None:
        """The orderly shutdown finished: stand down. Returns the seconds it took since the
        signal (None when no signal came)."""
        self._done.set()
        faulthandler.cancel_dump_traceback_later()
        return None if self._armed_at is None else time.monotonic() - self._armed_at

    def exit_now(self, code: int) -> None:
        """After a signal and an orderly stop: end the process at once with `code`.

        Why not return and let the interpreter finish: tearing down torch and the loaded
        model took 5-7 s on a loaded two-core machine, all of it in C with every thread
        already gone, which breaks the 5 s promise for no gain (the recording, the ring
        and the ports are closed by now; logs and stdio are flushed here)."""
        _flush()
        self._exit(code)

    def _watch(self) -> None:
        deadline = self._armed_at + self.grace
        while not self._done.is_set() and not self._now.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._done.wait(min(left, 0.05))
        if self._done.is_set():
            return
        self.abandon()

    def abandon(self) -> None:
        """Close what can be closed, each part within its time, then exit non-zero."""
        parts = [(p[0], p[1], p[2] if len(p) > 2 else self.part_s) for p in self.parts()]
        # the backstop, should this thread itself not get to the end
        faulthandler.dump_traceback_later(
            sum(p[2] for p in parts) + BACKSTOP_S, exit=True, file=sys.stderr
        )
        log.error(
            "shutdown: not finished %.1f s after the signal; abandoning (threads: %s)",
            time.monotonic() - self._armed_at,
            ", ".join(t.name for t in threading.enumerate()),
        )
        for name, close, seconds in parts:
            t = threading.Thread(target=_quietly, args=(name, close), daemon=True)
            t.start()
            t.join(seconds)
            if t.is_alive():
                self.abandoned.append(name)
                log.error("shutdown: closing the %s did not finish; left open", name)
        took = time.monotonic() - self._armed_at
        log.error(
            "shutdown: abandoned after %.2f s (still open: %s); exit %d",
            took,
            ", ".join(self.abandoned) or "nothing",
            ABANDONED,
        )
        _flush()
        self._exit(ABANDONED)
        faulthandler.cancel_dump_traceback_later()  # reached only with a test's exit


def _flush() -> None:
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass


def _quietly(name: str, close: Callable[[], Any]) -> None:
    try:
        close()
    except Exception as e:  # noqa: BLE001 - the rest must still close
        log.error("shutdown: closing the %s failed: %s", name, e)


def install_test_hang(engine: Any, what: str | None = None) -> None:
    """The `DREAMDECK_TEST_HANG` hooks (module docstring); no-op when unset."""
    what = os.environ.get(TEST_HANG_ENV, "") if what is None else what
    if not what:
        return
    forever = threading.Event()  # never set
    if what == "block":
        seen = [0]

        def hang_after_three(_result: Any) -> None:
            seen[0] += 1
            if seen[0] >= 3:
                log.warning("%s=block: the generation thread hangs now", TEST_HANG_ENV)
                forever.wait()

        engine.on_block = hang_after_three
    elif what == "control":

        def hold_registry() -> None:
            engine.wait_frames(9 * 3, timeout=600)
            # the lock a stuck listener (on an OSC or MIDI thread) would hold
            with engine.registry._lock:
                log.warning("%s=control: a control thread holds the registry now", TEST_HANG_ENV)
                forever.wait()

        threading.Thread(target=hold_registry, name="dreamdeck-test-control", daemon=True).start()
    else:
        raise ValueError(f"{TEST_HANG_ENV}={what!r}: use block or control")
