"""The OSC bridge: every registry parameter at ``/dd/<path>``, feedback, OSCQuery.

`OscBridge(registry, OscConfig(...), status=engine.status).start()` listens (default
127.0.0.1:9137), applies performer input through the registry, echoes applied values and
status, answers ``/dd/get`` and reports every rejected message on ``/dd/error``.
`dreamdeck run` starts it through `bridges.osc.run_hook`. See docs/osc.md.
"""

from bridges.osc.server import OscBridge, OscConfig

__all__ = ["OscBridge", "OscConfig"]
