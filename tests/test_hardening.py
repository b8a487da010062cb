"""Hardening found by an outside attack (issue 14): `camera:` specs accept only real
video-capture devices and refuse everything else with one text that does not tell whether
a path exists; step lists are bounded; a recording that cannot start is refused with
/dd/error and the toggle set back; the recorder, `render -o` and `midi check` fail in one
clear line. The OSC cases run against a live tiny engine over real UDP sockets."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from osc_helpers import Listener

from bridges.osc.wire import encode_message
from engine.runtime.controls import make_registry
from engine.runtime.inputs import InputError, open_source
from engine.runtime.inputs.camera_input import resolve_camera
from engine.runtime.recorder import Recorder, RecorderError
from engine.runtime.registry import ControlError
from engine.stream import schedule

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _refusal_template(device: str) -> str:
    """The refusal text with the device's own name taken out: must be one text for all."""
    with pytest.raises(InputError) as e:
        resolve_camera(device)
    msg = str(e.value)
    shown = device[:60] + ("..." if len(device) > 60 else "")
    assert repr(shown) in msg, msg
    return msg.replace(repr(shown), "<DEV>")


# -- part 7: steps ----------------------------------------------------------------------------
def test_step_list_is_bounded_with_the_reason():
    eight = list(range(1000, 200, -100))
    assert len(eight) == 8
    assert schedule.validate_steps(eight) == tuple(eight)
    for n in (9, 820, 100_000):
        steps = [1000 - i * 1000 // (n + 1) for i in range(n)]
        with pytest.raises(schedule.StepsError, match=f"{n} steps is too many: at most 8") as e:
            schedule.validate_steps(steps)
        assert "distilled for 1-4" in str(e.value)
    reg = make_registry()
    before = reg.get("steps")
    with pytest.raises(ControlError, match="at most 8"):
        reg.set("steps", list(range(1000, 180, -1)))  # 820 steps: the reported attack
    assert reg.get("steps") == before


def test_step_bound_applies_to_flags_and_presets(tmp_path, capsys):
    from engine.cli import main
    from engine.runtime.presets import PresetError, load_preset

    rc = main(["run", "--no-osc", "--no-shm", "--model", "tiny", "--steps", ",".join(["9"] * 9)])
    assert rc == 2 and "at most 8" in capsys.readouterr().err
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\nsteps: [" + ", ".join(str(1000 - 10 * i) for i in range(12)) + "]\n")
    with pytest.raises(PresetError, match="at most 8"):
        load_preset(p)


# -- part 2: camera devices -------------------------------------------------------------------
BAD_CAMERAS = [
    "/etc/passwd",
    "../../../dev/zero",
    "../../../../../../../../etc/shadow",
    "/dev/null",  # a character device, but not video4linux
    "/dev/zero",
    "/dev/random",
    "/nonexistent/video0",
    "/dev/video_dreamdeck_none",
    "/dev/video999",  # the right name, not there
    "/dev/./video0/../../etc/passwd",
    "/proc/self/fd/0",
    "/tmp",
    "video0",
    "99",  # an index with no device
    "-1",
    "0; rm -rf /",
    "x" * 10_000,
    "/dev/video0\0/etc/passwd",
    "a\nb",
    "\x7f",
]


@pytest.mark.parametrize("device", BAD_CAMERAS, ids=[repr(d)[:24] for d in BAD_CAMERAS])
def test_non_camera_paths_are_refused_on_linux(device):
    with pytest.raises(InputError, match="is not a video capture device"):
        resolve_camera(device, platform="linux")
    with pytest.raises(InputError, match="is not a video capture device"):
        open_source(f"camera:{device}")  # the spec parser the engine uses
    reg = make_registry()
    # (a NUL or a 10 kB string is refused by the registry's string check even earlier)
    with pytest.raises(ControlError):
        reg.set("vace/source", f"camera:{device}")
    with pytest.raises(ControlError):
        reg.set("vace/mask_source", f"camera:{device}")
    assert reg.get("vace/source") == "none" and reg.get("vace/mask_source") == "none"


def test_camera_flag_and_preset_are_refused_before_start(tmp_path, capsys):
    from engine.cli import main
    from engine.runtime.presets import PresetError, load_preset

    rc = main(
        ["run", "--no-osc", "--no-shm", "--model", "tiny", "--vace-source", "camera:/etc/passwd"]
    )
    assert rc == 2 and "is not a video capture device" in capsys.readouterr().err
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\nvace:\n  source: camera:../../../dev/zero\n")
    with pytest.raises(PresetError, match="is not a video capture device"):
        load_preset(p)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux device paths")
def test_refusal_does_not_reveal_whether_a_path_exists(tmp_path):
    (tmp_path / "exists").write_text("x")
    (tmp_path / "dir").mkdir()
    os.symlink("/etc/passwd", tmp_path / "link")
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    devices = [str(tmp_path / n) for n in ("exists", "dir", "link", "dangling", "fifo", "none")]
    devices += ["/etc/passwd", "/etc/no-such-file", "/dev/null", "/dev/no-such-device"]
    assert len({_refusal_template(d) for d in devices}) == 1


def _fake_v4l2(tmp_path: Path, n: int, major: int = 81, listed: str | None = None):
    """A character device node `videoN` in a dev folder and its sysfs entry. Needs mknod
    (root or CAP_MKNOD); there is no camera on CI, so the accepted path is tested on a
    real device node with the video4linux major, in a folder of the test's own."""
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir(parents=True, exist_ok=True)
    (sysfs / f"video{n}").mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(dev / f"video{n}", stat.S_IFCHR | 0o600, os.makedev(major, n))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    (sysfs / f"video{n}" / "dev").write_text((listed or f"{major}:{n}") + "\n")
    return dev, sysfs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="video4linux")
