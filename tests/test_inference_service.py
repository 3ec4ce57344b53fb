"""The inference service without a running engine: its counters, and an engine that cannot start.

The metrics test uses the real store process, the real async store client and the real image
fetcher (no vLLM: the counts are the client's and the fetcher's). The start-up test runs the
real ``mmstore-inference serve`` on a truncated copy of the tiny checkpoint.
"""

from __future__ import annotations

from mmstore_client import AsyncStoreClient, ByteCache, StoreClient, decode
from mmstore_client.descriptor import Descriptor
from mmstore_inference.fetch import DecodedCache, ImageFetcher
from mmstore_inference.metrics import InferenceMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import image_bytes

COUNTS = [
    "mmstore_inference_store_fetches",
    "mmstore_inference_fetched_bytes",
    "mmstore_inference_byte_cache_hits",
    "mmstore_inference_byte_cache_misses",
    "mmstore_inference_decoded_cache_hits",
    "mmstore_inference_decodes",
]


def _samples(registry) -> dict[str, tuple[str, float]]:
    """name -> (type, value) of each unlabelled sample, as a Prometheus server parses them."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = (family.type, sample.value)
    return out


def _descriptor(digest: str, data: bytes) -> Descriptor:
    header = decode.probe(data)
    return Descriptor(
        digest=digest,
        mime="image/png",
        width=header.width,
        height=header.height,
        family="qwen2_vl",
        layout={},
        fingerprint="0" * 16,
        grid=(1, 2, 2),
        num_tokens=1,
    )


async def test_fetch_and_cache_counts_are_counters(store):
    data = image_bytes(48, 32, seed=901)
    with StoreClient(store.url) as sync:
        digest = sync.put(data, "inference-metrics").digest
    async with AsyncStoreClient(store.url, cache=ByteCache(1 << 20)) as client:
        fetcher = ImageFetcher(client, DecodedCache(1 << 20))
        metrics = InferenceMetrics(fetcher)
        before = _samples(metrics.registry)
        for name in COUNTS:  # counters (rate() works on them), named with _total
            assert before[f"{name}_total"] == ("counter", 0.0), name
            assert name not in before
        desc = _descriptor(digest, data)
        await fetcher.images([desc])  # fetched, decoded
        await fetcher.images([desc])  # the decoded cache
        assert await client.get(digest) == data  # the byte cache
        after = {k: v for k, (_, v) in _samples(metrics.registry).items()}
    assert after["mmstore_inference_store_fetches_total"] == 1
    assert after["mmstore_inference_fetched_bytes_total"] == len(data)
    assert after["mmstore_inference_decodes_total"] == 1
    assert after["mmstore_inference_decoded_cache_hits_total"] == 1
    assert after["mmstore_inference_byte_cache_hits_total"] == 1
