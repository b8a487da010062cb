"""One control plane for N ranks: rank 0 (the leader) owns the registry, bridges, outputs
and recording; before each block it broadcasts what that block runs with (the
`BlockInputs` fields, the text embedding when its key changed, which decoder/encoder is
attached, and the control snapshot when one is given), so every rank runs the same block.
The other ranks (followers) run `follow`: receive, run the block, repeat.

Why broadcast the block's inputs and not the registry: the inputs are what the stream
consumes, already resolved (prompt blend, quantised changes), so the followers need none of
the registry's machinery and cannot disagree about a value. The latents come out the same
on every rank (the transformer's output is all-gathered), so the noise, sampler and cache
updates need no further traffic.

Rank 0 alone decodes frames. The anchor re-encode (the VAE encoding of a decoded frame,
from block 2 on) is done on rank 0 and its latent broadcast: followers get a stand-in
decoder that returns no pixels (`NullDecoder`) and an encoder that receives rank 0's
anchor (`ReceivedAnchor`). Input video (VACE, V2V) is not split yet: with more than one
rank the leader drops a block's input video (logged once) and the stream stays text-only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from engine.stream.session import BlockInputs, BlockOutput, StreamSession

log = logging.getLogger(__name__)

SCALAR_FIELDS = tuple(
    f.name for f in fields(BlockInputs) if f.name not in ("text", "video", "video_mask")
)


class RankLost(BaseException):
    """A rank died, hung or disagreed: the process group is broken and no block can run.

    A BaseException on purpose: the engine retries a failed block (an out-of-memory spike
    passes), but a lost rank does not come back, so retrying would only wait out the
    collective timeout again. It ends generation at once, and the run's normal shutdown
    (recording finalised, outputs released) follows."""


def _bcast_object(obj: Any, group: dist.ProcessGroup | None) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _bcast_tensor(t: Tensor | None, shape, device, group) -> Tensor:
    """Broadcast a float32 tensor of known shape from rank 0 (t is None on the others)."""
    buf = t.float().contiguous() if t is not None else torch.empty(shape, device=device)
    dist.broadcast(buf, src=0, group=group)
    return buf


class SentAnchor:
    """Rank 0's anchor encoder: encode, then broadcast the latent to the followers."""

    def __init__(self, inner, session: StreamSession, group):
        self.inner, self.session, self.group = inner, session, group

    def encode_image(self, frame: Tensor) -> Tensor:
        a = self.inner.encode_image(frame).to(self.session.device, torch.float32)
        return _bcast_tensor(a, None, None, self.group)


class ReceivedAnchor:
    """A follower's anchor encoder: receives rank 0's latent of the anchor frame."""

    def __init__(self, session: StreamSession, group):
        self.session, self.group = session, group

    def encode_image(self, frame: Tensor) -> Tensor:
        s = self.session
        return _bcast_tensor(None, (1, s.cfg.in_dim, 1, s.h, s.w), s.device, self.group)


class NullDecoder:
    """A follower's decoder: no pixels, just as many (empty) frames as a real decoder gives
    (9 for block 0, then 12), so the session's frame ring fills as on rank 0."""

    def __init__(self):
        self.blocks = 0

    def reset(self) -> None:
        self.blocks = 0

    def decode(self, latents: Tensor) -> Tensor:
        t = 1 + 4 * (latents.shape[2] - 1) if self.blocks == 0 else 4 * latents.shape[2]
        self.blocks += 1
        return torch.zeros(1, 3, 1, 1, 1, device=latents.device).expand(1, 3, t, 1, 1)


class LeaderSession(StreamSession):
    """Rank 0's `StreamSession` (the class of the built session is swapped for this one by
    `lead`): broadcasts each block's inputs and each reset before running it locally."""

    group: dist.ProcessGroup | None
    world: int
    control_snapshot: dict | None  # set by whoever drives the session; sent with the block
    _sent_key: Any
    _warned_video: bool
    diagnose: Any  # (block index) -> "rank 2 killed by SIGKILL", set by launch.World
    lost: bool  # a collective failed: the group is broken
    announce: Any  # (message number) -> None: tell the followers a message is coming
    _sent: int

    def _lost(self, what: str, e: BaseException) -> RankLost:
        self.lost = True  # launch.World.close sends no stop message into a broken group
        diag = self.diagnose(self.index) if self.diagnose is not None else "a rank failed"
        return RankLost(f"{diag} ({what}: {type(e).__name__}: {str(e)[:200]})")

    def _send(self, msg: dict) -> None:
        if self.announce is not None:
            # The followers wait for this on the store, with no timeout: the time between
            # blocks is the show's (a pause, a slow prompt encode), not a fault.
            self.announce(self._sent)
        self._sent += 1
        try:
            _bcast_object(msg, self.group)
        except Exception as e:  # noqa: BLE001 - any collective failure means a lost rank
            raise self._lost(f"sending {msg['op']} to the other ranks", e) from e

    def reset(self) -> None:
        if getattr(self, "world", None) is not None:  # not during StreamSession.__init__
            self._send({"op": "reset"})
        super().reset()

    # the ranks get a block's text before it starts; a text joining mid-block would
    # reach rank 0 alone (the block driver asks this before passing `late`)
    accepts_late_text = False

    @torch.no_grad()
    def next_block(self, inputs: BlockInputs, late=None) -> BlockOutput:
        if late is not None:
            raise ValueError("several GPUs: a text cannot join a block in flight")
        if inputs.video is not None:
            if not self._warned_video:
                log.warning(
                    "input video (VACE, V2V) is not split across ranks yet: with %d ranks"
                    " the stream ignores it and stays text-only",
                    self.world,
                )
                self._warned_video = True
            inputs = BlockInputs(**{n: getattr(inputs, n) for n in SCALAR_FIELDS}, text=inputs.text)
            inputs.v2v_strength = None
        if self.encoder is not None and not isinstance(self.encoder, SentAnchor):
            self.encoder = SentAnchor(self.encoder, self, self.group)  # after a decoder swap
        new_text = inputs.text_key != self._sent_key or self._sent_key is None
        msg = {
            "op": "block",
            "index": self.index,
            "inputs": {n: getattr(inputs, n) for n in SCALAR_FIELDS},
            "text": inputs.text.detach().cpu() if new_text else None,
            "decoder": self.decoder is not None,
            "encoder": self.encoder is not None,
            "snapshot": self.control_snapshot,
        }
        self._send(msg)
        self._sent_key = inputs.text_key
        try:
            return super().next_block(inputs)
        except (RuntimeError, dist.DistBackendError) as e:
            if _is_collective_error(e):
                raise self._lost(f"block {msg['index']}", e) from e
            raise

    def probe(self, shape: tuple[int, ...], reps: int) -> float:
        """Time `reps` token->head all-to-alls of a [3, B, n, H, D] tensor (and one of its
        output's size each) on every rank: a block's communication without its compute.
        Returns seconds on this rank."""
        self._send({"op": "probe", "shape": tuple(shape), "reps": reps})
        return probe_all_to_all(shape, reps, self.device, self.dtype, self.group)

    def stop_followers(self) -> None:
        """Tell the followers to leave their loop (the end of a clean run)."""
        self._send({"op": "stop"})


