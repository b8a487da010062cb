"""Sequence parallelism (engine/parallel) on the CPU with gloo: real processes, real
process groups, no mocks.

Fast: the all-to-all layouts against a simulated exchange, the refusals of bad rank counts
(in the functions and on the command line), the communication volume formula's
properties. Slow (spawned worlds, shared by the tests through module fixtures started
together): N = 2 and 4 ranks give the latents of one process over a block sequence with
recompute, KV bias, a prompt change, bias 1 and a reset; the same seed replays bit for
bit; every rank runs each block with the control snapshot rank 0 sent for it; the bytes
counted on the wire equal `comm_volume`; killing a rank ends `dreamdeck run --gpus 2`
within 30 s naming the rank, with the recording finalised, the ring unlinked and no
process left; `dreamdeck bench --gpus 2 --json` reports the world and the error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import av
import pytest
import torch

from engine.cli import main
from engine.models.wan import CONFIGS
from engine.parallel import ulysses
from engine.parallel.launch import RankSpec, check_ranks
from engine.parallel.ulysses import (
    ParallelConfigError,
    check_world,
    comm_volume,
    heads_from_tokens,
    tokens_from_heads,
)
from tests.helpers import rel_err
from tests.parallel_scenario import CFG4, HEIGHT, PLAN, WIDTH, build_session, scenario

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fast


def _simulate(fn, per_rank: list[torch.Tensor], world: int, monkeypatch) -> list[torch.Tensor]:
    """Run `fn(x_r, world, None)` for every rank r with `_a2a` replaced by an exact
    in-process all-to-all over the W calls (two passes: collect, then exchange)."""
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(ulysses, "_a2a", lambda x, g: sent.append(x.clone()) or x)
    for x in per_rank:
        fn(x, world, None)

    def exchange(x, g, r=[0]):  # noqa: B006 - the calling rank, counted across calls
        out = torch.stack([sent[s][r[0]] for s in range(world)])
        r[0] += 1
        return out

    monkeypatch.setattr(ulysses, "_a2a", exchange)
    return [fn(x, world, None) for x in per_rank]


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_layouts_give_each_rank_all_tokens_of_its_heads(world, monkeypatch):
    s, b, n, h, d = 3, 1, 8 * world, 8, 5
    full = torch.randn(s, b, n, h, d)
    m = n // world
    per_rank = [full[:, :, r * m : (r + 1) * m] for r in range(world)]
    got = _simulate(heads_from_tokens, per_rank, world, monkeypatch)
    hw = h // world
    for r in range(world):
        assert torch.equal(got[r], full[:, :, :, r * hw : (r + 1) * hw])
    # and back: the output of attention (all tokens, my heads) -> my tokens, all heads
    back = _simulate(tokens_from_heads, [g[0] for g in got], world, monkeypatch)
    for r in range(world):
        assert torch.equal(back[r], full[0, :, r * m : (r + 1) * m])


@pytest.mark.parametrize(
    ("world", "tokens", "words"),
    [
        (3, None, "do not divide the model's 4 attention heads"),
        (0, None, "positive integer"),
        (4, 5, "do not divide the 15 tokens"),
    ],
)
def test_bad_world_sizes_are_refused_with_the_reason(world, tokens, words):
    with pytest.raises(ParallelConfigError, match=words):
        check_world(CFG4, world, tokens)


def test_more_ranks_than_gpus_is_refused():
    spec = RankSpec(cfg=CONFIGS["14b"], height=480, width=832, device="cuda")
    with pytest.raises(ParallelConfigError, match="only 2 CUDA GPUs here"):
        check_ranks(4, spec, gpus=2)
    check_ranks(2, spec, gpus=2)  # fits
    with pytest.raises(ParallelConfigError, match="use one of .*5, 8"):
        check_ranks(3, spec, gpus=8)  # 40 heads


@pytest.mark.parametrize(
    ("cmd", "words"),
    [
        (["run", "--model", "tiny", "--gpus", "3"], "do not divide the model's 2 attention heads"),
        (["run", "--model", "tiny", "--gpus", "0"], "positive integer"),
        (["run", "--model", "tiny", "--gpus", "2", "--rank-timeout", "0"], "must be positive"),
        (["bench", "--model", "tiny", "--device", "cpu", "--gpus", "4"], "2 attention heads"),
    ],
)
def test_bad_gpus_flag_is_refused_at_start_before_any_rank_starts(cmd, words, capsys):
    before = set(_children(os.getpid()))
    rc = main([*cmd, "--no-osc", "--no-shm"] if cmd[0] == "run" else cmd)
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    assert set(_children(os.getpid())) == before  # nothing was spawned


def test_comm_volume_properties():
    cfg = CONFIGS["14b"]
    one = comm_volume(cfg, 480, 832, 4, 1)
    assert one.bytes_per_block == 0 and one.all_to_alls == 0
    two = comm_volume(cfg, 480, 832, 4, 2)
    four = comm_volume(cfg, 480, 832, 4, 4)
    heads = comm_volume(cfg, 480, 832, 4, 2, cross="heads")
    # 832x480: 3 frames of 52x30 tokens; 5 forwards (recompute + 4 steps); 2 a2a per layer
    assert two.tokens == 4680 and two.forwards == 5 and two.all_to_alls == 2 * 40 * 5
    # per rank, each all-to-all sends (W-1)/W of 1/W of the tokens: 2 -> 4 ranks sends
    # 3/4 of the two-rank volume (up to the small all-gather of the head)
    assert 0.74 < four.bytes_per_block / two.bytes_per_block < 0.76
    assert heads.all_to_alls == 2 * two.all_to_alls
    assert 1.49 < heads.bytes_per_block / two.bytes_per_block < 1.5
    # bf16 vs fp32 halves it
    assert comm_volume(cfg, 480, 832, 4, 2, elem_bytes=4).bytes_per_block == 2 * (
        two.bytes_per_block
    )


@pytest.mark.parametrize("name", ["h200x2-832x480", "h200x4-832x480", "h200x4-832x480-fp8"])
def test_multi_gpu_presets_split_the_14b_and_are_checked_against_the_gpus_here(name):
    from engine.parallel.launch import spec_for_preset
    from engine.runtime.pipeline import PipelineError
    from engine.runtime.presets import load_preset

    p = load_preset(name)
    assert p.model == "14b" and p.gpus in (2, 4) and p.fp8 == name.endswith("fp8")
    spec = RankSpec(cfg=CONFIGS["14b"], height=p.height, width=p.width, device="cuda")
    check_ranks(p.gpus, spec, gpus=8)  # heads and tokens divide on an 8-GPU machine
    with pytest.raises(ParallelConfigError, match=f"--gpus {p.gpus}: only 1 CUDA GPU here"):
        check_ranks(p.gpus, spec, gpus=1)
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):  # no GPU on this machine
        spec_for_preset(p, random_weights=True)


def test_a_preset_with_zero_gpus_is_refused():
    from engine.runtime.presets import PresetError, parse_preset

    with pytest.raises(PresetError, match="gpus: 0 is outside 1..64"):
        parse_preset("model: tiny\ngpus: 0\n", "bad.yaml").check("bad.yaml")


def test_doctor_reports_gpus_peer_access_and_backends(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DREAMDECK_MODELS"}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "doctor", "--json", "--preset", "h200x2-832x480"]
        + ["--models-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(r.stdout)
    par = report["parallel"]
    assert par["gpu_count"] == torch.cuda.device_count()
    assert par["gloo"] is True and par["nccl"] == torch.distributed.is_nccl_available()
    if par["gpu_count"] < 2:
        assert any("needs 2 GPUs" in p for p in report["problems"]), report["problems"]
        assert r.returncode == 1


@pytest.mark.parametrize(
    ("count", "peers", "nccl", "problem", "warning"),
    [
        (2, True, True, "needs 4 GPUs (gpus: 4); 2 visible", None),
        (4, False, True, None, "no peer access"),
        (4, True, False, "needs NCCL", None),
        (8, True, True, None, None),
    ],
)
def test_doctor_checks_a_multi_gpu_preset_against_the_topology(
    monkeypatch, tmp_path, count, peers, nccl, problem, warning
):
    """A machine with several GPUs cannot exist here: `topology` (what torch reports) is
    replaced by a described one; the rest of doctor is real."""
    from engine.parallel import launch
    from tests.test_doctor import _diagnose_with_gpu

    fake = {"gpu_count": count, "all_peers": peers, "nccl": nccl, "nccl_version": "2.27.3"}
    fake |= {"gloo": True, "peer_access": [], "max_gpus": count}
    monkeypatch.setattr(launch, "topology", lambda: fake)
    r = _diagnose_with_gpu(monkeypatch, tmp_path, "h200x4-832x480", "NVIDIA H200", "9.0", 141.0)
    assert r["parallel"] == fake
    multi = [p for p in r["problems"] if "GPUs" in p or "NCCL" in p]
    assert multi == ([] if problem is None else [m for m in multi if problem in m]) and (
        (problem is None) == (not multi)
    ), r["problems"]
    peer_warnings = [w for w in r["warnings"] if "peer access" in w]
    assert bool(peer_warnings) == (warning is not None), r["warnings"]


# --------------------------------------------------------------------------- slow

SCENARIO = ROOT / "tests" / "parallel_scenario.py"


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[1].split()[0] != "Z"


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The scenario over 2 and over 4 ranks and `dreamdeck bench --gpus 2`, started
    together so that the start-ups overlap."""
    tmp = tmp_path_factory.mktemp("parallel")
    procs = {}
    for n, variant in ((2, "base"), (4, "base"), (2, "fp8")):
        out = tmp / f"w{n}{variant}"
        out.mkdir()
        cmd = [sys.executable, str(SCENARIO), "--world", str(n), "--out", str(out)]
        cmd += ["--variant", variant]
        procs[(n, variant)] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True), out)  # fmt: skip
    bench = [sys.executable, "-m", "engine", "bench", "--model", "tiny", "--device", "cpu"]
    bench += ["--gpus", "2", "--json", "--blocks", "1", "--warmup", "2", "--rank-timeout", "60"]
    procs["bench"] = (subprocess.Popen(bench, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), None)  # fmt: skip
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def shows(tmp_path_factory):
    """Two `dreamdeck run --gpus 2` shows, started together: one to kill a rank of, one to
    hang a rank of."""
    tmp = tmp_path_factory.mktemp("shows")
    procs = {}
    shm = f"ddpar{uuid.uuid4().hex[:8]}"
    rec = tmp / "show.mp4"
    run = [sys.executable, "-m", "engine", "run", "--model", "tiny", "--height", "64"]
    run += ["--width", "64", "--steps", "1000,750", "--no-osc", "--shm", shm, "--gpus", "2"]
    run += ["--record", str(rec), "--blocks", "1000", "--rank-timeout", "60"]
    procs["run"] = (_start_show(run, tmp / "run.log"), (rec, shm))
    shm2 = f"ddpar{uuid.uuid4().hex[:8]}"
    rec2 = tmp / "hang.mp4"
    hang = [a for a in run if a not in (shm, str(rec))]
    hang[hang.index("--shm") + 1 : hang.index("--shm") + 1] = [shm2]
    hang[hang.index("--record") + 1 : hang.index("--record") + 1] = [str(rec2)]
    hang[hang.index("--rank-timeout") + 1] = str(RANK_TIMEOUT)
    procs["hang"] = (_start_show(hang, tmp / "hang.log"), (rec2, shm2))
    orphan = [a for a in hang if a != shm2 and a != str(rec2)]
    orphan.remove("--record")
    orphan[orphan.index("--shm")] = "--no-shm"
    port = _free_udp_port()
    orphan[orphan.index("--no-osc")] = "--osc-port"
    orphan[orphan.index("--osc-port") + 1 : orphan.index("--osc-port") + 1] = [str(port)]
    orphan += ["--no-oscquery", "--no-zeroconf", "--no-osc-feedback"]
    procs["orphan"] = (_start_show(orphan, tmp / "orphan.log"), (tmp / "orphan.log", port))
    yield procs
    for proc, _ in procs.values():
        for pid in _children(proc.pid):  # a stopped rank does not watch its parent
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# The hung-rank and paused shows' --rank-timeout: what the hang test waits for and what the
# pause must outlast. A collective of a 64x64 tiny block waits milliseconds for its peer, and
# the first collective's lazy set-up is done before the first block (World.attach's probe),
# so 10 s is far from a healthy show's waits even on a loaded 2-core machine.
RANK_TIMEOUT = 10


