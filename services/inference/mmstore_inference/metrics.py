"""Prometheus metrics of the inference service.

Counts that the store client and the image fetcher keep themselves (fetches, bytes, cache hits,
decodes) only ever grow, so they are exported as counters (``_total``, read at scrape time by
:class:`_Counts`): ``rate()`` and ``increase()`` work on them and survive a restart's reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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
        r.register(
            _Counts(
                {
                    "mmstore_inference_fetched_bytes": (
                        "image bytes fetched from the store",
                        lambda: store.fetched_bytes,
                    ),
                    "mmstore_inference_store_fetches": ("blob GETs sent to the store", lambda: store.fetches),
                    "mmstore_inference_byte_cache_hits": ("byte cache hits", lambda: store.cache.hits),
                    "mmstore_inference_byte_cache_misses": ("byte cache misses", lambda: store.cache.misses),
                    "mmstore_inference_decoded_cache_hits": (
                        "decoded-image cache hits",
                        lambda: fetcher.decoded_hits,
                    ),
                    "mmstore_inference_decodes": ("images decoded", lambda: fetcher.decodes),
                }
            )
        )


class _Counts(Collector):
    """Monotonic counts kept elsewhere, exported as counters (``<name>_total``) when scraped."""

    def __init__(self, counts: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, read) in self.counts.items():
            yield CounterMetricFamily(name, doc, value=read())
