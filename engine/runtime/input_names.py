"""The names the input-video controls accept (fit modes, mask modes, source kinds).

Kept apart from the input modules, which need torch, so the control registry (and with it
`dreamdeck osc --list`, OSCQuery's description, MIDI map checks) can be built without
importing torch: those tools start in a fraction of a second instead of several.
"""

from __future__ import annotations

FIT_MODES = ("fit", "fill", "stretch")
MASK_MODES = ("ones", "alpha", "inverse_alpha", "source")
SOURCE_KINDS = ("shm", "file", "ndi", "spout", "camera")
