"""What the loop counts, for its summary: the invariants and the bytes it did not send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmstore_client.descriptor import Descriptor
from mmstore_client.layouts import Layout
from mmstore_client.layouts.base import Placement
from mmstore_inference import metrics as im

FLOAT32_BYTES = 4


@dataclass
class LoopStats:
    rollouts: int = 0
    turns: int = 0
    generate_requests: int = 0
    images: int = 0  # image parts offloaded (a picture re-sent in a later turn counts again)
    digests: set[str] = field(default_factory=set)
    bytes_refs: int = 0  # what crossed to inference for images: descriptors (refs inside)
    bytes_base64: int = 0  # the same requests carrying every image as a base64 data URI
    bytes_pixel_values: int = 0  # ... or as float32 pixel_values
    placeholder_mismatches: int = 0
    processed_payloads: int = 0
    missing_images: int = 0
    context_stops: int = 0  # trajectories ended early: the next turn would not fit max_model_len
    inference_retries: int = 0  # requests the inference client re-sent (transport error, 503)
    inference_errors: int = 0  # generate requests that failed after the client's retries
    failures: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def count_request(
        self, descriptors: list[Descriptor], image_bytes: dict[str, int], layout: Layout
    ) -> None:
        """One generate request: what its images cost as refs, as base64, as the float32
        ``pixel_values`` the layout's processor would make of them."""
        self.generate_requests += 1
        for d in descriptors:
            self.bytes_refs += len(d.model_dump_json())
            self.bytes_base64 += len("data:image/png;base64,") + 4 * math.ceil(image_bytes[d.digest] / 3)
            placement = Placement(d.grid, d.num_tokens)
            self.bytes_pixel_values += layout.pixel_values_elements(placement) * FLOAT32_BYTES


# -- per replica: its own /metrics (ours and vLLM's), as deltas over a phase ----------------------

# vLLM's own counters (its names, not ours): prefix-cache tokens and multimodal processor cache
VLLM_PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"  # tokens
VLLM_PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_MM_CACHE_HITS = "vllm:mm_cache_hits_total"
VLLM_MM_CACHE_QUERIES = "vllm:mm_cache_queries_total"

REPLICA_METRICS = {
    "requests": im.REQUESTS,
    "ok": f'{im.REQUESTS}{{code="ok"}}',
    "store_fetches": im.STORE_FETCHES,
    "bytes_fetched": im.FETCHED_BYTES,
    "byte_cache_hits": im.BYTE_CACHE_HITS,
    "byte_cache_misses": im.BYTE_CACHE_MISSES,
    "decoded_cache_hits": im.DECODED_CACHE_HITS,
    "prefix_cache_hits": VLLM_PREFIX_CACHE_HITS,
    "prefix_cache_queries": VLLM_PREFIX_CACHE_QUERIES,
    "mm_cache_hits": VLLM_MM_CACHE_HITS,
    "mm_cache_queries": VLLM_MM_CACHE_QUERIES,
}


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus sample over its label sets (``name`` may include labels)."""
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith(name)
            and not line.startswith("#")
            and line[len(name) : len(name) + 1] in (" ", "{")
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape_replica(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The replica's counters, or None when it does not answer (down)."""
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return {key: metric(response.text, name) for key, name in REPLICA_METRICS.items()}


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