def _start_show(cmd: list[str], log: Path) -> subprocess.Popen:
    """The run's log goes to a file: a pipe nobody reads until the end could fill up and
    stall the show."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), text=True)  # fmt: skip
    proc.log = log
    return proc


def _finish(procs, key, timeout=400):
    proc, out = procs[key]
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, out


_REFERENCES: dict[str, list[torch.Tensor]] = {}


def reference(variant: str) -> list[torch.Tensor]:
    """The scenario on the plain model in this process: what the split stream must give."""
    from engine.parallel.launch import build_model
    from tests.parallel_scenario import spec

    if variant not in _REFERENCES:
        torch.set_num_threads(1)
        s = spec(variant=variant)
        model = build_model(s, torch.device("cpu"))
        _REFERENCES[variant] = scenario(build_session(model, s.kv_cache))
    return _REFERENCES[variant]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("n", "variant"), [(2, "base"), (4, "base"), (2, "fp8")])
def test_n_ranks_give_the_latents_of_one_process(worlds, n, variant):
    """base: fused q/k/v, float32; fp8: fp8 weights and KV cache, unfused q/k/v and the
    cross-attention K/V split by heads (parallel_scenario.VARIANTS)."""
    reference_ = reference(variant)
    stdout, out = _finish(worlds, (n, variant))
    leader = torch.load(out / "leader.pt")
    info = json.loads((out / "leader.json").read_text())
    assert info["kv_heads"] == CFG4.heads // n  # each rank caches its share of the heads
    assert len(leader["first"]) == len(reference_) == sum(1 for s in PLAN if s != "reset")
    for i, (a, b) in enumerate(zip(leader["first"], reference_, strict=True)):
        assert rel_err(a, b) < 1e-5, (n, i, rel_err(a, b))
    # the same seed replays bit for bit (after a reset, in the same world)
    for a, b in zip(leader["first"], leader["replay"], strict=True):
        assert torch.equal(a, b)
    # every follower ends each block with rank 0's latents, bit for bit (all-gathered)
    runs = 2 * len(reference_)
    for r in range(1, n):
        got = [torch.load(out / f"r{r}n{k}.pt") for k in range(runs)]
        for a, b in zip(got, leader["first"] + leader["replay"], strict=True):
            assert torch.equal(a, b)
    assert json.loads(stdout.splitlines()[-1])["ranks"] == [
        f"rank {r} exited with code 0" for r in range(1, n)
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_controls_set_on_rank_0_reach_every_rank_at_the_same_block(worlds):
    _, out = _finish(worlds, (4, "base"))
    sent = json.loads((out / "leader.json").read_text())["snapshots"]
    for r in (1, 2, 3):
        rows = [json.loads(x) for x in (out / f"rank{r}.jsonl").read_text().splitlines()]
        ran = [(x["index"], x["snapshot"]) for x in rows[: len(sent)]]
        assert ran == [(s["index"], {k: s[k] for k in ("step", "prompt", "kv_bias")}) for s in sent]
        # and what the block ran with is what the snapshot said (bias change at block 2,
        # prompt change at block 3)
        assert [x["inputs"]["kv_bias"] for x in rows[: len(sent)]] == [s["kv_bias"] for s in sent]
        assert [x["inputs"]["text_key"] for x in rows[: len(sent)]] == [s["prompt"] for s in sent]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [2, 4])
def test_bytes_on_the_wire_equal_comm_volume(worlds, n):
    _, out = _finish(worlds, (n, "base"))
    traffic = json.loads((out / "leader.json").read_text())["traffic"]
    v = comm_volume(CFG4, HEIGHT, WIDTH, 3, n, elem_bytes=4)  # float32 on the CPU
    assert traffic == {"bytes": v.bytes_per_block, "all_to_alls": v.all_to_alls}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_reports_the_world_and_the_error_against_one_process(worlds):
    stdout, _ = _finish(worlds, "bench")
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["world"] == 2 and r["backend"] == "gloo" and r["compared_blocks"] == 3
    assert 0 <= r["rel_err_vs_one_process"] < 1e-5
    assert r["kv_heads_per_rank"] == CONFIGS["tiny"].heads // 2
    assert r["comm"]["bytes_per_block_per_rank"] > 0 and r["block_ms"] > 0
    assert r["ranks"] == ["rank 1 exited with code 0"]


def _fault(worlds, key: str, sig: int, limit: float, words: str) -> None:
    """Wait for 4 recorded blocks, send `sig` to rank 1, and check the run ends within
    `limit` seconds naming the rank, with the recording finalised, the shared-memory ring
    unlinked and no process of the run left."""
    proc, (rec, shm) = worlds[key]
    log_path = rec.with_name(rec.stem + ".controls.jsonl")
    deadline = time.monotonic() + 400
    while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no blocks"
        time.sleep(0.2)
    ranks = _children(proc.pid)
    followers = [p for p in ranks if "spawn_main" in _cmdline(p)]
    assert len(followers) == 1, [_cmdline(p) for p in ranks]
    assert Path(f"/dev/shm/{shm}").exists()
    t0 = time.monotonic()
    os.kill(followers[0], sig)
    proc.wait(timeout=limit + 60)
    took = time.monotonic() - t0
    err = proc.log.read_text()
    assert took < limit, (took, err[-3000:])
    assert proc.returncode == 1, err[-3000:]
    assert words in err and "stopped by an error" in err, err[-3000:]
    assert not Path(f"/dev/shm/{shm}").exists()  # the ring was released
    deadline = time.monotonic() + 10  # the resource tracker follows its parent out
    while any(_alive(p) for p in [proc.pid, *ranks]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in [proc.pid, *ranks]), [_cmdline(p) for p in ranks]
    from engine.runtime.control_log import read_control_log

    log = read_control_log(log_path)
    with av.open(str(rec)) as c:  # finalised: it opens and plays to its last frame
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == log.frames >= 9 + 12 * 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killing_a_rank_ends_the_run_cleanly_naming_it(shows, paused):
    _fault(shows, "run", signal.SIGKILL, 30, "rank 1 killed by SIGKILL")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hung_rank_ends_the_run_after_the_timeout_naming_it(shows, paused):
    # SIGSTOP: the process lives but does nothing (a wedged GPU, a deadlock); the run has
    # --rank-timeout RANK_TIMEOUT
    _fault(shows, "hang", signal.SIGSTOP, RANK_TIMEOUT + 30, "rank 1 hung")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _osc_int(port: int, address: str, value: int) -> None:
    """One OSC message with one int32, encoded by hand (OSC 1.0: padded strings)."""

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (4 - len(b) % 4)

    msg = pad(address.encode()) + pad(b",i") + struct.pack(">i", value)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(msg, ("127.0.0.1", port))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _pause_then_kill_rank_0(proc, log: Path, port: int) -> None:
    """A paused show (over OSC) waits longer than --rank-timeout (10 s) between blocks:
    that is no fault, the show goes on after it. Then SIGKILL on rank 0 leaves no one to
    stop the others: they see their parent gone and leave."""

    def blocks() -> int:
        return max(map(int, re.findall(r"running +block +(\d+)", log.read_text())), default=0)

    def wait_blocks(n: int) -> None:
        deadline = time.monotonic() + 400
        while blocks() < n:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no blocks"
            time.sleep(0.2)

    wait_blocks(3)
    _osc_int(port, "/dd/pause", 1)
    deadline = time.monotonic() + 60
    while not re.search(r"paused +block", log.read_text()):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    time.sleep(RANK_TIMEOUT + 3)
    assert proc.poll() is None, log.read_text()[-3000:]
    held = blocks()
    _osc_int(port, "/dd/pause", 0)
    wait_blocks(held + 2)
    assert "RankLost" not in log.read_text()
    followers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
    assert len(followers) == 1
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while _alive(followers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(followers[0])


@pytest.fixture(scope="module")
def paused(shows):
    """The pause scenario runs on a thread from the moment the shows start, so its waits
    (longer than the rank timeout, on purpose) overlap the kill and hang tests' instead of
    adding to the suite's time. Yields the thread's outcome holder."""
    import threading

    proc, (log, port) = shows["orphan"]
    outcome: dict = {}

    def run() -> None:
        try:
            _pause_then_kill_rank_0(proc, log, port)
            outcome["ok"] = True
        except BaseException as e:  # re-raised in the test
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True, name="pause-scenario")
    t.start()
    yield t, outcome
    t.join(timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pause_longer_than_the_rank_timeout_then_rank_0_killed(paused):
    """See `_pause_then_kill_rank_0` (run on a thread by the `paused` fixture)."""
    t, outcome = paused
    t.join(timeout=500)
    assert not t.is_alive(), "the pause scenario did not finish"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome.get("ok")
