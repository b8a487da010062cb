"""Starting N ranks (`--gpus N`) and ending them, cleanly or not.

The process that runs the command is rank 0 (the leader): it keeps the registry, bridges,
outputs and the recording, so signals, logs and the shared-memory ring behave as with one
GPU. It spawns ranks 1..N-1 (followers) with torch.multiprocessing's spawn context; each
builds its own copy of the transformer (same file, or the same random seed), applies
Ulysses (engine.parallel.ulysses) and runs `plane.follow`. On GPUs the backend is NCCL,
one rank per card; on a CPU it is gloo, N processes (tests and CI).

Faults, and why each ends the run rather than stalling it:
- every collective has a timeout (`RankSpec.timeout_s`); a rank that hangs makes the
  others' collective fail after it, and the leader names the rank whose heartbeat (a
  thread stamping the time on the rendezvous store every second) stopped;
- a rank that dies is seen by the leader's monitor thread (exit code or signal); on NCCL,
  where a dead peer does not break a pending collective by itself, the monitor aborts the
  process group so the leader's collective returns at once;
- either way the leader's session raises `RankLost` naming the rank and the cause, the
  engine stops generating, and the run's shutdown finalises the recording and releases
  the ring; `World.close` then stops the followers (terminate, then kill);
- a follower whose leader vanishes (killed -9) notices its parent is gone and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.models.wan import WanConfig
from engine.parallel.plane import LeaderSession, RankLost, follow, lead
from engine.parallel.ulysses import CROSS_MODES, ParallelConfigError, apply_ulysses, check_world

log = logging.getLogger(__name__)

CPU_MAX_RANKS = 16  # gloo processes on a CPU: a test harness, not a speed-up
STARTUP_TIMEOUT_S = 900.0  # followers loading 28 GB of weights and compiling


@dataclass(frozen=True)
class RankSpec:
    """Everything a follower needs to build its share of the stream: picklable, sent once."""

    cfg: WanConfig
    height: int
    width: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL, rank r on cuda:r)
    dtype: str = "float32"
    seed: int = 0  # random weights' seed (when `weights` is None)
    weights: str | None = None  # transformer file
    kv_cache: str = "bf16"
    fuse_qkv: bool = True
    fp8: bool = False
    fp8_scaling: str = "rowwise"
    compile: bool = False
    attention: str | None = None
    cross: str = "tokens"
    timeout_s: float = 60.0  # per collective
    threads: int = 1  # CPU threads per rank (gloo)
    trace: str | None = None  # a folder: followers write what they ran (tests)


def check_ranks(n: int, spec: RankSpec, *, gpus: int | None = None) -> None:
    """Refuse a bad `--gpus` before anything starts: not a positive integer, more ranks than
    GPUs here, or a count that does not divide the heads or a block's tokens."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParallelConfigError(f"--gpus must be a positive integer, got {n!r}")
    if spec.cross not in CROSS_MODES:
        raise ParallelConfigError(f"cross must be one of {', '.join(CROSS_MODES)}")
    if spec.device == "cuda":
        have = torch.cuda.device_count() if gpus is None else gpus
        if n > have:
            raise ParallelConfigError(
                f"--gpus {n}: only {have} CUDA GPU{'s' if have != 1 else ''} here"
            )
    elif n > CPU_MAX_RANKS:
        raise ParallelConfigError(f"--gpus {n} on the CPU: at most {CPU_MAX_RANKS} gloo processes")
    hp, wp = spec.height // 8 // spec.cfg.patch[1], spec.width // 8 // spec.cfg.patch[2]
    check_world(spec.cfg, n, hp * wp)


def _backend(spec: RankSpec) -> str:
    return "nccl" if spec.device == "cuda" else "gloo"


def _device(spec: RankSpec, rank: int) -> torch.device:
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _store(rank: int, world: int, port: int) -> dist.TCPStore:
    """The rendezvous store, hosted by rank 0 (created before the others are spawned)."""
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world,
        is_master=rank == 0,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        wait_for_workers=False,
    )


