import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cache import EmbeddingCache, image_digest, nbytes


class Counting:
    """A compute function that counts its calls and returns a fresh array of `size` bytes."""

    def __init__(self, size=100, delay=0.0):
        self.size, self.delay, self.calls = size, delay, 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return np.zeros(self.size, np.uint8)


def test_hit_returns_the_cached_object():
    cache, compute = EmbeddingCache(4, 10_000), Counting()
    first = cache.get("a", compute)
    assert cache.get("a", compute) is first
    assert compute.calls == 1
    assert cache.stats() == {"entries": 1, "kept": 0, "mb": 0.0, "bytes": 100, "max_bytes": 10_000, "hits": 1,
                             "misses": 1, "evictions": 0, "computed": {"other": 1}}


def test_computed_counts_misses_and_puts_by_kind():
    cache, compute = EmbeddingCache(4, 10_000), Counting()
    cache.get(("sam-embedding", 1, "img"), compute)
    cache.get(("sam-embedding", 1, "img"), compute)  # a hit: nothing computed
    cache.put(("groundingdino-outputs", 1, "img", "cat ."), np.zeros(1))
    assert cache.stats()["computed"] == {"sam-embedding": 1, "groundingdino-outputs": 1}
    assert cache.computed_here() == cache.stats()["computed"]
    other = threading.Thread(target=lambda: cache.get(("sam-embedding", 1, "other"), compute))
    other.start()
    other.join()
    assert cache.stats()["computed"]["sam-embedding"] == 2 and cache.computed_here()["sam-embedding"] == 1


def test_eviction_by_count_is_least_recently_used():
    cache = EmbeddingCache(2, 10_000)
    cache.get("a", Counting())
    cache.get("b", Counting())
    cache.get("a", Counting())  # a is now the most recent
    cache.get("c", Counting())
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.evictions == 1


def test_eviction_by_bytes():
    cache = EmbeddingCache(100, 250)
    for key in "abc":
        cache.get(key, Counting(100))
    assert len(cache) == 2 and "a" not in cache and cache.bytes == 200
    cache.get("big", Counting(240))
    assert list(cache._entries) == ["big"] and cache.bytes == 240


def test_entries_read_with_keep_outlast_a_stream_of_images_seen_once():
    """A labeler clicking on two images while fresh prompts and a bulk job stream through: the clicked embeddings
    stay (plain LRU would have evicted them after 8 new entries), up to half of the bound."""
    cache = EmbeddingCache(8, 10_000)
    cache.get("clicked-1", Counting(), keep=True)  # the first click computes it: kept from then on
    cache.get("clicked-2", Counting())
    cache.get("clicked-2", Counting(), keep=True)  # a later click on a cached entry keeps it too
    for n in range(40):
        cache.get(f"fresh-{n}", Counting())
    assert "clicked-1" in cache and "clicked-2" in cache and "fresh-39" in cache and len(cache) == 8
    assert cache.stats()["kept"] == 2 and cache.evictions == 34
    for n in range(6):  # more kept entries than half the bound: the oldest of them go in LRU order
        cache.get(f"clicked-more-{n}", Counting(), keep=True)
    assert cache.stats()["kept"] <= 5 and "clicked-1" not in cache and "clicked-more-5" in cache


def test_kept_entries_count_against_the_byte_bound_too():
    cache = EmbeddingCache(100, 1000)
    cache.get("clicked", Counting(400), keep=True)
    for n in range(5):
        cache.get(f"fresh-{n}", Counting(300))
    assert "clicked" in cache and cache.bytes <= 1000
    cache.get("clicked-big", Counting(300), keep=True)  # 700 kept bytes: over half of 1000
    cache.get("fresh-last", Counting(300))
    assert "clicked" not in cache and cache.bytes <= 1000 and "fresh-last" in cache


def test_value_larger_than_the_bound_is_returned_not_cached():
    cache, compute = EmbeddingCache(4, 50), Counting(100)
    assert cache.get("a", compute).nbytes == 100
    cache.get("a", compute)
    assert compute.calls == 2 and len(cache) == 0


def test_size_zero_turns_caching_off():
    cache, compute = EmbeddingCache(0, 10_000), Counting()
    cache.get("a", compute)
    cache.get("a", compute)
    assert compute.calls == 2


def test_concurrent_requests_for_one_key_compute_once():
    cache, compute = EmbeddingCache(4, 10_000), Counting(delay=0.3)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get("img", compute), range(8)))
    assert compute.calls == 1
    assert all(r is results[0] for r in results)


def test_concurrent_requests_for_different_keys_do_not_share():
    cache = EmbeddingCache(8, 10_000)

    def compute_for(key):
        return lambda: np.full(10, ord(key), np.uint8)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: (k, cache.get(k, compute_for(k))), "abcdabcd"))
    assert all(value[0] == ord(key) for key, value in results)


def test_a_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = EmbeddingCache(4, 10_000)
    started = threading.Event()

    def fail():
        started.set()
        time.sleep(0.2)
        raise RuntimeError("boom")

    errors = []

    def call():
        try:
            cache.get("k", fail)
        except RuntimeError as e:
            errors.append(str(e))

    first = threading.Thread(target=call)
    first.start()
    started.wait()
    second = threading.Thread(target=call)
    second.start()
    first.join()
    second.join()
    assert errors == ["boom", "boom"] and len(cache) == 0
    assert cache.get("k", Counting()).nbytes == 100  # computed afresh afterwards


def test_image_digest_is_pixel_identity():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert image_digest(image) == image_digest(image.copy())
    assert image_digest(image) == image_digest(np.asfortranarray(image))
    changed = image.copy()
    changed[5, 5, 0] ^= 1
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image.reshape(30, 20, 3)) != image_digest(image)  # same bytes, other shape


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.zeros(2, 3), 24),
        (np.zeros(5, np.float64), 40),
        ((torch.zeros(1), [np.zeros(2, np.uint8), {"x": torch.zeros(1, dtype=torch.float16)}]), 8),
        ("text", 0),
    ],
)
def test_nbytes(value, expected):
    assert nbytes(value) == expected


def test_max_age_recomputes_stale_entries(monkeypatch):
    cache, compute = EmbeddingCache(4, 10_000), Counting()
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache.get("a", compute, max_age=60)
    now[0] += 59
    cache.get("a", compute, max_age=60)
    assert compute.calls == 1
    now[0] += 2
    cache.get("a", compute, max_age=60)
    assert compute.calls == 2 and len(cache) == 1 and cache.bytes == 100
