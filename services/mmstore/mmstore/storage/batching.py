"""Group commit: concurrent updates of one key, applied together.

A bucket's run counter is one object updated by compare-and-swap; sixteen uploads into one run
on one replica would otherwise race each other for it (each conflict costs two more requests and a
backoff: seconds at the tail). Here, per key, one update is being written while the deltas that
arrive meanwhile collect in the next batch; when the write ends, one caller of that batch writes
the batch's sum in one update. Every caller returns once an update carrying its delta is written
(or raises that update's error), and writes at most its own batch, so none waits on arrivals after
it. The replicas then contend with each other, not every request with every other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Batch:
    deltas: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    """``add(key, count, size)`` -> ``apply(key, total_count, total_size)``, batched per key.

    Per key, one batch is being written and one is filling; when the write ends, one caller of
    the filled batch writes it (each caller writes at most its own batch: none waits on others'
    later arrivals).
    """

    def __init__(self, apply: Callable[[str, int, int], None]) -> None:
        self._apply = apply
        self._cond = threading.Condition(threading.Lock())
        self._filling: dict[str, _Batch] = {}
        self._writing: set[str] = set()

    def add(self, key: str, count: int, size: int) -> None:
        with self._cond:
            batch = self._filling.setdefault(key, _Batch())
            batch.deltas.append((count, size))
            while not batch.done:
                if key in self._writing:
                    self._cond.wait()
                    continue
                # nothing being written for this key: write the filling batch, this caller's own
                self._writing.add(key)
                del self._filling[key]
                self._cond.release()
                try:
                    self._apply(key, sum(c for c, _ in batch.deltas), sum(s for _, s in batch.deltas))
                except BaseException as exc:  # every caller of the batch gets it
                    batch.error = exc
                finally:
                    self._cond.acquire()
                    batch.done = True
                    self._writing.discard(key)
                    self._cond.notify_all()
        if batch.error is not None:
            raise batch.error