def _init_group(spec: RankSpec, rank: int, world: int, store: dist.TCPStore) -> None:
    """Join the process group. Every rank has already announced itself on the store (see
    `World.start`), so the rendezvous is quick whatever `timeout_s` is: that timeout is
    meant for the collectives, not for importing torch on a loaded machine."""
    kwargs: dict[str, Any] = {}
    if spec.device == "cuda":
        kwargs["device_id"] = torch.device("cuda", rank)
        # On a collective timeout, abort the communicators and raise in the caller (2),
        # instead of PyTorch's default of killing the process (3): rank 0 must live on to
        # finalise the recording and release the ring. A user's own setting wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group(
        _backend(spec),
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=spec.timeout_s),
        **kwargs,
    )


def build_model(spec: RankSpec, device: torch.device):
    """The transformer as every rank builds it (before Ulysses is applied)."""
    from engine.weights.transformer import block_preparer, load_transformer, random_transformer

    dtype = getattr(torch, spec.dtype)
    prepare = block_preparer(fuse=spec.fuse_qkv, fp8=spec.fp8, scaling=spec.fp8_scaling)
    if spec.weights is None:
        model = random_transformer(
            spec.cfg, device, dtype, seed=spec.seed, attention=spec.attention, prepare_block=prepare
        )
    else:
        model = load_transformer(
            spec.weights,
            spec.cfg,
            device=device,
            dtype=dtype,
            attention=spec.attention,
            prepare_block=prepare,
        )
    if spec.compile and device.type == "cuda":
        model.compile_blocks()
    return model


def shard_session_for(spec: RankSpec, model, device: torch.device):
    from engine.parallel.ulysses import shard_cache
    from engine.stream.session import StreamSession

    session = StreamSession(
        model,
        height=spec.height,
        width=spec.width,
        device=device,
        dtype=getattr(torch, spec.dtype),
        timing=False,
        kv_cache=spec.kv_cache,
    )
    shard_cache(session, dist.get_world_size())
    return session


