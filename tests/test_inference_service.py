"""The inference service without a running engine: its counters, and an engine that cannot start.

The metrics test uses the real store process, the real async store client and the real image
fetcher (no vLLM: the counts are the client's and the fetcher's). The start-up tests run the
real ``mmstore-inference serve``: on the tiny checkpoint (``/readyz`` while it loads) and on a
truncated copy of it (exit 1, the file named).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import httpx
from mmstore_client import AsyncStoreClient, ByteCache, StoreClient, decode
from mmstore_client.cache import DecodedCache
from mmstore_client.descriptor import Descriptor
from mmstore_inference.fetch import ImageFetcher
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
    "mmstore_inference_store_pixels",
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
        fetcher = ImageFetcher(client, DecodedCache(1 << 20), store_pixels=False)
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
    # the rollout loop's per-replica report reads these names
    from mmstore_rollout.service_metrics import REPLICA_COUNTERS

    ours = [s.name for s in REPLICA_COUNTERS.values() if s.name.startswith("mmstore_inference_")]
    ours = [name for name in ours if "requests" not in name]
    assert ours and all(name in after for name in ours), set(ours) - after.keys()


async def test_new_pngs_come_as_the_stores_pixels_and_jpegs_are_decoded_here(store):
    """The store kept the PNG's pixels from verifying its upload: the fetcher reads them instead of
    the bytes (no decode), and they are the pixels a decode of the verified bytes gives; a JPEG,
    whose pixels the store does not keep, is fetched and decoded here without asking."""
    png, jpeg = image_bytes(64, 40, seed=902), image_bytes(40, 64, "JPEG", seed=903)
    with StoreClient(store.url) as sync:
        digests = [sync.put(data, "inference-pixels").digest for data in (png, jpeg)]
    async with AsyncStoreClient(store.url, cache=ByteCache(1 << 20)) as client:
        fetcher = ImageFetcher(client, DecodedCache(1 << 20))
        metrics = InferenceMetrics(fetcher)
        descs = [
            _descriptor(digests[0], png),
            _descriptor(digests[1], jpeg).model_copy(update={"mime": "image/jpeg"}),
        ]
        images = await fetcher.images(descs)
        after = {k: v for k, (_, v) in _samples(metrics.registry).items()}
        assert digests[0] not in client.cache and digests[1] in client.cache  # only the JPEG's bytes came
    for img, data, digest in zip(images, (png, jpeg), digests, strict=True):
        rule = decode.decode_rgb(data)
        assert img.tobytes() == rule.tobytes()
        assert fetcher.pixel_digest(digest, img) == decode.pixel_digest(rule)
    assert after["mmstore_inference_store_pixels_total"] == 1
    assert after["mmstore_inference_decodes_total"] == 1
    assert after["mmstore_inference_store_fetches_total"] == 2  # one read each, pixels or bytes
    assert after["mmstore_inference_fetched_bytes_total"] == 64 * 40 * 3 + len(jpeg)


def test_readyz_says_the_engine_is_loading(tiny_qwen2_vl, store, tmp_path):
    from conftest import inference_process

    server = inference_process(tiny_qwen2_vl, store.url, tmp_path)
    try:
        server.start(timeout=300, path="/healthz")  # answers while the engine loads (about a minute here)
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.headers["retry-after"]
        error = ready.json()["error"]
        assert error["code"] == "engine_unavailable" and error["state"] == "starting", error
        assert f"loading {tiny_qwen2_vl}" in error["message"]
    finally:
        server.stop()


def test_an_engine_that_cannot_start_exits_non_zero_with_the_reason(tiny_qwen2_vl, store, tmp_path):
    from conftest import inference_process

    broken = tmp_path / "truncated"
    shutil.copytree(tiny_qwen2_vl, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a copy cut short, as a full disk leaves it
    server = inference_process(broken, store.url, tmp_path)
    try:
        with contextlib.suppress(RuntimeError):  # it may exit before /healthz is first asked
            server.start(timeout=300, path="/healthz")
        deadline = time.monotonic() + 600
        while server.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running with a truncated checkpoint, see {server.log}"
            time.sleep(1)
    finally:
        server.stop()
    assert server.proc.returncode == 1
    log = server.log.read_text(errors="replace")
    assert f"the vLLM engine could not start for {broken}" in log, log[-3000:]
    assert f"{weights} cannot be read" in log.rsplit("could not start", 1)[1]  # the reason names the file
