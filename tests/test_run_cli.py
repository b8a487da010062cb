"""`dreamdeck run --model tiny` as a real process: frames over shared memory, SIGINT ends
cleanly with a playable recording that matches its control log, SIGKILL still leaves a
playable file. Missing weights are named with the download command."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import av
import pytest

from engine.cli import main
from engine.runtime.control_log import read_control_log

ROOT = Path(__file__).resolve().parents[1]


def start_run(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{name}.mp4"
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "run",
        "--model",
        "tiny",
        "--height",
        "64",
        "--width",
        "64",
    ]
    cmd += ["--steps", "1000,750", "--record", str(out), "--no-osc", "--blocks", "400", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, out


def logged_blocks(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def wait_until(cond, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(
                f"dreamdeck run exited early ({proc.returncode}):\n{proc.communicate()[1]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[1]}")
        time.sleep(0.05)


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Engines started together (their start-ups overlap): one stopped by SIGINT while a
    reader takes frames from its ring, one by SIGTERM, one killed."""
    tmp = tmp_path_factory.mktemp("run")
    shm = f"ddtest{uuid.uuid4().hex[:8]}"
    a = start_run(tmp, "clean", "--shm", shm)
    b = start_run(tmp, "killed", "--no-shm")
    c = start_run(tmp, "terminated", "--no-shm")
    yield a, b, shm, c
    for proc, _ in (a, b, c):
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(180)
def test_sigint_stops_cleanly_with_frames_out_and_a_matching_recording(runs):
    from engine.runtime.shm_ring import ShmRingReader

    (proc, out), _, shm, _ = runs
    log_path = out.with_name("clean.controls.jsonl")
    reader = ShmRingReader(shm)
    frames = []
    deadline = time.monotonic() + 120
    while len(frames) < 15 and time.monotonic() < deadline:
        got = reader.read()
        if got is None:
            if proc.poll() is not None:
                break
            time.sleep(0.005)
            continue
        frames.append(got[0])
        assert got[1].shape == (64, 64, 4) and (got[1][..., 3] == 255).all()
        assert got[1][..., :3].std() > 0  # noise, but real pixels
    reader.close()
    assert len(frames) >= 15, proc.stderr.read() if proc.poll() is not None else "no frames"
    seqs = [f.sequence for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert frames[-1].block >= frames[0].block
    wait_until(lambda: logged_blocks(log_path) >= 3, 60, proc)

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "frames are noise" in err  # the tiny model says so at start
    log = read_control_log(log_path)
    assert [b["block"] for b in log.blocks] == list(range(len(log.blocks)))
    assert log.header["model"] == "tiny" and log.header["width"] == 64
    assert decoded_frames(out) == log.frames == 9 + 12 * (len(log.blocks) - 1)


@pytest.mark.timeout(180)
def test_sigkill_leaves_a_playable_recording(runs):
    _, (proc, out), _, _ = runs
    log_path = out.with_name("killed.controls.jsonl")
    wait_until(lambda: logged_blocks(log_path) >= 4, 120, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    logged = read_control_log(log_path).frames  # a torn last line is tolerated
    n = decoded_frames(out)
    # Everything up to the last logged block plays (the muxer holds back only the newest
    # frame); frames of a block whose log line was not written yet may follow.
    assert logged - 1 <= n <= logged + 12, (n, logged)
    assert n >= 9 + 12 * 2


@pytest.mark.timeout(180)
def test_sigterm_also_finalises_the_recording(runs):
    *_, (proc, out) = runs
    log_path = out.with_name("terminated.controls.jsonl")
    wait_until(lambda: logged_blocks(log_path) >= 2, 120, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    log = read_control_log(log_path)
    assert decoded_frames(out) == log.frames == 9 + 12 * (len(log.blocks) - 1)


def test_missing_weights_are_named_with_the_download_command(tmp_path, capsys):
    rc = main(
        ["run", "--preset", "h100-576x320", "--models-dir", str(tmp_path), "--no-osc", "--no-shm"]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "krea-realtime-video-14b.safetensors (missing)" in err
    assert (
        "Wan2.1_VAE.pth" in err
        and "taew2_1.pth" in err
        and "models_t5_umt5-xxl-enc-bf16.pth" in err
    )
    assert f"dreamdeck download --model 14b --decoder tae --models-dir {tmp_path}" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--model", "tiny", "--width", "100"], ["width: 100"]),
        (["--model", "tiny", "--steps", "750,1000"], ["--steps", "decreasing"]),
        (["--model", "tiny", "--blocks", "0"], ["--blocks"]),
        (["--model", "tiny", "--record", "/nonexistent/x.mp4"], ["--record"]),
    ],
)
def test_bad_flags_are_one_clear_line(args, words, capsys):
    rc = main(["run", "--no-osc", "--no-shm", *args])
    err = capsys.readouterr().err
    assert rc == 2
    for w in words:
        assert w in err, err


def test_preset_ports_become_bridge_flag_defaults(tmp_path):
    """A preset's ports reach the OSC bridge unless a flag overrides them."""
    from engine.cli import build_parser
    from engine.cli.run import _apply_port_defaults
    from engine.runtime.presets import load_preset

    preset_file = tmp_path / "p.yaml"
    preset_file.write_text("model: tiny\nports:\n  osc: 9500\n  oscquery: 9501\n")
    ports = load_preset(preset_file).ports
    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    args = parser.parse_args(["run", "--preset", str(preset_file), "--oscquery-port", "9700"])
    if not hasattr(args, "osc_port"):
        pytest.skip("the OSC bridge is not installed")
    _apply_port_defaults(args, run_parser, ports)
    assert args.osc_port == 9500 and args.oscquery_port == 9700


def test_plain_run_without_weights_starts_the_tiny_model(tmp_path):
    """The README's first command: `dreamdeck run` on a machine with nothing downloaded
    runs the tiny model, after naming what is missing and how to fetch it."""
    cmd = [sys.executable, "-m", "engine", "run", "--models-dir", str(tmp_path)]
    cmd += ["--no-osc", "--no-shm", "--blocks", "2", "--height", "64", "--width", "64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "default preset h100-832x480 cannot run" in r.stderr
    assert "krea-realtime-video-14b.safetensors (missing)" in r.stderr
    assert "dreamdeck download" in r.stderr
    assert "starting the tiny model instead" in r.stderr


def test_plain_run_falls_back_but_an_explicit_preset_does_not(tmp_path, capsys):
    rc = main(
        ["run", "--preset", "h100-832x480", "--models-dir", str(tmp_path), "--no-osc", "--no-shm"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "starting the tiny model" not in err
