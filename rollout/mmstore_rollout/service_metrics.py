"""The services' counters as the loop reads them from their ``/metrics``: per replica (deltas over
the rollouts) and for the whole run (the summary's ``store`` and ``inference``).

Every name comes from where it is exported: the store's and the inference service's ``metrics``
modules (which import only prometheus_client, so importing the names is cheap), the error's
``code`` from the inference error tree. vLLM's own counters are named once here: vLLM writes them
inline (``vllm/v1/metrics/loggers.py``) and exports no constant. The text is read with
prometheus_client's parser, so a series is a name plus the labels it must carry, never a string
prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from mmstore import metrics as store_metrics
from mmstore_inference import metrics as inference_metrics
from mmstore_inference.errors import PlaceholderMismatch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# vLLM's counters (its names, as scraped): prefix-cache tokens and the multimodal processor cache
VLLM_PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"  # tokens
VLLM_PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_MM_CACHE_HITS = "vllm:mm_cache_hits_total"
VLLM_MM_CACHE_QUERIES = "vllm:mm_cache_queries_total"


@dataclass(frozen=True)
class Series:
    """Samples named ``name`` that carry ``labels`` (summed over their other labels)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def matches(self, sample: Sample) -> bool:
        return sample.name == self.name and self.labels.items() <= sample.labels.items()


STORE_COUNTERS = {
    "blobs_created": Series(store_metrics.BLOBS_CREATED),
    "uploads_deduplicated": Series(store_metrics.BLOBS_DEDUPLICATED),
    "bytes_in": Series(store_metrics.BYTES_IN),
    "bytes_out": Series(store_metrics.BYTES_OUT),
}
INFERENCE_COUNTERS = {
    "store_fetches": Series(inference_metrics.STORE_FETCHES),
    "byte_cache_hits": Series(inference_metrics.BYTE_CACHE_HITS),
    "decoded_cache_hits": Series(inference_metrics.DECODED_CACHE_HITS),
    "decodes": Series(inference_metrics.DECODES),
    "store_pixels": Series(inference_metrics.STORE_PIXELS),
    "prefix_cache_hit_tokens": Series(VLLM_PREFIX_CACHE_HITS),
    "mm_cache_hits": Series(VLLM_MM_CACHE_HITS),
    "placeholder_mismatch_errors": Series(inference_metrics.REQUESTS, {"code": PlaceholderMismatch.code}),
}
REPLICA_COUNTERS = {
    "requests": Series(inference_metrics.REQUESTS),
    "ok": Series(inference_metrics.REQUESTS, {"code": "ok"}),  # the outcome label: ok, or the error's code
    "store_fetches": Series(inference_metrics.STORE_FETCHES),
    "bytes_fetched": Series(inference_metrics.FETCHED_BYTES),
    "byte_cache_hits": Series(inference_metrics.BYTE_CACHE_HITS),
    "byte_cache_misses": Series(inference_metrics.BYTE_CACHE_MISSES),
    "decoded_cache_hits": Series(inference_metrics.DECODED_CACHE_HITS),
    "prefix_cache_hits": Series(VLLM_PREFIX_CACHE_HITS),
    "prefix_cache_queries": Series(VLLM_PREFIX_CACHE_QUERIES),
    "mm_cache_hits": Series(VLLM_MM_CACHE_HITS),
    "mm_cache_queries": Series(VLLM_MM_CACHE_QUERIES),
}


def read_counters(text: str, series: Mapping[str, Series]) -> dict[str, float]:
    """``{key: value}`` of each of ``series`` in the Prometheus text (0 where none is exported)."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {key: sum((s.value for s in samples if want.matches(s)), 0.0) for key, want in series.items()}


def service_counters(store_url: str, inference_urls: list[str]) -> tuple[dict, dict]:
    """The store's counters, and the inference counters summed over the replicas that answer."""
    store = read_counters(httpx.get(f"{store_url}/metrics", timeout=10).text, STORE_COUNTERS)
    replicas = []
    for url in inference_urls:
        try:
            replicas.append(read_counters(httpx.get(f"{url}/metrics", timeout=10).text, INFERENCE_COUNTERS))
        except httpx.HTTPError:
            if len(inference_urls) == 1:
                raise
    return store, {key: sum(r[key] for r in replicas) for key in INFERENCE_COUNTERS}


# -- per replica: its own /metrics (ours and vLLM's), as deltas over a phase ----------------------


def scrape_replica(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The replica's counters, or None when it does not answer (down)."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return read_counters(response.text, REPLICA_COUNTERS)


def _ratio(hits: float, total: float) -> float | None:
    return round(hits / total, 4) if total > 0 else None


def replica_report(name: str, url: str, before: dict | None, after: dict | None) -> dict:
    """One entry of the summary's ``replicas`` list: what this replica did between two scrapes.

    ``cache_hit_ratio``: images of its requests served from our caches (decoded images, then
    bytes) rather than fetched from the store; ``byte_cache_hit_ratio``: the byte cache alone
    (behind the decoded cache, so it sees only what that one missed); ``prefix_cache_hit_ratio``:
    prompt tokens vLLM found in its prefix cache; ``mm_cache_hit_ratio``: vLLM's processor cache.
    """
    report: dict = {"name": name, "url": url, "alive": after is not None}
    if after is None:
        return report
    before = before or dict.fromkeys(after, 0.0)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    ours = d["decoded_cache_hits"] + d["byte_cache_hits"]
    report.update(
        requests=int(d["requests"]),
        errors=int(d["requests"] - d["ok"]),
        store_fetches=int(d["store_fetches"]),
        bytes_fetched=int(d["bytes_fetched"]),
        cache_hits=int(ours),
        cache_lookups=int(ours + d["byte_cache_misses"]),
        cache_hit_ratio=_ratio(ours, ours + d["byte_cache_misses"]),
        byte_cache_hit_ratio=_ratio(d["byte_cache_hits"], d["byte_cache_hits"] + d["byte_cache_misses"]),
        prefix_cache_hit_ratio=_ratio(d["prefix_cache_hits"], d["prefix_cache_queries"]),
        mm_cache_hit_ratio=_ratio(d["mm_cache_hits"], d["mm_cache_queries"]),
        prefix_cache_hit_tokens=int(d["prefix_cache_hits"]),
        prefix_cache_query_tokens=int(d["prefix_cache_queries"]),
    )
    return report


def totals(reports: list[dict]) -> dict:
    """Sums over the replicas that answered, with the ratios recomputed from the sums."""
    alive = [r for r in reports if r.get("alive")]
    keys = (
        "requests",
        "errors",
        "store_fetches",
        "bytes_fetched",
        "cache_hits",
        "cache_lookups",
        "prefix_cache_hit_tokens",
        "prefix_cache_query_tokens",
    )
    out: dict = {k: sum(r[k] for r in alive) for k in keys}
    out["cache_hit_ratio"] = _ratio(out["cache_hits"], out["cache_lookups"])
    out["prefix_cache_hit_ratio"] = _ratio(out["prefix_cache_hit_tokens"], out["prefix_cache_query_tokens"])
    return out
