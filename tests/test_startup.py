"""Start-up: phase timings, the per-preset compile cache folder, `dreamdeck warmup`.

The compile cache's effect (a second process compiling from the cache) is measured on the
GPU with `bench` (docs/PERFORMANCE.md); a CPU Inductor compile takes minutes on a loaded
2-core machine, so here the folder logic, the artifacts file's robustness and the command
are tested, each against what it must do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.runtime import startup

ROOT = Path(__file__).resolve().parents[1]


def test_phases_accumulate_in_order_and_time_from_t0():
    t0 = time.perf_counter() - 5.0  # "launched" five seconds ago
    ph = startup.Phases(t0=t0, log_each=False)
    with ph.phase("weights"):
        pass
    ph.add("compile", 2.0)
    ph.add("weights", 1.0)  # a phase entered twice adds up
    d = ph.as_dict()
    assert list(d) == ["weights", "compile"]
    assert d["compile"] == 2.0
    assert 1.0 <= d["weights"] < 1.5
    assert ph.elapsed() >= 5.0


@pytest.mark.parametrize(
    "name", ["h100-832x480", "../../etc/passwd", "a b\x00c/..\\d", "x" * 1000, ""]
)
def test_cache_key_is_one_safe_folder_name(name):
    key = startup.cache_key(name, "cpu")
    assert "/" not in key and "\\" not in key and "\x00" not in key and ".." != key
    assert len(key) <= 160
    if len(name) < 100:  # not truncated: GPU and PyTorch version are in it
        assert key.endswith(f"-cpu-torch{torch.__version__}")
        assert key != startup.cache_key(name + "-fp8", "cpu")  # presets apart
    assert key == startup.cache_key(name, "cpu")  # stable


def test_cache_folder_stays_inside_the_models_folder(tmp_path):
    p = startup.compile_cache_dir(tmp_path, "../../../../tmp/evil", "cpu")
    assert p.resolve().is_relative_to((tmp_path / "compile-cache").resolve())


@pytest.fixture
def clean_env(monkeypatch):
    """No cache variables during the test, and none left behind: use_compile_cache sets
    them in os.environ, which every later subprocess of the session would inherit."""
    saved = {k: os.environ.get(k) for k in startup.CACHE_ENV}
    for k in startup.CACHE_ENV:
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_use_compile_cache_points_pytorch_at_the_models_folder(tmp_path, clean_env):
    path = startup.use_compile_cache(tmp_path, "h100-832x480", "cpu")
    assert path is not None and path.is_dir()
    assert path.parent == tmp_path / "compile-cache"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TRITON_CACHE_DIR"] == str(path / "triton")
    # what Inductor itself resolves its cache to
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == path


def test_a_users_own_cache_dir_is_kept(tmp_path, clean_env):
    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert startup.use_compile_cache(tmp_path, "p", "cpu") is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "compile-cache").exists()


def test_an_unusable_models_folder_falls_back_without_failing(tmp_path, clean_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert startup.use_compile_cache(blocker, "p", "cpu") is None  # mkdir under a file fails
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.parametrize(
    "content", [b"", b"garbage" * 1000, b"\x80\x04\x95" + os.urandom(4096), b"\x00" * 100_000]
)
def test_a_damaged_artifacts_file_is_ignored(tmp_path, content, clean_env):
    (tmp_path / startup.ARTIFACTS).write_bytes(content)
    assert startup.load_cache_artifacts(tmp_path) is False  # reported, never raised


def test_artifacts_round_trip_through_the_folder(tmp_path, clean_env, monkeypatch):
    """save writes what PyTorch hands over, atomically; a folder holding only that file is
    'empty' for the cache and gets it loaded before the first compile."""
    blob = b"pytorch-artifacts" * 10
    seen = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (blob, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: seen.append(b) or 1)
    src = tmp_path / "a"
    src.mkdir()
    out = startup.save_cache_artifacts(src)
    assert out == src / startup.ARTIFACTS and out.read_bytes() == blob
    assert not list(src.glob("*.tmp"))
    # a models folder copied to another machine: only the artifacts file is there
    models = tmp_path / "models"
    dest = startup.compile_cache_dir(models, "p", "cpu")
    dest.mkdir(parents=True)
    (dest / startup.ARTIFACTS).write_bytes(blob)
    assert startup.use_compile_cache(models, "p", "cpu") == dest
    assert seen == [blob]
    # a filled folder is used as it is, not re-loaded
    (dest / "fxgraph").mkdir()
    startup.use_compile_cache(models, "p", "cpu")
    assert seen == [blob]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_warmup_command_reports_every_phase(tmp_path):
    r = _cli("warmup", "--model", "tiny", "--blocks", "2", "--json", "--models-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["preset"] == "tiny" and out["blocks"] == 2
    names = list(out["phases_s"])
    assert names[0].startswith("launch")
    assert any(n.startswith("weights: transformer") for n in names)
    assert names[-1] == "compile + warm-up (2 blocks)"
    assert all(v >= 0 for v in out["phases_s"].values())
    # the text encoder loads on a thread beside the transformer: its phase overlaps the
    # others; the phases one after another add up to no more than the whole
    from engine.runtime.pipeline import TEXT_ENCODER_LOAD

    beside = [n for n in names if n.startswith("weights: text encoder (beside")]
    assert len(beside) == (0 if TEXT_ENCODER_LOAD == "serial" else 1)
    serial = sum(v for n, v in out["phases_s"].items() if n not in beside)
    assert out["total_s"] >= serial - 0.05
    assert out["compile_cache"] is None  # the tiny preset runs eager on the CPU: no cache


def test_warmup_refuses_bad_flags_with_one_line(tmp_path):
    r = _cli("warmup", "--model", "tiny", "--blocks", "0", "--models-dir", str(tmp_path))
    assert r.returncode == 2
    assert "--blocks 0" in r.stderr and "Traceback" not in r.stderr
    r = _cli("warmup", "--preset", "no-such-preset", "--models-dir", str(tmp_path))
    assert r.returncode == 2 and "no-such-preset" in r.stderr and "Traceback" not in r.stderr


# -- warm start: no throwaway warm-up blocks when the cache holds the preset's compiled code


def _filled(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "fxgraph").mkdir(exist_ok=True)  # stands for Inductor's own cache entries
    return path


def test_a_warm_marker_round_trips_for_its_preset_only(tmp_path):
    cache = _filled(tmp_path / "c")
    assert not startup.is_warm(cache, "p", 1)  # no marker: cold
    startup.mark_warm(cache, "p", 2)
    assert startup.is_warm(cache, "p", 1) and startup.is_warm(cache, "p", 2)
    assert not startup.is_warm(cache, "p", 3)  # fewer warm-up blocks than this run wants
    assert not startup.is_warm(cache, "other", 1)
    assert not startup.is_warm(None, "p", 1)  # the user's own cache folder: not ours to judge
    startup.mark_warm(cache, "p", 0)  # an interrupted warm-up marks nothing
    assert startup.is_warm(cache, "p", 2)


def test_changed_model_code_makes_the_cache_cold(tmp_path, monkeypatch):
    cache = _filled(tmp_path / "c")
    startup.mark_warm(cache, "p", 1)
    assert startup.is_warm(cache, "p", 1)
    monkeypatch.setattr(startup, "code_fingerprint", lambda: "0" * 16)
    assert not startup.is_warm(cache, "p", 1)


def test_the_fingerprint_follows_the_model_source(tmp_path, monkeypatch):
    import engine.models

    base = startup.code_fingerprint()
    assert base == startup.code_fingerprint()
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "wan.py").write_text("x = 1\n")
    monkeypatch.setattr(engine.models, "__file__", str(fake / "__init__.py"))
    one = startup.code_fingerprint()
    (fake / "wan.py").write_text("x = 2\n")
    assert one != base and startup.code_fingerprint() != one


@pytest.mark.parametrize(
    "marker",
    [
        b"",
        b"{",
        b"[]",
        b'"warm"',
        b'{"preset": "p", "blocks": true, "code": "x", "torch": "y"}',
        b'{"preset": "p", "blocks": "3"}',
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting: refused by size before parsing
        b"\xff\xfe\x00garbage",
        b" " * 5000,
    ],
)
def test_a_damaged_or_hostile_marker_is_cold_and_never_raises(tmp_path, marker):
    cache = _filled(tmp_path / "c")
    (cache / startup.WARM_MARK).write_bytes(marker)
    assert startup.is_warm(cache, "p", 1) is False


def test_a_marker_that_is_a_folder_or_outlived_its_cache_is_cold(tmp_path):
    cache = _filled(tmp_path / "c")
    (cache / startup.WARM_MARK).mkdir()
    assert not startup.is_warm(cache, "p", 1)
    empty = tmp_path / "e"
    empty.mkdir()
    startup.mark_warm(empty, "p", 1)  # the cache's own files were deleted since
    assert not startup.is_warm(empty, "p", 1)


def test_run_skips_the_warm_up_only_on_a_warm_cache(tmp_path):
    import argparse

    from engine.cli import UsageError
    from engine.cli.run import _warmup_blocks
    from engine.runtime.presets import load_preset

    preset = load_preset("tiny").replace(warmup_blocks=2)
    cache = _filled(tmp_path / "c")
    args = argparse.Namespace(warmup_blocks=None)
    assert _warmup_blocks(args, preset, cache) == 2  # cold: the preset's own warm-up
    assert _warmup_blocks(args, preset, None) == 2
    startup.mark_warm(cache, preset.name, 2)
    assert _warmup_blocks(args, preset, cache) == 0  # warm: the show starts at once
    assert _warmup_blocks(argparse.Namespace(warmup_blocks=3), preset, cache) == 3
    with pytest.raises(UsageError, match="--warmup-blocks -1"):
        _warmup_blocks(argparse.Namespace(warmup_blocks=-1), preset, cache)


def test_the_engine_runs_exactly_its_warm_up_blocks_and_then_reports_warm():
    from engine.runtime.engine import Engine
    from engine.runtime.pipeline import build_pipeline
    from engine.runtime.presets import load_preset

    preset = load_preset("tiny").replace(height=64, width=64, steps=[1000])
    for n in (0, 2):
        pipeline = build_pipeline(preset)
        calls: list[int] = []
        seen: list[int] = []
        real = pipeline.session.next_block

        def counted(inputs, late=None, *, real=real, calls=calls):
            out = real(inputs, late)
            calls.append(out.index)
            return out

        pipeline.session.next_block = counted
        engine = Engine(
            pipeline,
            max_blocks=2,
            status_interval=None,
            warmup_blocks=n,
            on_warm=seen.append,
        )
        engine.start()
        assert engine.join(120)
        engine.stop()
        assert engine.error is None
        # n throwaway blocks (indices 0..n-1, then a reset), then the show's blocks 0, 1
        assert calls == [*range(n), 0, 1]
        # told once: after the warm-up, or without one after the preset's count of show
        # blocks (they compiled the same graphs)
        assert seen == ([n] if n else [max(1, preset.warmup_blocks)])
    with pytest.raises(ValueError, match="warmup_blocks"):
        Engine(build_pipeline(preset), warmup_blocks=-1)


@pytest.mark.parametrize("mode", ["beside", "after", "serial"])
def test_the_text_encoder_loads_where_it_is_told_and_gives_the_same_encoding(mode, monkeypatch):
    from engine.runtime.pipeline import build_pipeline
    from engine.runtime.presets import load_preset

    monkeypatch.setenv("DREAMDECK_TEXT_ENCODER_LOAD", mode)
    phases = startup.Phases(log_each=False)
    pipeline = build_pipeline(load_preset("tiny").replace(height=64, width=64), phases=phases)
    try:
        names = list(phases.times)
        threaded = [n for n in names if n.startswith("weights: text encoder (beside")]
        waited = "weights: text encoder (wait)" in names
        if mode == "serial":
            assert not threaded and not waited and "weights: text encoder" in names
        else:
            assert len(threaded) == 1 and waited
            # on its thread, it started before the main thread finished what it overlaps
            assert ("transformer" in threaded[0]) == (mode == "beside")
        got = pipeline.text_encoder.encode(["a red cube"])
        monkeypatch.setenv("DREAMDECK_TEXT_ENCODER_LOAD", "serial")
        ref = build_pipeline(load_preset("tiny").replace(height=64, width=64))
        assert torch.equal(got, ref.text_encoder.encode(["a red cube"]))
        ref.close()
    finally:
        pipeline.close()


@pytest.mark.parametrize("bad", ["", "parallel", "BESIDE", "beside;rm -rf /", "x" * 10_000])
def test_a_bad_text_encoder_load_setting_is_named(bad, monkeypatch):
    from engine.runtime.pipeline import PipelineError, build_pipeline
    from engine.runtime.presets import load_preset

    monkeypatch.setenv("DREAMDECK_TEXT_ENCODER_LOAD", bad)
    with pytest.raises(PipelineError, match="DREAMDECK_TEXT_ENCODER_LOAD"):
        build_pipeline(load_preset("tiny").replace(height=64, width=64))


def test_a_failing_transformer_load_joins_the_text_encoder_thread(monkeypatch):
    import threading

    from engine.runtime import pipeline as pl
    from engine.runtime.presets import load_preset

    monkeypatch.setenv("DREAMDECK_TEXT_ENCODER_LOAD", "beside")

    def boom(*a, **k):
        raise RuntimeError("out of memory (test)")

    import engine.weights.transformer as wt

    monkeypatch.setattr(wt, "random_transformer", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        pl.build_pipeline(load_preset("tiny").replace(height=64, width=64))
    assert not [t for t in threading.enumerate() if t.name == "load text encoder"]


def test_a_text_encoder_that_fails_only_on_its_thread_is_loaded_in_line(monkeypatch):
    """An import race (or anything else that fails on the side thread only) must not fail
    a start that works in line; a real failure still raises, from the caller's thread."""
    import threading

    from engine.runtime import pipeline as pl
    from engine.runtime.presets import load_preset

    monkeypatch.setenv("DREAMDECK_TEXT_ENCODER_LOAD", "beside")
    real = pl._build_text_encoder
    where: list[str] = []

    def flaky(*a, **k):
        where.append(threading.current_thread().name)
        if threading.current_thread().name == "load text encoder":
            raise ImportError("deadlock detected by _ModuleLock (test)")
        return real(*a, **k)

    monkeypatch.setattr(pl, "_build_text_encoder", flaky)
    pipeline = pl.build_pipeline(load_preset("tiny").replace(height=64, width=64))
    try:
        assert where == ["load text encoder", threading.current_thread().name]
        assert pipeline.text_encoder.encode(["a red cube"]).shape[0] == 1
    finally:
        pipeline.close()

    def broken(*a, **k):
        raise FileNotFoundError("umt5-xxl-enc-bf16.safetensors (test)")

    monkeypatch.setattr(pl, "_build_text_encoder", broken)
    with pytest.raises(FileNotFoundError, match="umt5"):
        pl.build_pipeline(load_preset("tiny").replace(height=64, width=64))
