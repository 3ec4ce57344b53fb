"""Counts kept by plain objects, exported to Prometheus as counters when scraped.

The caches, clients and fetchers count with plain ints (``hits``, ``fetches``, ``decodes``): they
must work without Prometheus, in a trainer or a notebook. A service that exports them registers a
:class:`Counts` on its registry; each scrape reads the ints and exports them as counters
(``<name>_total``), so ``rate()`` and ``increase()`` work on them, as they do not on a gauge, and
survive a restart's reset.

It lives here, in the contract, because both services (the store and inference) export such
counts and neither may import the other; it needs the ``metrics`` extra
(``mmstore-client[metrics]``: prometheus-client), which the services install and clients do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Counts(Collector):
    """``{name: (documentation, read)}``: each ``read()`` (a count that only grows) as a counter."""

    def __init__(self, counts: Mapping[str, tuple[str, Callable[[], float]]]) -> None:
        self.counts = dict(counts)

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (documentation, read) in self.counts.items():
            yield CounterMetricFamily(name, documentation, value=read())
