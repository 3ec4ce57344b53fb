"""The one LRU (mmstore_client.cache): bounded by cost, counting what it evicts, hints replaced."""

from __future__ import annotations

from mmstore_client.cache import ByteCache, LRUCache


def test_lru_is_bounded_by_cost_and_counts_its_evictions():
    cache = ByteCache(max_bytes=10)
    for key in "abcd":
        cache.put(key, b"xxx")  # 3 bytes each: the fourth pushes out the oldest
    assert cache.size == 9 and "a" not in cache and cache.evictions == 1
    assert cache.get("b") == b"xxx"  # b is now the most recent: c goes next
    cache.put("e", b"xxx")
    assert "c" not in cache and "b" in cache and cache.evictions == 2
    cache.put("big", b"x" * 11)  # alone over the bound: skipped, nothing evicted for it
    assert "big" not in cache and cache.evictions == 2
    cache.discard("b")
    assert "b" not in cache and cache.evictions == 2  # a discard is not an eviction


def test_put_keeps_the_first_value_and_replace_keeps_the_new_one():
    cache: LRUCache[str, str] = LRUCache(2)
    cache.put("run", "etag-1")
    cache.put("run", "etag-2")  # content-addressed values never change: the first one stays
    assert cache.get("run") == "etag-1"
    cache.replace("run", "etag-2")  # a hint that changes (the S3 run counter's ETag)
    assert cache.get("run") == "etag-2" and len(cache) == 1 and cache.evictions == 0
