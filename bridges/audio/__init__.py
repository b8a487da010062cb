"""Audio: sources (a PortAudio device, a file, raw PCM on stdin), analysis (RMS, log
bands, spectral-flux onsets, a beat tracker) feeding the modulation layer's source bank
(engine/runtime/modulation.py). A bridge: it only ever writes numbers the registry reads."""
