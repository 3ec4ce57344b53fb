"""Group commit: concurrent updates of one key, applied together by whichever caller came first.

A bucket's run counter is one object updated by compare-and-swap; sixteen uploads into one run
on one replica would otherwise race each other for it (each conflict costs two more requests and a
backoff: seconds at the tail). Here the first caller for a key becomes the flusher: it applies the
sum of every delta that arrived meanwhile in one update, and again for those that arrive while it
writes, until none is left; every caller returns once an update that includes its delta is
written (or raises that update's error). So callers still return after their count is stored,
and the replicas contend with each other, not every request with every other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Batch:
    deltas: list[tuple[int, int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GroupCommit:
    """``add(key, count, size)`` -> ``apply(key, total_count, total_size)``, batched per key."""

    def __init__(self, apply: Callable[[str, int, int], None]) -> None:
        self._apply = apply
        self._lock = threading.Lock()
        self._waiting: dict[str, _Batch] = {}  # key -> the batch the next update will carry
        self._flushing: set[str] = set()

    def add(self, key: str, count: int, size: int) -> None:
        with self._lock:
            batch = self._waiting.setdefault(key, _Batch())
            batch.deltas.append((count, size))
            lead = key not in self._flushing
            if lead:
                self._flushing.add(key)
        if lead:
            self._flush(key)
        batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _flush(self, key: str) -> None:
        while True:
            with self._lock:
                batch = self._waiting.pop(key, None)
                if batch is None:
                    self._flushing.discard(key)
                    return
            try:
                self._apply(key, sum(c for c, _ in batch.deltas), sum(s for _, s in batch.deltas))
            except BaseException as exc:  # every caller of the batch gets it
                batch.error = exc
            batch.done.set()
