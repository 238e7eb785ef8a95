"""A bounded, thread-safe cache of per-image model state (SAM embeddings, Grounding DINO features).

Shared by the text and click paths of a worker. Keys name the image (a digest of its pixels) and
the model, so entries of different images or models never mix. Least-recently-used entries go
first when the count or the byte total is over its bound, except those a person is working on: an entry
read with `keep=True` (a click's embedding) goes after every other one while the kept entries hold at most
half of either bound, so a stream of images seen once (fresh prompts, a bulk job) can't push the images being
clicked out. Concurrent requests for one key compute it once: the others wait for that result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import numpy as np


def image_digest(image: np.ndarray) -> str:
    """Identity of an image by its pixels: (H, W, C) array -> hex digest (shape included)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, str(image.dtype))).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def nbytes(value: Any) -> int:
    """Bytes held by tensors and arrays inside `value` (nested tuples, lists, dicts, dataclasses)."""
    if hasattr(value, "untyped_storage"):  # torch.Tensor
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "tensors"):  # groundingdino's NestedTensor
        return nbytes(value.tensors) + nbytes(getattr(value, "mask", None))
    return 0


KEPT_SHARE = 0.5  # of each bound, at most, for the entries read with keep=True before they go in LRU order too


class EmbeddingCache:
    """LRU cache bounded by `max_entries` and `max_bytes`, kept entries last (see above); `get` computes missing
    values once."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int, float]] = OrderedDict()  # value, bytes, created
        self._pending: dict[Hashable, Future] = {}
        self._kept: set[Hashable] = set()  # the entries read with keep=True
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.computed: dict[str, int] = {}  # values computed (a miss) or put, by the first item of a tuple key
        self._here = threading.local()  # the same, by the calling thread alone (computed_here)

    def get(self, key: Hashable, compute: Callable[[], Any], max_age: float | None = None, keep: bool = False) -> Any:
        """The value cached under `key`, or `compute()`'s result, cached if it fits.

        max_age: seconds after which a cached value is computed afresh (None: never). keep: someone is working on
        this image (a click): the entry goes after the others when room is needed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and max_age is not None and time.monotonic() - entry[2] > max_age:
                self._remove(key)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
                if keep:
                    self._kept.add(key)
                self.hits += 1
                return entry[0]
            pending = self._pending.get(key)
            if pending is None:
                self.misses += 1
                self._count(key)
                pending = self._pending[key] = Future()
                owner = True
            else:
                self.hits += 1
                owner = False
        if not owner:
            return pending.result()
        try:
            value = compute()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            self._insert(key, value, keep)
        pending.set_result(value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value` under `key` (replacing what was there), if it fits: what a batch computed for each of
        its images, read by `get` later."""
        with self._lock:
            self._count(key)
            if key in self._entries:
                self._remove(key)
            self._insert(key, value)

    def _count(self, key: Hashable) -> None:
        """One more value computed for `key`'s kind ("groundingdino-outputs": a detector pass, "sam-embedding": an
        image encoder pass, ...): the counters that show a re-filter ran no model."""
        kind = str(key[0]) if isinstance(key, tuple) and key else "other"
        self.computed[kind] = self.computed.get(kind, 0) + 1
        here = self._here.__dict__.setdefault("counts", {})
        here[kind] = here.get(kind, 0) + 1

    def computed_here(self) -> dict[str, int]:
        """`computed`, counting only what the calling thread computed or put: what one request cost, whatever other
        threads (a bulk job) compute meanwhile."""
        return dict(self._here.__dict__.get("counts", {}))

    def _insert(self, key: Hashable, value: Any, keep: bool = False) -> None:
        size = nbytes(value)
        if self.max_entries < 1 or size > self.max_bytes:
            return  # too big to keep: returned, not cached
        self._entries[key] = (value, size, time.monotonic())
        self.bytes += size
        if keep:
            self._kept.add(key)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(self._victim(key))
            self.evictions += 1

    def _victim(self, newest: Hashable) -> Hashable:
        """The entry to evict: the least recently used of those not kept (but the one just inserted); of the kept
        ones when they hold more than their share of either bound, or are all there is."""
        kept_bytes = sum(self._entries[k][1] for k in self._kept)
        over = len(self._kept) > KEPT_SHARE * self.max_entries or kept_bytes > KEPT_SHARE * self.max_bytes
        victim = next((k for k in self._entries if (k in self._kept) == over and k != newest), None)
        return next(iter(self._entries)) if victim is None else victim

    def _remove(self, key: Hashable) -> None:
        _, size, _ = self._entries.pop(key)
        self._kept.discard(key)
        self.bytes -= size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "kept": len(self._kept), "mb": round(self.bytes / 2**20, 1),
                    "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions, "computed": dict(self.computed)}
