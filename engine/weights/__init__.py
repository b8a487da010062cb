"""Weights: finding, downloading, checking and loading checkpoint files."""