def _parent_watch(parent: int) -> None:
    """Exit when the leader is gone (killed -9 leaves no one to stop us)."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


BEAT_S = 1.0  # a follower's liveness beat on the store; 5 missed beats: hung


def _beat(rank: int, world: int, port: int) -> None:
    """Stamp the time on the store every BEAT_S from a thread of its own (and a store
    client of its own): a rank blocked in a collective still beats, a stopped or wedged
    one does not, so the leader can tell which rank hung."""
    store = _store(rank, world, port)
    while True:
        store.set(f"beat/{rank}", repr(time.time()))
        time.sleep(BEAT_S)


def _follower_main(rank: int, world: int, port: int, spec: RankSpec, parent: int) -> None:
    threading.Thread(target=_parent_watch, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the leader, which stops us
    if spec.device == "cpu":
        torch.set_num_threads(max(1, spec.threads))
    store = None
    try:
        store = _store(rank, world, port)
        store.set(f"alive/{rank}", "1")
        threading.Thread(target=_beat, args=(rank, world, port), daemon=True).start()
        _init_group(spec, rank, world, store)
        device = _device(spec, rank)
        model = apply_ulysses(build_model(spec, device), cross=spec.cross)
        session = shard_session_for(spec, model, device)
        store.set(f"ready/{rank}", "1")
        # Collectives time out after timeout_s, and rank 0 may take much longer than that
        # to build the rest (decoder, text encoder): wait for its go on the store instead.
        _await_key(store, "go")
        trace = None
        if spec.trace is not None:
            trace = open(os.path.join(spec.trace, f"rank{rank}.jsonl"), "w")  # noqa: SIM115

        seen = [0]

        def on_block(rec, out) -> None:
            if trace is not None:
                import json

                name = f"r{rank}n{seen[0]}.pt"  # blocks in the order run (index restarts)
                seen[0] += 1
                torch.save(out.latents.cpu(), os.path.join(spec.trace, name))
                trace.write(json.dumps(rec.__dict__, default=str) + "\n")
                trace.flush()

        follow(
            session,
            on_block=on_block,
            heartbeat=lambda i: store.set(f"block/{rank}", str(i)),
            await_message=lambda n: _await_key(store, f"msg/{n}"),
        )
        if device.type == "cuda":  # for `dreamdeck bench --gpus N`: memory per rank
            store.set(f"peak/{rank}", str(torch.cuda.max_memory_allocated(device)))
        if trace is not None:
            trace.close()
        sys.stdout.flush()
        sys.stderr.flush()
        # Straight out: tearing down the group and the interpreter can take seconds on a
        # loaded machine, and there is nothing left to save.
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report, then exit non-zero
        if not isinstance(e, KeyboardInterrupt):
            print(f"dreamdeck rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, RankLost | dist.DistError):
                traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)


def _await_key(store: dist.TCPStore, key: str) -> None:
    """Block until `key` is set, however long (a paused show); a vanished rank 0 (its
    store gone) raises."""
    while True:
        try:
            store.wait([key], timedelta(seconds=300))
            return
        except dist.DistStoreError as e:
            if "timeout" not in str(e).lower():
                raise


def _wait_keys(store: dist.TCPStore, keys: list[str], procs: list, what: str) -> None:
    """Until every key is set on the store, or a follower dies (named), or the start-up
    timeout passes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not store.check(keys):
        dead = [(r, _cause(p.exitcode)) for r, p in enumerate(procs, 1) if p.exitcode is not None]
        if dead:
            raise RankLost(f"while {what}: " + "; ".join(f"rank {r} {c}" for r, c in dead))
        if time.monotonic() > deadline:
            raise RankLost(f"while {what}: ranks not ready after {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _cause(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class World:
    """The leader's handle on the ranks: `World.start(spec, n)`, then `attach(session)` on
    rank 0's built session, and `close()` at the end (always)."""

    def __init__(self, spec: RankSpec, n: int, store, procs: list, port: int):
        self.spec, self.n, self.store, self.procs, self.port = spec, n, store, procs, port
        self.failure: str | None = None
        self._closing = False
        self._closed: list[str] | None = None
        self.leader: LeaderSession | None = None
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="ranks")
        self._monitor.start()

    @classmethod
    def start(cls, spec: RankSpec, n: int) -> World:
        """Check `n`, spawn ranks 1..n-1 and join the process group as rank 0."""
        check_ranks(n, spec)
        if dist.is_initialized():
            raise ParallelConfigError("a process group is already running in this process")
        store = _store(0, n, 0)  # port 0: the OS picks a free one
        port = store.port
        ctx = mp.get_context("spawn")
        procs = []
        for r in range(1, n):
            p = ctx.Process(
                target=_follower_main,
                args=(r, n, port, spec, os.getpid()),
                name=f"dreamdeck-rank{r}",
                daemon=False,
            )
            p.start()
            procs.append(p)
        try:
            _wait_keys(store, [f"alive/{r}" for r in range(1, n)], procs, "starting")
            _init_group(spec, 0, n, store)
        except BaseException:
            for p in procs:
                p.kill()
                p.join(5)
            raise
        log.info(
            "%d ranks over %s (timeout %.0f s per collective)", n, _backend(spec), spec.timeout_s
        )
        return cls(spec, n, store, procs, port)

    # -- faults

    def _dead(self) -> list[tuple[int, str]]:
        return [
            (r, _cause(p.exitcode))
            for r, p in enumerate(self.procs, start=1)
            if p.exitcode is not None
        ]

    def _watch(self) -> None:
        while not self._closing:
            dead = self._dead()
            if dead and self.failure is None:
                with self._lock:
                    self.failure = "; ".join(f"rank {r} {c}" for r, c in dead)
                log.error("%s: ending the run", self.failure)
                if _backend(self.spec) == "nccl":  # a dead peer does not fail NCCL by itself
                    try:
                        dist.distributed_c10d._abort_process_group()
                    except Exception as e:  # noqa: BLE001
                        log.warning("aborting the process group failed: %s", e)
                return
            time.sleep(0.2)

    def diagnose(self, block: int | None = None) -> str:
        """Which rank failed and how: a dead process (exit code or signal), else a rank
        whose heartbeat stopped (hung: stopped, wedged), else 'cause unknown'."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # a kill is seen by the OS a moment later
            if self._dead():
                break
            time.sleep(0.05)
        dead = self._dead()
        if dead:
            return "; ".join(f"rank {r} {c}" for r, c in dead)
        now, stale = time.time(), []
        for r in range(1, self.n):
            key = f"beat/{r}"
            try:
                beat = float(self.store.get(key)) if self.store.check([key]) else None
                last = int(self.store.get(f"block/{r}")) if self.store.check([f"block/{r}"]) else -1
            except Exception:  # noqa: BLE001 - the store is ours; a failure is no proof
                continue
            if beat is None or now - beat > 5 * BEAT_S:
                ago = "never" if beat is None else f"{now - beat:.0f} s ago"
                stale.append(f"rank {r} hung (last heartbeat {ago}, last block started {last})")
        if stale:
            return "; ".join(stale)
        return "a rank failed (cause unknown)"

    # -- life

    def wait_ready(self) -> None:
        """Until every follower has built its share (or one died)."""
        _wait_keys(self.store, [f"ready/{r}" for r in range(1, self.n)], self.procs, "building")

    def attach(self, session) -> LeaderSession:
        """Shard rank 0's built session (model, cache) and make it the leader. Waits for
        the followers to be built."""
        from engine.parallel.ulysses import shard_cache

        apply_ulysses(session.model, cross=self.spec.cross)
        shard_cache(session, self.n)
        self.wait_ready()
        self.store.set("go", "1")
        leader = lead(session)
        leader.diagnose = self.diagnose
        leader.announce = self._announce
        self.leader = leader
        # One tiny all-to-all on every rank now: the first collective's lazy set-up (some
        # seconds on a loaded CPU) must not count against the first block's timeout.
        leader.probe((3, 1, self.n, self.n, 1), 1)
        return leader

    def _announce(self, n: int) -> None:
        self.store.set(f"msg/{n}", "1")
        # Keep the store small over a long show. Every block has all-to-alls that need
        # every rank, so no follower is more than a couple of messages behind: n-8 is
        # long waited for.
        if n >= 8:
            self.store.delete_key(f"msg/{n - 8}")

    def close(self, leader: LeaderSession | None = None, timeout: float = 30.0) -> list[str]:
        """Stop the followers: a stop message when the group is healthy, then terminate,
        then kill whoever is left. Returns the followers' exit causes."""
        if self._closed is not None:
            return self._closed
        self._closing = True
        broken = self.failure is not None or (leader is not None and leader.lost)
        if broken or leader is None:
            # a hung rank will not leave by itself, nor one still waiting for the go
            timeout = min(timeout, 2.0)
        if leader is not None and not broken:
            try:
                leader.stop_followers()
            except BaseException as e:  # noqa: BLE001 - ending anyway
                log.warning("could not tell the ranks to stop: %s", e)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001
            log.debug("destroy_process_group: %s", e)
        self._closed = [f"rank {r} {_cause(p.exitcode)}" for r, p in enumerate(self.procs, start=1)]
        return self._closed


