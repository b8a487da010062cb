"""Text embeddings by prompt, encoded off the block loop.

A VJ changes prompts while the stream runs; encoding one takes tens of milliseconds on a GPU
and seconds on a CPU. The block loop must never wait for that. So `request(text)` only
queues the text for a background worker and returns at once; the loop asks `get(text)` /
`ready(texts)` at each block boundary and uses a prompt from the first block that starts
after its encoding finished.

Bounded everywhere: the cache holds `capacity` embeddings (least recently used go first),
and the queue of texts waiting for the worker holds at most `capacity` (the oldest requests
are dropped: latest wins, a flood of OSC prompt changes cannot pile up work).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

log = logging.getLogger(__name__)


def cache_key(text: str) -> str:
    """Prompts differing only in white space share an entry (the encoder collapses it anyway)."""
    return " ".join(text.split())


class EmbeddingCache:
    """LRU cache text -> embedding [L, D] with a background encoding worker.

    `encoder` is anything with `encode(list[str]) -> Tensor [N, L, D]` (TextEncoder,
    TinyTextEncoder). Encoding errors are kept per text (`error(text)`) and logged; they never
    reach the block loop as exceptions.
    """

    def __init__(
        self,
        encoder,
        capacity: int = 32,
        *,
        max_batch: int = 8,
        on_error: Callable[[str, Exception], None] | None = None,
    ):
        if capacity < 8:
            raise ValueError(
                f"EmbeddingCache capacity must be >= 8 (the prompt slots), got {capacity}"
            )
        self.encoder = encoder
        self.capacity = capacity
        self.max_batch = max(1, max_batch)
        self.on_error = on_error
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._pending: OrderedDict[str, None] = OrderedDict()  # waiting for the worker
        self._running: set[str] = set()  # being encoded now
        self._errors: dict[str, str] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.hits = 0
        self.misses = 0
        self._thread = threading.Thread(
            target=self._work, name="dreamdeck-text-encoder", daemon=True
        )
        self._thread.start()

    # -- the block loop's side: never blocks on encoding (except `wait`) -------------------

    def request(self, text: str) -> bool:
        """Queue `text` for encoding unless cached or already queued. Returns True when cached."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a string, got {type(text).__name__}")
        key = cache_key(text)
        with self._cond:
            if self._closed:
                raise RuntimeError("EmbeddingCache is closed")
            if key in self._cache:
                self._cache.move_to_end(key)
                return True
            if key in self._running:
                return False
            self._errors.pop(key, None)  # a new request retries a failed text
            self._pending[key] = None
            self._pending.move_to_end(key)
            while len(self._pending) > self.capacity:
                dropped, _ = self._pending.popitem(last=False)
                log.debug("text queue full: dropped %r", dropped)
            self._cond.notify_all()
            return False

    def get(self, text: str) -> Tensor | None:
        """The embedding [L, D] of `text` if encoded, else None (counts a hit or a miss)."""
        key = cache_key(text)
        with self._cond:
            emb = self._cache.get(key)
            if emb is None:
                self.misses += 1
                return None
            self._cache.move_to_end(key)
            self.hits += 1
            return emb

    def ready(self, texts: Iterable[str]) -> bool:
        """True when every text is encoded (no hit/miss counting, no LRU touch)."""
        with self._cond:
            return all(cache_key(t) in self._cache for t in texts)

    def is_queued(self, text: str) -> bool:
        """Waiting for or being encoded by the worker (False for cached, failed or dropped)."""
        key = cache_key(text)
        with self._cond:
            return key in self._pending or key in self._running

    def error(self, text: str) -> str | None:
        """Why encoding `text` failed, if it did."""
        with self._cond:
            return self._errors.get(cache_key(text))

    def wait(self, texts: Sequence[str], timeout: float | None = None) -> bool:
        """Block until every text is encoded (or failed, or the timeout passes): for the first
        block of a stream only. Requests the texts that are neither cached nor queued."""
        keys = [cache_key(t) for t in texts]
        for t in texts:
            self.request(t)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or all(k in self._cache or k in self._errors for k in keys),
                timeout,
            ) and all(k in self._cache for k in keys)

    def __len__(self) -> int:
        with self._cond:
            return len(self._cache)

    def __contains__(self, text: str) -> bool:
        with self._cond:
            return cache_key(text) in self._cache

    def close(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._pending)
                if self._closed:
                    return
                # Newest requests first: they are what the stage wants now.
                batch = list(reversed(self._pending))[: self.max_batch]
                for k in batch:
                    del self._pending[k]
                self._running.update(batch)
            try:
                embs = self.encoder.encode(batch)
                if embs.shape[0] != len(batch):
                    raise RuntimeError(
                        f"encoder returned {embs.shape[0]} embeddings for {len(batch)} texts"
                    )
                results, failure = [(k, embs[i]) for i, k in enumerate(batch)], None
            except Exception as e:  # never kill the worker: the stage goes on with old prompts
                results, failure = [], e
                log.error("text encoding failed for %d prompt(s): %s", len(batch), e)
            with self._cond:
                self._running.difference_update(batch)
                for k, emb in results:
                    self._cache[k] = emb
                    self._cache.move_to_end(k)
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
                if failure is not None:
                    for k in batch:
                        self._errors[k] = f"{type(failure).__name__}: {failure}"
                self._cond.notify_all()
            if failure is not None and self.on_error is not None:
                for k in batch:
                    try:
                        self.on_error(k, failure)
                    except Exception:  # a broken callback must not stop encoding
                        log.exception("on_error callback failed")
