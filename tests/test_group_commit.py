"""The S3 backend's group commit of run counts: every delta applied once, callers return after."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from mmstore.storage.batching import GroupCommit


def test_concurrent_deltas_are_applied_once_each_in_few_updates():
    applied: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def apply(key: str, count: int, size: int) -> None:
        time.sleep(0.02)  # a conditional PUT's round trip
        with lock:
            applied.append((key, count, size))

    commit = GroupCommit(apply)

    def upload(i: int) -> int:
        commit.add(f"run-{i % 2}", 1, i)
        with lock:  # returned only once an update carrying this delta was written
            return sum(c for k, c, _ in applied if k == f"run-{i % 2}")

    with ThreadPoolExecutor(32) as pool:
        seen = list(pool.map(upload, range(64)))
    for key in ("run-0", "run-1"):
        rows = [(c, s) for k, c, s in applied if k == key]
        assert sum(c for c, _ in rows) == 32  # every delta, once
        assert sum(s for _, s in rows) == sum(i for i in range(64) if f"run-{i % 2}" == key)
        assert len(rows) < 16  # batched: far fewer updates than uploads
    assert all(n >= 1 for n in seen)


def test_an_update_error_reaches_every_caller_of_its_batch_and_later_batches_go_on():
    calls = []
    gate = threading.Event()

    def apply(key: str, count: int, size: int) -> None:
        calls.append(count)
        if len(calls) == 1:
            gate.wait(5)  # hold the first update while others queue behind it
            raise RuntimeError("conflicts, give up")

    commit = GroupCommit(apply)
    errors = []

    def add() -> None:
        try:
            commit.add("run", 1, 1)
        except RuntimeError as exc:
            errors.append(exc)

    first = threading.Thread(target=add)
    first.start()
    while not calls:
        time.sleep(0.001)
    queued = [threading.Thread(target=add) for _ in range(5)]
    for t in queued:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in [first, *queued]:
        t.join(5)
    assert len(errors) == 1  # the first batch's caller
    assert calls == [1, 5]  # the five queued meanwhile: one update, applied


def test_no_caller_waits_on_more_than_the_write_in_flight_and_its_own():
    """Under a steady stream of arrivals, each call sees at most 2 updates complete while it waits
    (the one in flight when it came, then its batch's): nobody keeps writing for later callers."""
    completed = 0
    lock = threading.Lock()

    def apply(key: str, count: int, size: int) -> None:
        nonlocal completed
        time.sleep(0.005)
        with lock:
            completed += 1

    commit = GroupCommit(apply)

    def caller(_: int) -> int:
        worst = 0
        for _ in range(25):
            with lock:
                before = completed
            commit.add("run", 1, 1)
            with lock:
                worst = max(worst, completed - before)
        return worst

    with ThreadPoolExecutor(8) as pool:
        assert max(pool.map(caller, range(8))) <= 2