def spec_for_preset(
    preset: Any,
    *,
    models_dir: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    timeout_s: float | None = None,
) -> RankSpec:
    """The `RankSpec` that builds what `engine.runtime.pipeline.build_pipeline` builds for
    `preset` (same transformer file or random seed, dtype, fp8, fused q/k/v, compile)."""
    from engine.models.wan import CONFIGS
    from engine.runtime.pipeline import DTYPES, required_weights, resolve_device

    device = resolve_device(preset)
    dtype = DTYPES[preset.dtype] if device.type == "cuda" else torch.float32
    weights = None
    if not (random_weights or preset.model == "tiny"):
        weights = str(required_weights(preset, models_dir)["transformer"])
    return RankSpec(
        cfg=CONFIGS[preset.model],
        height=preset.height,
        width=preset.width,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        seed=seed,
        weights=weights,
        kv_cache=preset.kv_cache,
        fp8=bool(preset.fp8),
        compile=bool(preset.compile),
        attention=None if preset.attention == "auto" else preset.attention,
        timeout_s=timeout_s
        if timeout_s is not None
        else (120.0 if device.type == "cuda" else 30.0),
    )


def topology() -> dict[str, Any]:
    """What `dreamdeck doctor` reports for --gpus: GPU count, peer access between every
    pair (NVLink or PCIe P2P; without it NCCL goes through host memory, much slower), and
    whether NCCL and gloo are built in."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    peer = []
    for i in range(n):
        for j in range(n):
            if i != j:
                try:
                    ok = bool(torch.cuda.can_device_access_peer(i, j))
                except RuntimeError:
                    ok = False
                peer.append({"from": i, "to": j, "access": ok})
    nccl = dist.is_available() and dist.is_nccl_available()
    version = None
    if nccl:
        try:
            v = torch.cuda.nccl.version()
            version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001 - a build without the library
            version = None
    return {
        "gpu_count": n,
        "peer_access": peer,
        "all_peers": all(p["access"] for p in peer) if peer else None,
        "nccl": nccl,
        "nccl_version": version,
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "max_gpus": n,
    }
