"""How the loop reads the services' counters: by the names they export, a series selected by its
labels and summed over the rest. The text is a real exposition (prometheus_client's, as the
services write it), made here from the exported names rather than by starting the services (the
store and inference tests read their live ``/metrics`` through these same selections)."""

from __future__ import annotations

from mmstore_inference import metrics as im
from mmstore_inference.errors import PlaceholderMismatch
from mmstore_rollout.service_metrics import (
    INFERENCE_COUNTERS,
    REPLICA_COUNTERS,
    VLLM_PREFIX_CACHE_HITS,
    VLLM_PREFIX_CACHE_QUERIES,
    Series,
    read_counters,
    replica_report,
)
from prometheus_client import CollectorRegistry, Counter, generate_latest


def _exposition(requests: dict[str, int], prefix_hits: dict[str, int], prefix_queries: int) -> str:
    """An inference replica's /metrics: our requests by outcome, vLLM's prefix cache per engine."""
    r = CollectorRegistry()
    by_code = Counter(im.REQUESTS, "requests", ["code"], registry=r)
    for code, n in requests.items():
        by_code.labels(code).inc(n)
    hits = Counter(VLLM_PREFIX_CACHE_HITS, "tokens", ["engine", "model_name"], registry=r)
    for engine, n in prefix_hits.items():
        hits.labels(engine, "tiny").inc(n)
    Counter(VLLM_PREFIX_CACHE_QUERIES, "tokens", ["engine", "model_name"], registry=r).labels(
        "0", "tiny"
    ).inc(prefix_queries)
    return generate_latest(r).decode()


def test_a_series_is_selected_by_its_labels_and_summed_over_the_others():
    text = _exposition({"ok": 5, PlaceholderMismatch.code: 2, "x": 1}, {"0": 30, "1": 12}, 100)
    got = read_counters(
        text,
        {
            "all": Series(im.REQUESTS),
            "ok": Series(im.REQUESTS, {"code": "ok"}),
            "engine 1": Series(VLLM_PREFIX_CACHE_HITS, {"engine": "1"}),
            "prefix hits": Series(VLLM_PREFIX_CACHE_HITS),
            "absent": Series(im.STORE_FETCHES),
        },
    )
    assert got == {"all": 8, "ok": 5, "engine 1": 12, "prefix hits": 42, "absent": 0}
    assert read_counters(text, INFERENCE_COUNTERS)["placeholder_mismatch_errors"] == 2


def test_a_replica_report_is_the_change_between_two_scrapes():
    before = read_counters(_exposition({"ok": 5}, {"0": 30}, 100), REPLICA_COUNTERS)
    after = read_counters(_exposition({"ok": 9, "missing_blob": 1}, {"0": 80}, 200), REPLICA_COUNTERS)
    report = replica_report("replica-1", "http://r1", before, after)
    assert report["alive"] and report["requests"] == 5 and report["errors"] == 1
    assert report["prefix_cache_hit_tokens"] == 50 and report["prefix_cache_hit_ratio"] == 0.5
    assert replica_report("replica-2", "http://r2", before, None) == {
        "name": "replica-2",
        "url": "http://r2",
        "alive": False,
    }
