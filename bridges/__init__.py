"""Bridges turn the outside world (OSC, MIDI, tempo, timelines) into control changes.

A bridge only ever talks to the control registry (`engine.runtime.registry`); it never
touches tensors.
"""