def test_a_video4linux_node_is_accepted_by_path_index_and_link(tmp_path):
    dev, sysfs = _fake_v4l2(tmp_path, 3)
    kw = {"platform": "linux", "dev_dir": str(dev), "sysfs_dir": str(sysfs)}
    node = str(dev / "video3")
    assert resolve_camera(node, **kw) == node
    assert resolve_camera("3", **kw) == node
    (dev / "v4l" / "by-id").mkdir(parents=True)
    os.symlink("../../video3", dev / "v4l" / "by-id" / "usb-cam-video-index0")
    assert resolve_camera(str(dev / "v4l" / "by-id" / "usb-cam-video-index0"), **kw) == node
    # a node of another class under the same name, or sysfs that disagrees: refused
    dev2, sysfs2 = _fake_v4l2(tmp_path / "b", 4, major=1)
    with pytest.raises(InputError, match="not a video capture device"):
        resolve_camera("4", platform="linux", dev_dir=str(dev2), sysfs_dir=str(sysfs2))
    dev3, sysfs3 = _fake_v4l2(tmp_path / "c", 5, listed="81:6")
    with pytest.raises(InputError, match="not a video capture device"):
        resolve_camera("5", platform="linux", dev_dir=str(dev3), sysfs_dir=str(sysfs3))
    with pytest.raises(InputError, match="not a video capture device"):  # not in dev_dir
        resolve_camera(node, platform="linux", dev_dir=str(dev2), sysfs_dir=str(sysfs))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs")
def test_nothing_is_opened_to_decide(tmp_path):
    """A FIFO named like a camera: opening it (read or write) would block until a peer
    comes; the check answers at once because it only stats."""
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    (sysfs / "video2").mkdir(parents=True)
    (sysfs / "video2" / "dev").write_text("81:2\n")
    os.mkfifo(dev / "video2")
    result: list = []

    def check() -> None:
        try:
            resolve_camera("2", platform="linux", dev_dir=str(dev), sysfs_dir=str(sysfs))
        except InputError as e:
            result.append(e)

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the check opened the FIFO"
    assert result and "not a video capture device" in str(result[0])


