"""Live video inputs for VACE and V2V: shared-memory ring, NDI, Spout, files, cameras.

`LiveInput` (live.py) is what the engine uses; `open_source` parses `vace/source` specs.
"""

from engine.runtime.inputs.base import InputError, InputFrame, InputSource
from engine.runtime.inputs.fallback import HOLDING, LIVE, TEXT_ONLY, InputFallback
from engine.runtime.inputs.live import BlockVideo, LiveInput, open_source

__all__ = [
    "HOLDING",
    "LIVE",
    "TEXT_ONLY",
    "BlockVideo",
    "InputError",
    "InputFallback",
    "InputFrame",
    "InputSource",
    "LiveInput",
    "open_source",
]
