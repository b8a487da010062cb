"""The MIDI bridge: maps -> routers, input ports -> routers, feedback -> output ports."""

from __future__ import annotations

import logging
from typing import Any

from bridges.midi.feedback import Feedback
from bridges.midi.maps import MidiMap
from bridges.midi.messages import Router
from bridges.midi.ports import PortWatcher
from engine.runtime.registry import Registry

log = logging.getLogger(__name__)


class MidiBridge:
    """One `Router` per map, shared by every port the map's regex picks (two identical
    controllers then act as one). `port` overrides the maps' device regex."""

    def __init__(
        self,
        registry: Registry,
        maps: list[MidiMap],
        *,
        port: str | None = None,
        feedback: bool = True,
        poll: float = 1.0,
        names: Any = None,
        output_names: Any = None,
        opener: Any = None,
    ):
        self.registry = registry
        self.routers: list[Router] = []
        self.inputs: list[PortWatcher] = []
        self.outputs: list[PortWatcher] = []
        self.feedbacks: list[Feedback] = []
        for m in maps:
            router = Router(registry, m.bindings, m.presets)
            self.routers.append(router)
            self.inputs.append(
                PortWatcher(
                    port or m.device,
                    direction="input",
                    on_message=self._handler(router),
                    poll=poll,
                    names=names,
                    opener=opener,
                    clock=registry.clock,
                )
            )
            if feedback and router.feedback_paths():
                out = PortWatcher(
                    port or m.output or m.device,
                    direction="output",
                    poll=poll,
                    names=output_names,
                    opener=opener,
                )
                fb = Feedback(router, out.send)
                out.on_open = lambda name, p, fb=fb: fb.refresh()
                self.outputs.append(out)
                self.feedbacks.append(fb)

    @staticmethod
    def _handler(router: Router):
        bank = getattr(getattr(router.registry, "modulator", None), "bank", None)

        def on_message(name: str, msg: Any, t: float) -> None:
            if bank is not None and getattr(msg, "type", None) == "control_change":
                # every CC is also a modulation source (midi/cc/<n>, midi/cc/<ch>/<n>), 0..1
                v = msg.value / 127.0
                bank.set(f"midi/cc/{msg.control}", v)
                bank.set(f"midi/cc/{msg.channel + 1}/{msg.control}", v)
            router.handle(msg)

        return on_message

    def start(self) -> MidiBridge:
        for fb in self.feedbacks:
            fb.start()
        for w in self.inputs + self.outputs:
            w.start()
        return self

    def close(self) -> None:
        for w in self.inputs + self.outputs:
            w.close()
        for fb in self.feedbacks:
            fb.close()
