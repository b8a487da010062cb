"""Feedback for TouchDesigner: a numbers-only target for an OSC In CHOP beside the main
target (an OSC In DAT gets everything), and `/dd/status/state "stopped"` when the engine
shuts down. A real `dreamdeck run` (tiny model, in process) and real UDP listeners."""

from __future__ import annotations

from helpers import wait_for
from osc_helpers import Listener

from engine.cli import main


def test_numeric_target_gets_only_numbers_and_shutdown_says_stopped():
    dat, chop = Listener(), Listener()
    try:
        rc = main(
            [
                "run", "--model", "tiny", "--height", "32", "--width", "32", "--blocks", "4",
                "--no-shm", "--osc-port", "0", "--oscquery-port", "0", "--no-zeroconf",
                "--osc-feedback", f"127.0.0.1:{dat.port}",
                "--osc-feedback-numeric", f"127.0.0.1:{chop.port}",
            ]
        )  # fmt: skip
        assert rc == 0
        # the state is the last thing the main target hears (after the resync's values)
        dat.wait(lambda a, args: a == "/dd/status/state" and args == ("stopped",), timeout=5)
        assert dat.messages[-1] == ("/dd/status/state", ("stopped",))
        # the DAT target has strings (prompt texts), the CHOP target numbers only
        assert any(isinstance(x, str) for _, args in dat.messages for x in args)
        chop.wait(lambda a, args: a == "/dd/seed", timeout=5)
        assert chop.messages and all(
            args and all(isinstance(x, (int, float)) for x in args) for _, args in chop.messages
        ), [m for m in chop.messages if not all(isinstance(x, (int, float)) for x in m[1])]
        numeric_on_dat = {
            a for a, args in dat.messages if all(isinstance(x, (int, float)) for x in args) and args
        }
        # every numeric message went to both (the listeners read on their own threads)
        assert wait_for(lambda: {a for a, _ in chop.messages} >= numeric_on_dat, 5)
    finally:
        dat.close()
        chop.close()
