"""MIDI controllers: YAML maps, 14-bit/NRPN/relative decoding, takeover, feedback, learn."""
