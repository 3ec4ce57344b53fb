"""Where the store decodes images: its own bounded threads, under a pixel budget.

Every upload is decoded once in full (the storage's ``check``) and the viewer decodes blobs for
thumbnails. A decode can take seconds of CPU (a 100-megapixel PNG; a JPEG of up to
``max_jpeg_scans`` scans) and hundreds of MB, so decodes never run on the threads that serve
reads or health, and never all at once:

* threads: ``decode_threads`` (default: the cores), ``decode_nice`` levels below the server
  (Linux sets it per thread), so the event loop and the read path preempt them; the threads that
  wait for a decode (an upload's, while its blob is written or its bucket requests run) come from
  their own limiter (:func:`run_upload`), never from the pool that reads and ``/readyz`` use.
* memory: a decode holds its image's width x height of the ``decode_pixel_budget`` while it runs
  (PIL holds 1-4 bytes per pixel, more for 16-bit); decodes that do not fit wait, first come
  first served. An image larger than the whole budget runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import anyio

T = TypeVar("T")

# Uploads waiting for their decode or their storage, in threads of their own (anyio's default
# pool, 40 threads, stays for reads). Waiting threads cost little; the decodes are bounded below.
UPLOAD_THREADS = 64


class PixelBudget:
    """A semaphore weighted by pixels, first come first served (a big image is not starved)."""

    def __init__(self, pixels: int) -> None:
        self.capacity = pixels
        self.in_use = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(pixels, self.capacity)
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            self._changed.wait_for(lambda: self._queue[0] is ticket and self.in_use + need <= self.capacity)
            self._queue.popleft()
            self.in_use += need
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= need
                self._changed.notify_all()


class Decoder:
    """The store's decode threads and pixel budget (one per server process)."""

    def __init__(self, *, threads: int | None, pixel_budget: int, nice: int) -> None:
        self.budget = PixelBudget(pixel_budget)
        self._pool = ThreadPoolExecutor(
            threads or os.cpu_count() or 2,
            thread_name_prefix="mmstore-decode",
            initializer=_lower_priority,
            initargs=(nice,),
        )
        self._uploads: anyio.CapacityLimiter | None = None

    def submit(self, decode: Callable[[], T], pixels: int) -> Future[T]:
        """Run ``decode`` of an image of ``pixels`` pixels on a decode thread, within the budget."""
        return self._pool.submit(self._within_budget, decode, pixels)

    async def run(self, decode: Callable[[], T], pixels: int) -> T:
        return await asyncio.wrap_future(self.submit(decode, pixels))

    async def run_upload(self, ingest: Callable[[], T]) -> T:
        """Run an upload's blocking part (which waits for its decode) off the readers' threads."""
        if self._uploads is None:
            self._uploads = anyio.CapacityLimiter(UPLOAD_THREADS)
        return await anyio.to_thread.run_sync(ingest, limiter=self._uploads)

    def _within_budget(self, decode: Callable[[], T], pixels: int) -> T:
        with self.budget.hold(pixels):
            return decode()


def _lower_priority(nice: int) -> None:
    if nice and sys.platform == "linux":
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):  # a sandbox that forbids it: the server's priority
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
