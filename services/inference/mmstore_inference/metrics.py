"""Prometheus metrics of the inference service.

Counts that the store client and the image fetcher keep themselves (fetches, bytes, cache hits,
decodes) only ever grow, so they are exported as counters (``_total``, read at scrape time by
:class:`mmstore_client.prometheus.Counts`): ``rate()`` and ``increase()`` work on them and
survive a restart's reset.

The counters rollout scrapes (its smoke run and per-replica stats) are named by the constants
below, the sample names as scraped (``..._total``; prometheus_client takes a counter's name with
or without the suffix). This module imports only prometheus_client and the contract, never vLLM,
so importing the names is cheap.
"""

from __future__ import annotations

from mmstore_client.prometheus import Counts
from prometheus_client import CollectorRegistry, Counter, Histogram

REQUESTS = "mmstore_inference_requests_total"  # label ``code``: ok, or the error's code
STORE_FETCHES = "mmstore_inference_store_fetches_total"
FETCHED_BYTES = "mmstore_inference_fetched_bytes_total"
BYTE_CACHE_HITS = "mmstore_inference_byte_cache_hits_total"
BYTE_CACHE_MISSES = "mmstore_inference_byte_cache_misses_total"
DECODED_CACHE_HITS = "mmstore_inference_decoded_cache_hits_total"
DECODES = "mmstore_inference_decodes_total"
STORE_PIXELS = "mmstore_inference_store_pixels_total"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class InferenceMetrics:
    def __init__(self, fetcher) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(REQUESTS, "generate requests by outcome", ["code"], registry=r)
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
        r.register(
            Counts(
                {
                    FETCHED_BYTES: (
                        "bytes read from the store (images or their pixels)",
                        lambda: store.fetched_bytes,
                    ),
                    STORE_FETCHES: ("image reads sent to the store (bytes or pixels)", lambda: store.fetches),
                    BYTE_CACHE_HITS: ("byte cache hits", lambda: store.cache.hits),
                    BYTE_CACHE_MISSES: ("byte cache misses", lambda: store.cache.misses),
                    DECODED_CACHE_HITS: ("decoded-image cache hits", lambda: fetcher.decoded_hits),
                    DECODES: ("images decoded", lambda: fetcher.decodes),
                    STORE_PIXELS: (
                        "new images whose decoded pixels the store served (not decoded here)",
                        lambda: fetcher.pixels_from_store,
                    ),
                }
            )
        )
