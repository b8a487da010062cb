"""Tempo: beat grid, MIDI clock, Ableton Link, tap tempo, quantised changes, beat actions."""
