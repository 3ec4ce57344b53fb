"""Prometheus metrics of the store (per process; run one scrape target per worker)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmstore_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mmstore_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.bytes_in = Counter("mmstore_bytes_in", "blob bytes received", registry=self.registry)
        self.bytes_out = Counter("mmstore_bytes_out", "blob bytes served", registry=self.registry)
        self.blobs_created = Counter("mmstore_blobs_created", "new blobs stored", registry=self.registry)
        self.blobs_deduplicated = Counter(
            "mmstore_blobs_deduplicated", "uploads of bytes already stored", registry=self.registry
        )
        self.errors = Counter("mmstore_errors", "error responses by code", ["code"], registry=self.registry)

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)


class CountOf(Collector):
    """A count that another object keeps (an int it only increments), exported as a counter
    (``<name>_total``): ``rate()`` and ``increase()`` work on it, as they do not on a gauge."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class MetricsMiddleware:
    """Pure ASGI middleware: counts every request by route template and status."""

    def __init__(self, app, metrics: StoreMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or scope.get("mmstore.route", "unmatched")
            self.metrics.observe(route, scope["method"], status, started)