def _is_collective_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistBackendError | dist.DistError):
        return True
    text = str(e).lower()
    return any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")
    )


def lead(session: StreamSession, group: dist.ProcessGroup | None = None) -> LeaderSession:
    """Turn rank 0's built session into a `LeaderSession` (in place) and return it."""
    if session.vace is not None:
        log.warning("VACE is not split across ranks yet: with --gpus > 1 it is detached")
        session.vace = None
    session.video_encoder = None
    session.__class__ = LeaderSession
    session.group = group
    session.world = dist.get_world_size(group)
    session.control_snapshot = None
    session._sent_key = None
    session._warned_video = False
    session.diagnose = None
    session.lost = False
    session.announce = None
    session._sent = 0
    return session  # type: ignore[return-value]


@dataclass
class FollowRecord:
    """What a follower ran, block by block (tests compare it with rank 0's)."""

    index: int
    inputs: dict
    snapshot: dict | None
    latents_sum: float


def follow(
    session: StreamSession,
    group: dist.ProcessGroup | None = None,
    *,
    on_block=None,
    heartbeat=None,
    await_message=None,
) -> int:
    """A follower's loop: run every block rank 0 announces, until it says stop. Returns
    the number of blocks run. `on_block(FollowRecord, BlockOutput)` sees each block;
    `heartbeat(index)` is called before each (the launcher stores it, so a hang can be
    pinned on the rank that stopped). `await_message(n)` blocks until rank 0 announces
    message n (`LeaderSession.announce`), so that waiting between blocks is not bound by
    the collective timeout. A block that fails the session's own checks fails
    identically on rank 0 (same inputs, same state), so it is skipped here as there."""
    text: Tensor | None = None
    blocks = 0
    received = 0
    while True:
        if await_message is not None:
            await_message(received)
        received += 1
        msg = _bcast_object(None, group)
        op = msg["op"]
        if op == "stop":
            return blocks
        if op == "reset":
            session.reset()
            continue
        if op == "probe":
            probe_all_to_all(msg["shape"], msg["reps"], session.device, session.dtype, group)
            continue
        if op != "block":
            raise RankLost(f"unknown message from rank 0: {op!r}")
        if msg["index"] != session.index:
            raise RankLost(
                f"out of step with rank 0: it runs block {msg['index']}, this rank {session.index}"
            )
        if msg["text"] is not None:
            text = msg["text"].to(session.device, session.dtype)
        if text is None:
            raise RankLost("rank 0 sent a block without ever sending its text embedding")
        session.decoder = (session.decoder or NullDecoder()) if msg["decoder"] else None
        session.encoder = ReceivedAnchor(session, group) if msg["encoder"] else None
        if heartbeat is not None:
            heartbeat(msg["index"])
        inputs = BlockInputs(text=text, **msg["inputs"])
        try:
            out = session.next_block(inputs)
        except ValueError as e:  # the session's checks: rank 0 refused this block too
            log.info("block %d refused (as on rank 0): %s", msg["index"], e)
            continue
        blocks += 1
        if on_block is not None:
            on_block(
                FollowRecord(
                    msg["index"], msg["inputs"], msg["snapshot"], float(out.latents.sum())
                ),
                out,
            )


def probe_all_to_all(shape, reps: int, device, dtype, group) -> float:
    """See `LeaderSession.probe`. Three untimed rounds first (connections, buffers)."""
    import time

    from engine.parallel.ulysses import heads_from_tokens

    world = dist.get_world_size(group)
    group = group if group is not None else dist.group.WORLD
    x = torch.zeros(shape, device=device, dtype=dtype)
    for _ in range(3):
        heads_from_tokens(x, world, group)
    dist.barrier(group)
    t0 = time.perf_counter()
    for _ in range(reps):
        heads_from_tokens(x, world, group)
        heads_from_tokens(x[:1], world, group)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0
