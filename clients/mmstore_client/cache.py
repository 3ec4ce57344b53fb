"""Bounded in-memory caches keyed by digest: file bytes (:class:`ByteCache`) and decoded images
(:class:`DecodedCache`); and :class:`SingleFlight`, one running computation per key.

Content-addressed entries can never be stale, so no invalidation exists: only eviction of the
least recently used entries once ``max_bytes`` is exceeded. Thread-safe; shared by the sync and
async clients (and by services and the vLLM plugin, which hold one per process).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from PIL import Image

V = TypeVar("V")


class ByteCache:
    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._entries.get(digest)
            if data is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return
            self._entries[digest] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size


class DecodedCache:
    """digest -> RGB image, bounded by width*height*3 bytes, least recently used evicted."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Image.Image] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> Image.Image | None:
        with self._lock:
            img = self._entries.get(digest)
            if img is not None:
                self._entries.move_to_end(digest)
            return img

    def put(self, digest: str, img: Image.Image) -> None:
        cost = img.width * img.height * 3
        if cost > self.max_bytes:
            return
        with self._lock:
            if digest in self._entries:
                return
            self._entries[digest] = img
            self._size += cost
            while self._size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._size -= old.width * old.height * 3


class SingleFlight(Generic[V]):
    """One running computation per key among concurrent asyncio tasks of one event loop.

    The first caller of :meth:`run` for a key runs ``compute``; callers arriving while it runs
    await its result or its exception instead of computing again. Nothing is remembered once it
    ends: keeping results is the caller's cache's job.
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[V]] = {}

    async def run(self, key: str, compute: Callable[[], Awaitable[V]]) -> V:
        pending = self._running.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            value = await compute()
            future.set_result(value)
            return value
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: followers re-raise it, no "never retrieved" warning
            raise
        finally:
            del self._running[key]