@pytest.mark.parametrize(
    "platform, device, url",
    [
        ("darwin", "0", "0"),
        ("darwin", "FaceTime HD Camera", "FaceTime HD Camera"),
        ("win32", "video=Integrated Camera", "video=Integrated Camera"),
        ("win32", "OBS Virtual Camera", "video=OBS Virtual Camera"),
    ],
)
def test_platform_camera_names(platform, device, url):
    assert resolve_camera(device, platform=platform) == url


@pytest.mark.parametrize("platform", ["darwin", "win32"])
@pytest.mark.parametrize(
    "device", ["/dev/video0", "../x", "video=../../x", "audio=Mic", "C:\\x", "a:b", " ", "x" * 200]
)
def test_platform_names_refuse_paths_and_options(platform, device):
    with pytest.raises(InputError, match="not a video capture device"):
        resolve_camera(device, platform=platform)


# -- part 5: recordings that cannot start -----------------------------------------------------
def test_recorder_that_cannot_write_its_log_leaves_nothing(tmp_path):
    out = tmp_path / "take.mp4"
    (tmp_path / "take.controls.jsonl").mkdir()  # the control log's path is taken
    with pytest.raises(RecorderError, match="cannot open for writing"):
        Recorder(out, width=64, height=64)
    assert not out.exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: permission bits for a user, /proc for root
    (root ignores permission bits)."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(w in lines[-1] for w in words), r.stderr
    assert sum("error" in ln for ln in lines) == 1, r.stderr


@pytest.mark.slow
def test_cli_unwritable_outputs_and_binary_map_are_one_line_errors(tmp_path):
    folder = _unwritable_folder(tmp_path)
    base = [sys.executable, "-m", "engine"]
    tiny = ["--model", "tiny", "--height", "64", "--width", "64"]
    show = ROOT / "examples" / "timelines" / "fox-city-blend-576x320.json"
    binary = tmp_path / "map.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    cmds = [
        [*base, "run", *tiny, "--no-osc", "--no-shm", "--record", str(folder / "x.mp4")],
        [*base, "render", *tiny, "-o", str(folder / "x.mp4"), str(show)],
        [*base, "midi", "check", str(binary)],
    ]
    procs = [  # together: three interpreter start-ups overlap
        subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in cmds
    ]
    done = []
    for p, c in zip(procs, cmds, strict=True):
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(c, p.returncode, out.decode(), err.decode()))
    _one_line_error(done[0], "--record", "cannot be written")
    _one_line_error(done[1], "-o", "cannot be written")
    r = done[2]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    want = f"{binary}: not a MIDI map (YAML text): byte 0x80 at offset 128 is not UTF-8"
    assert r.stderr.strip() == want


# -- the same over OSC on a live tiny engine --------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import argparse

    from bridges.osc import run_hook
    from engine.runtime.engine import tiny_engine

    blocker = tmp_path_factory.mktemp("rec") / "file"
    blocker.write_text("a file where the recordings folder should be")
    engine = tiny_engine(record_dir=blocker / "recordings", status_interval=None)
    fb = Listener()
    parser = argparse.ArgumentParser()
    run_hook.add_arguments(parser)
    args = parser.parse_args(
        ["--osc-port", "0", "--osc-feedback-port", str(fb.port), "--no-oscquery"]
        + ["--no-zeroconf"]
    )
    bridge = run_hook.start(args, engine)
    engine.start()
    assert engine.wait_frames(1, timeout=60), "the tiny engine did not start"
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(address: str, *a) -> None:
        client.sendto(encode_message(address, list(a)), ("127.0.0.1", bridge.port))

    yield engine, send, fb
    client.close()
    bridge.close()
    engine.stop()
    fb.close()


