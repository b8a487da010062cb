"""The runtime: control registry, presets, generation thread, pacing, outputs, inputs."""
