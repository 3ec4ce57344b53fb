"""Prometheus metrics of the inference service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class InferenceMetrics:
    def __init__(self, fetcher) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmstore_inference_requests", "generate requests by outcome", ["code"], registry=r
        )
        self.fetch_seconds = Histogram(
            "mmstore_inference_fetch_seconds", "image fetch+decode per request", buckets=_LATENCY, registry=r
        )
        self.generate_seconds = Histogram(
            "mmstore_inference_generate_seconds", "vLLM generate per request", buckets=_LATENCY, registry=r
        )
        self.images = Counter("mmstore_inference_images", "images in requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "mmstore_inference_cached_prompt_tokens",
            "prompt tokens served from vLLM's prefix cache",
            registry=r,
        )
        self.prompt_tokens = Counter("mmstore_inference_prompt_tokens", "prompt tokens", registry=r)
        store = fetcher.store
        Gauge(
            "mmstore_inference_bytes_fetched", "image bytes fetched from the store", registry=r
        ).set_function(lambda: store.fetched_bytes)
        Gauge("mmstore_inference_store_fetches", "blob GETs sent to the store", registry=r).set_function(
            lambda: store.fetches
        )
        Gauge("mmstore_inference_byte_cache_hits", "byte cache hits", registry=r).set_function(
            lambda: store.cache.hits
        )
        Gauge("mmstore_inference_byte_cache_misses", "byte cache misses", registry=r).set_function(
            lambda: store.cache.misses
        )
        Gauge("mmstore_inference_decoded_cache_hits", "decoded-image cache hits", registry=r).set_function(
            lambda: fetcher.decoded_hits
        )
        Gauge("mmstore_inference_decodes", "images decoded", registry=r).set_function(lambda: fetcher.decodes)
