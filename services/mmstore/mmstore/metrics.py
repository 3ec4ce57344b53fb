"""Prometheus metrics of the store (per process; run one scrape target per worker).

The counters other components scrape (rollout's smoke run) are named by the constants below, the
sample names as scraped (``..._total``; prometheus_client takes a counter's name with or without
the suffix): they import the names rather than copy the strings. This module imports only
prometheus_client, so importing it costs nothing of the server.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

BYTES_IN = "mmstore_bytes_in_total"
BYTES_OUT = "mmstore_bytes_out_total"
BLOBS_CREATED = "mmstore_blobs_created_total"
BLOBS_DEDUPLICATED = "mmstore_blobs_deduplicated_total"


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
        self.bytes_in = Counter(BYTES_IN, "blob bytes received", registry=self.registry)
        self.bytes_out = Counter(BYTES_OUT, "blob bytes served", registry=self.registry)
        self.blobs_created = Counter(BLOBS_CREATED, "new blobs stored", registry=self.registry)
        self.blobs_deduplicated = Counter(
            BLOBS_DEDUPLICATED, "uploads of bytes already stored", registry=self.registry
        )
        self.errors = Counter("mmstore_errors", "error responses by code", ["code"], registry=self.registry)
        self.pixels_kept = Counter(
            "mmstore_pixels_kept", "uploads whose decoded pixels were kept to serve", registry=self.registry
        )
        self.pixels_served = Counter(
            "mmstore_pixels_served", "decoded pixels served instead of a decode", registry=self.registry
        )

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)


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
