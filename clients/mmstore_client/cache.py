"""The one bounded cache of the project, and the one single-flight, for content-addressed values.

Almost everything cached here is keyed by a digest (or derived from one), so an entry can never be
stale: there is no invalidation, only eviction of the least recently used entries once the entries'
total cost passes the bound. The one exception, a hint that changes (the S3 backend's last-seen run
counter and its ETag), is stored with :meth:`LRUCache.replace`. The cost is what the caller says an
entry weighs (bytes for blobs, width*height*3 for decoded images, 1 for small records), so one class
bounds every cache. The LRU bookkeeping is ``cachetools.LRUCache``; this wrapper adds the lock (the
caches are shared by threads), hit, miss and eviction counts for metrics, and silently skips values
larger than the bound.

:class:`SingleFlight` / :class:`AsyncSingleFlight` make concurrent callers of one key share one
computation (a fetch, a decode): the first caller runs it, the others wait for its result or its
exception. Nothing is remembered afterwards; pair them with a cache for that.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Generic, TypeVar

import cachetools

if TYPE_CHECKING:
    pass

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class _CountingLRU(cachetools.LRUCache):
    """cachetools' LRU, counting the entries it evicts to stay under the bound."""

    evictions = 0

    def popitem(self):  # cachetools calls this, and only this, to evict
        item = super().popitem()
        self.evictions += 1
        return item


class LRUCache(Generic[K, V]):
    """A thread-safe LRU bounded by the total ``cost`` of its values (default: 1 per entry)."""

    def __init__(self, max_cost: int, cost: Callable[[V], int] = _one) -> None:
        self.max_cost = max_cost
        self._cost = cost
        self._entries: _CountingLRU = _CountingLRU(maxsize=max_cost, getsizeof=cost)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None; counted as a hit or a miss."""
        with self._lock:
            try:
                value = self._entries[key]
            except KeyError:
                self.misses += 1
                return None
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` unless it alone is over the bound; evicts the least recently used."""
        if self._cost(value) > self.max_cost:
            return
        with self._lock:
            if key in self._entries:
                self._entries[key]  # touch: most recently used, the value is the same
                return
            self._entries[key] = value

    def replace(self, key: K, value: V) -> None:
        """Keep ``value`` for ``key`` even when an older value is held (a hint that changes)."""
        if self._cost(value) > self.max_cost:
            self.discard(key)
            return
        with self._lock:
            self._entries[key] = value

    def discard(self, key: K) -> None:
        """Forget ``key`` (for values whose source was deleted, e.g. a blob removed by GC)."""
        with self._lock:
            self._entries.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The total cost held now."""
        return int(self._entries.currsize)

    @property
    def evictions(self) -> int:
        """Entries dropped to stay under the bound (not those discarded or replaced)."""
        return self._entries.evictions


class ByteCache(LRUCache[str, bytes]):
    """Blob bytes by digest, bounded by their total length."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        super().__init__(max_bytes, cost=len)


class DecodedCache(LRUCache[str, "Image.Image"]):
    """Decoded RGB images by digest, bounded by the bytes of their pixels (width*height*3)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, cost=lambda img: img.width * img.height * 3)


class SingleFlight(Generic[K, V]):
    """Threads asking for one key at once share the first one's call of ``fn``."""

    def __init__(self) -> None:
        self._inflight: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def run(self, key: K, fn: Callable[[], V]) -> V:
        with self._lock:
            pending = self._inflight.get(key)
            if pending is None:
                future: Future[V] = Future()
                self._inflight[key] = future
        if pending is not None:
            return pending.result()
        try:
            value = fn()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(value)
            return value
        finally:
            with self._lock:
                del self._inflight[key]


class AsyncSingleFlight(Generic[K, V]):
    """Tasks of one event loop asking for one key at once share the first one's ``await fn()``.

    A waiter that is cancelled does not cancel the shared call (it is shielded); the caller that
    started it owns it, as a plain ``await`` would.
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await fn()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[key]
