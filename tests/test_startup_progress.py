"""Start-up progress: the transformer's blocks as they load (or are made), the warm-up
blocks (where compilation happens), and one closing line with the time to ready, memory and
attention backend. The bars are recorded through `Phases(progress=...)` (the terminal bar
is tqdm, off when stderr is not a terminal, as under pytest); the model, pipeline and
engine are the real tiny ones on the CPU."""

from __future__ import annotations

import logging

from engine.runtime.engine import Engine
from engine.runtime.pipeline import build_pipeline
from engine.runtime.presets import load_preset
from engine.runtime.startup import Phases, ready_line


class Bars:
    """Records every bar: its description, total and how often it moved."""

    def __init__(self) -> None:
        self.made: list[dict] = []

    def __call__(self, desc: str, total: int, unit: str):
        rec = {"desc": desc, "total": total, "unit": unit, "updates": 0, "closed": False}
        self.made.append(rec)

        class Bar:
            def update(self, n: int = 1) -> None:
                rec["updates"] += n

            def close(self) -> None:
                rec["closed"] = True

        return Bar()


def test_loading_and_warm_up_show_progress_and_end_with_a_ready_line(caplog):
    bars = Bars()
    phases = Phases(log_each=False, progress=bars)
    preset = load_preset("tiny").replace(height=32, width=32, steps=[1000], warmup_blocks=2)
    pipeline = build_pipeline(preset, phases=phases)
    layers = pipeline.model.cfg.layers
    engine = Engine(pipeline, max_blocks=2, status_interval=None, phases=phases)
    with caplog.at_level(logging.INFO, logger="engine.runtime.engine"):
        engine.start()
        assert engine.join(120)
    engine.stop()
    assert engine.error is None
    by_desc = {b["desc"]: b for b in bars.made}
    model_bar = by_desc["making the transformer"]  # tiny: random weights
    assert model_bar["total"] == layers and model_bar["updates"] == layers
    warm = by_desc["warm-up (compile, autotune)"]
    assert (warm["total"], warm["updates"]) == (2, 2)
    assert all(b["closed"] for b in bars.made)
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready in ")]
    assert len(ready) == 1, ready  # one line, at the first frames
    assert "host memory peak" in ready[0] and "attention sdpa" in ready[0]


def test_ready_line_names_time_memory_and_backend():
    line = ready_line(12.34, "cpu", "cudnn")
    assert line.startswith("ready in 12.3 s: host memory peak ") and line.endswith(
        "attention cudnn"
    )
    peak = float(line.split("host memory peak ")[1].split(" GB")[0])
    assert 0.01 < peak < 1024  # this test process: tens of MB to a few GB, in GB