def _error_for(fb: Listener, address: str, needle: str) -> str:
    _, args = fb.wait(lambda a, ar: a == "/dd/error" and ar[0] == address and needle in ar[1])
    return args[1]


def test_camera_specs_over_osc_get_one_error_text_and_change_nothing(live):
    engine, send, fb = live
    reasons = set()
    for address in ("/dd/vace/source", "/dd/vace/mask_source"):
        for dev in ("/etc/passwd", "../../../dev/zero", "/dev/null", "/no/such/thing"):
            fb.clear()
            send(address, f"camera:{dev}")
            reason = _error_for(fb, address, "not a video capture device")
            reasons.add(reason.replace(repr(dev), "<DEV>"))
    assert len(reasons) == 1, reasons
    n = engine.frames_out
    assert engine.wait_frames(n + 12, timeout=60)  # still making frames
    assert engine.registry.applied("vace/source") == "none"
    assert engine.registry.applied("vace/mask_source") == "none"


def test_steps_flood_over_osc_is_refused(live):
    engine, send, fb = live
    before = engine.registry.get("steps")
    send("/dd/steps", *range(1000, 970, -1))  # 30 steps (more than 64 arguments: wire limit)
    assert "distilled for 1-4" in _error_for(fb, "/dd/steps", "30 steps is too many")
    assert engine.registry.get("steps") == before


def test_record_into_unwritable_folder_errors_and_echoes_off(live):
    engine, send, fb = live
    fb.clear()
    send("/dd/record", 1)
    assert "cannot record into" in _error_for(fb, "/dd/record", "cannot record")
    fb.wait(lambda a, ar: a == "/dd/record" and ar in ((0,), (False,), (0.0,)))
    assert not [ar for ar in fb.on("/dd/record") if ar and ar[0]], fb.on("/dd/record")
    assert engine.recorder is None and engine.registry.get("record") is False
    assert "record" in engine.status()["last_error"]


# -- the registry: a listener that sets a value back -------------------------------------------
def test_listeners_see_changes_in_the_order_they_happened():
    """A listener that answers a change by setting the value back (the engine refusing a
    recording) must not leave the others with the refused value as the last they saw: it
    used to, because the nested change reached them before the one that caused it."""
    reg = make_registry()
    seen: dict[str, list] = {"a": [], "b": []}

    def refuse(change) -> None:
        seen["a"].append(change.value)
        if change.path == "pause" and change.value is True:
            reg.set("pause", False)  # nested, on the same thread

    reg.subscribe(refuse)
    reg.subscribe(lambda c: seen["b"].append(c.value) if c.path == "pause" else None)
    reg.set("pause", True)
    assert reg.get("pause") is False
    assert seen["a"] == [True, False] and seen["b"] == [True, False]
    # another thread's changes are not held back by this one's delivery
    import threading

    got = []
    reg.subscribe(lambda c: got.append((threading.current_thread().name, c.value)))
    t = threading.Thread(target=reg.set, args=("pause", True), name="other")
    t.start()
    t.join(5)
    assert ("other", True) in got and ("other", False) in got


def test_echo_and_replacing_a_parameter():
    from dataclasses import replace

    reg = make_registry()
    echoed = []
    reg.subscribe(lambda c: echoed.append((c.path, c.value)))
    reg.echo("seed")
    assert echoed == [("seed", reg.get("seed"))]
    p = reg.param("seed")

    def odd_only(v):
        if v % 2 == 0:
            raise ValueError("even seeds refused")
        return v

    reg.set("seed", 8)
    reg.declare(replace(p, validate=odd_only), replace=True)
    with pytest.raises(ControlError, match="even seeds refused"):
        reg.set("seed", 10)
    reg.set("seed", 11)
    reg.begin_block(0)
    assert reg.applied("seed") == 11
    with pytest.raises(ValueError, match="declared twice"):
        reg.declare(p)
    with pytest.raises(ValueError, match="not declared"):
        reg.declare(replace(p, path="nope"), replace=True)
