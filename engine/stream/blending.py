"""Prompt blending and prompt transitions, one step per block.

Why a norm rescale: a weighted sum of two unrelated embedding vectors is shorter than either
(they are far from parallel), and the transformer reads a shorter text embedding as a weaker,
muddier prompt. Rescaling each token vector of the mix to the weighted mean of the inputs'
norms keeps a blend as "loud" as its parts. Slerp does the same for two prompts by moving
along the arc between them.

The `PromptMixer` is what the engine calls once per block: `set_target` (any time, never
blocks: it only asks the embedding cache for encodings) and `next_block` (returns the
embedding for this block and a key that changes exactly when the embedding does, so the
transformer recomputes cross-attention K/V only then).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from engine.stream.embedding_cache import EmbeddingCache, cache_key

log = logging.getLogger(__name__)

MAX_PROMPTS = 8
METHODS = ("linear", "slerp")
Method = Literal["linear", "slerp"]
_EPS = 1e-6


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights clipped at 0 and scaled to sum 1; all <= 0 gives equal weights."""
    if not weights:
        raise ValueError("no weights to normalise")
    w = [max(0.0, float(x)) for x in weights]
    total = sum(w)
    if total <= 0:
        return [1.0 / len(w)] * len(w)
    return [x / total for x in w]


def blend_linear(embs: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Σ wᵢeᵢ over [K, L, D], each token vector rescaled to Σ wᵢ‖eᵢ‖ (weights used as given;
    normalise first). Float32 result. Tokens where the mix cancels out are left unscaled."""
    e = embs.float()
    w = torch.as_tensor(weights, dtype=torch.float32, device=e.device)
    if w.ndim != 1 or w.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} embeddings but weights of shape {tuple(w.shape)}")
    if e.shape[0] == 1 and float(w[0]) == 1.0:
        return e[0].clone()
    mix = torch.einsum("k,kld->ld", w, e)
    target = torch.einsum("k,kl->l", w, e.norm(dim=-1))
    n = mix.norm(dim=-1)
    scale = torch.where(n > _EPS, target / n.clamp_min(_EPS), torch.ones_like(n))
    return mix * scale[:, None]


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per token vector (last dim), magnitudes included. Exactly `a`
    at t=0 and `b` at t=1. Where the angle is undefined or ~0 (a zero vector: past one
    prompt's tokens but not the other's; (anti)parallel vectors) it falls back to lerp."""
    a, b = a.float(), b.float()
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    cos = ((a * b).sum(-1, keepdim=True) / (na * nb).clamp_min(_EPS)).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    flat = (so < 1e-4) | (na < _EPS) | (nb < _EPS)
    safe = so.clamp_min(1e-4)
    wa = torch.where(flat, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(flat, torch.full_like(so, t), torch.sin(t * omega) / safe)
    return wa * a + wb * b


def blend(embs: Tensor, weights: Sequence[float], method: Method = "linear") -> Tensor:
    """Blend [K, L, D] with normalised weights: slerp for exactly two prompts when asked,
    else linear with the norm rescale. Float32 [L, D]."""
    w = normalize_weights(weights)
    if method == "slerp" and len(w) == 2:
        return slerp(embs[0], embs[1], w[1])
    return blend_linear(embs, w)


def interpolate(a: Tensor, b: Tensor, t: float, method: Method = "linear") -> Tensor:
    """One point of a transition from `a` to `b` (t in [0, 1]); exact at both ends."""
    if t <= 0.0:
        return a.float().clone()
    if t >= 1.0:
        return b.float().clone()
    if method == "slerp":
        return slerp(a, b, t)
    return blend_linear(torch.stack([a.float(), b.float()]), [1.0 - t, t])


@dataclass(frozen=True)
class PromptSet:
    """A validated target: texts with normalised, non-zero weights."""

    texts: tuple[str, ...]
    weights: tuple[float, ...]
    method: Method

    @staticmethod
    def make(prompts: Sequence[tuple[str, float]], method: str) -> PromptSet:
        if method not in METHODS:
            raise ValueError(f"blend method {method!r} is not one of {', '.join(METHODS)}")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of (text, weight) pairs")
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"between 1 and {MAX_PROMPTS} prompts, got {len(prompts)}")
        texts, raw = [], []
        for i, p in enumerate(prompts):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"prompt {i + 1}: expected (text, weight), got {p!r}")
            text, weight = p
            if not isinstance(text, str):
                raise ValueError(
                    f"prompt {i + 1}: text must be a string, got {type(text).__name__}"
                )
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
            ):
                raise ValueError(f"prompt {i + 1}: weight must be a finite number, got {weight!r}")
            texts.append(cache_key(text))
            raw.append(float(weight))
        w = normalize_weights(raw)
        # Merge repeated texts and drop silent slots: nothing to encode for them.
        merged: dict[str, float] = {}
        for t, x in zip(texts, w, strict=True):
            if x > 0:
                merged[t] = merged.get(t, 0.0) + x
        return PromptSet(tuple(merged), tuple(merged.values()), method)  # type: ignore[arg-type]


