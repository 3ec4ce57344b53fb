"""The loader: materializes samples ahead of the training step in background threads.

Fetching from the store and running the image processor are I/O and C code (httpx, PIL and
torch release the GIL), so threads overlap them with the step without copying tensors between
processes. The loader keeps sample order (results come out in the order the samples went in,
whatever order the workers finish in), and at most ``prefetch`` samples are materialized or in
flight ahead of the consumer: the queue is bounded, so memory is too.

``workers=0`` materializes inline in the consumer's thread: the sequential baseline.

The consumer's time blocked in :meth:`Loader.take` is the step's *loader wait*: the figure that
says whether the store and the processor keep up with training.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


@dataclass
class LoaderStats:
    """The consumer's view: results taken and the time spent blocked waiting for them."""

    taken: int = 0
    wait_s: float = 0.0


class Loader(Generic[T, R]):
    """Iterate ``fn(item)`` for ``items`` in order, computed ahead by ``workers`` threads.

    ``on_done(result)`` runs in the worker thread as each result completes (progress bars).
    Errors raised by ``fn`` re-raise in the consumer at the item that failed. Use as a context
    manager, or call :meth:`close`, to stop the workers early.
    """

    def __init__(
        self,
        items: Iterable[T],
        fn: Callable[[T], R],
        *,
        workers: int = 2,
        prefetch: int = 8,
        on_done: Callable[[R], None] | None = None,
    ) -> None:
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}")
        self._items = iter(items)
        self._fn = fn
        self._on_done = on_done
        self.workers = workers
        self.prefetch = prefetch
        self.stats = LoaderStats()
        self._closed = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        # The semaphore is the bound: results computed or in flight but not yet taken.
        self._slots = threading.Semaphore(prefetch)
        self._queue: queue.Queue[Future[R] | object] = queue.Queue()
        self._producer: threading.Thread | None = None
        if workers > 0:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mmstore-loader")
            self._producer = threading.Thread(target=self._produce, name="mmstore-loader-feed", daemon=True)
            self._producer.start()

    # -- producer ------------------------------------------------------------------------------
    def _run(self, item: T) -> R:
        result = self._fn(item)
        if self._on_done is not None:
            self._on_done(result)
        return result

    def _produce(self) -> None:
        assert self._pool is not None
        try:
            for item in self._items:
                while not self._slots.acquire(timeout=0.1):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                self._queue.put(self._pool.submit(self._run, item))
        except BaseException as exc:  # the item iterator itself failed: hand it to the consumer
            failed: Future[R] = Future()
            failed.set_exception(exc)
            self._queue.put(failed)
        self._queue.put(_END)

    # -- consumer ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[R]:
        return self

    def __next__(self) -> R:
        t0 = time.perf_counter()
        try:
            if self._pool is None:
                result = self._run(next(self._items))
            else:
                entry = self._queue.get()
                if entry is _END:
                    self._queue.put(_END)  # stay exhausted for later calls
                    raise StopIteration
                assert isinstance(entry, Future)
                try:
                    result = entry.result()
                finally:
                    self._slots.release()
            self.stats.taken += 1
            return result
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def take(self, n: int) -> tuple[list[R], float]:
        """The next ``n`` results (fewer at the end) and the seconds spent waiting for them."""
        before = self.stats.wait_s
        out = []
        for result in self:
            out.append(result)
            if len(out) == n:
                break
        return out, self.stats.wait_s - before

    def close(self) -> None:
        """Stop feeding work, drop what is queued and wait for the workers."""
        self._closed.set()
        if self._pool is not None:
            while True:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(entry, Future):
                    entry.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._producer is not None:
            self._producer.join(timeout=5)

    def __enter__(self) -> Loader[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