class PromptMixer:
    """Per-block text embedding with blending and transitions (see module docstring).

    A new target takes effect at the first `next_block` after all its texts are encoded; until
    then the current embedding goes on (the stream never waits). The one exception: the very
    first `next_block`, with nothing encoded yet, blocks until the initial prompt is encoded
    (up to `first_timeout` seconds), since there is nothing else to show.

    A transition of N blocks moves from where the embedding is now to the target: block k
    after it starts uses interpolate(start, target, k/N) and block N is the target exactly.
    `set_target` during a transition starts a new one from the current point: no jump.
    """

    def __init__(self, cache: EmbeddingCache, *, first_timeout: float | None = 120.0):
        self.cache = cache
        self.first_timeout = first_timeout
        self._lock = threading.Lock()
        self._latest: PromptSet | None = None  # last target asked for
        self._pending: tuple[PromptSet, int] | None = None  # waiting for encodings
        self._current: Tensor | None = None  # float32 [L, D]
        self._out: Tensor | None = None  # [1, L, D] in the encoder's dtype
        self._dtype: torch.dtype | None = None
        self._move: tuple[Tensor, Tensor, int, int, Method] | None = (
            None  # start, end, k, n, method
        )
        self._version = 0
        self.last_error: str | None = None

    def set_target(
        self,
        prompts: Sequence[tuple[str, float]],
        transition_blocks: int = 0,
        method: str = "linear",
    ) -> bool:
        """Aim at a new weighted prompt set. Non-blocking. Returns False (and changes nothing)
        when it equals the latest target, so callers may re-send the same set every block.
        Bad input raises ValueError and leaves the mixer as it was."""
        if (
            isinstance(transition_blocks, bool)
            or not isinstance(transition_blocks, int)
            or transition_blocks < 0
        ):
            raise ValueError(
                f"transition_blocks must be an integer >= 0, got {transition_blocks!r}"
            )
        spec = PromptSet.make(prompts, method)
        with self._lock:
            if spec == self._latest:
                return False
            self._latest = spec
            self._pending = (spec, transition_blocks)
        for t in spec.texts:
            self.cache.request(t)
        return True

    @property
    def in_transition(self) -> bool:
        return self._move is not None

    @property
    def waiting(self) -> bool:
        """A target is waiting for its encodings."""
        return self._pending is not None

    def next_block(self) -> tuple[Tensor, Hashable]:
        """(embedding [1, L, D], key) for the block about to start; advances a transition."""
        with self._lock:
            self._promote()
            first = self._current is None
        if first:
            pending = self._pending
            if pending is None:
                raise RuntimeError("PromptMixer.next_block before any set_target")
            self.cache.wait(pending[0].texts, self.first_timeout)
            with self._lock:
                self._promote()
                if self._current is None:
                    why = self.last_error or next(
                        (e for t in pending[0].texts if (e := self.cache.error(t))), "timed out"
                    )
                    raise RuntimeError(f"initial prompt could not be encoded: {why}")
        with self._lock:
            self._advance()
            assert self._out is not None
            return self._out, self._version

    def join_now(self) -> tuple[Tensor, Hashable] | None:
        """Start the latest target inside the block in flight (after its `next_block`): when
        its encodings are ready, the move begins as a `next_block` would begin it, and the
        new (embedding, key) is returned for the block's remaining steps; the next
        `next_block` goes on from there. None (nothing changed) while they are not ready."""
        with self._lock:
            if self._pending is None or self._current is None:
                return None
            self._promote()
            if self._pending is not None or self.last_error is not None:
                return None  # still encoding, or dropped (last_error says why)
            self._advance()
            return self._out, self._version

    # -- internals (lock held) -----------------------------------------------------------------

    def _promote(self) -> None:
        if self._pending is None:
            return
        spec, n = self._pending
        embs = []
        for t in spec.texts:
            e = self.cache.get(t)
            if e is None:
                err = self.cache.error(t)
                if err is not None:
                    self.last_error = f"prompt {t!r}: {err}"
                    log.error("dropping prompt change: %s", self.last_error)
                    self._pending = None
                    return
                if not self.cache.is_queued(t):  # evicted or dropped from the queue: ask again
                    self.cache.request(t)
                return
            embs.append(e)
        self._pending = None
        self.last_error = None
        self._dtype = self._dtype or embs[0].dtype
        target = blend(torch.stack(embs), list(spec.weights), spec.method)
        if self._current is None or n == 0:
            self._move = None
            self._set(target)
        else:
            self._move = (self._current, target, 0, n, spec.method)

    def _advance(self) -> None:
        if self._move is None:
            return
        start, end, k, n, method = self._move
        k += 1
        if k >= n:
            self._move = None
            self._set(end)
        else:
            self._move = (start, end, k, n, method)
            self._set(interpolate(start, end, k / n, method))

    def _set(self, emb: Tensor) -> None:
        self._current = emb
        self._out = emb.to(self._dtype)[None]
        self._version += 1
