"""The inference service: real mmstore + real `mmstore-inference serve` (vLLM CPU, tiny Qwen2-VL)."""

from __future__ import annotations

import base64

import httpx
import pytest
from mmstore_client import StoreClient, compute_digest
from mmstore_client.inference import GenerateRequest, InferenceClient, SamplingOptions
from mmstore_client.offload import offload_messages
from mmstore_client.render import Renderer
from support import FetchingRenderer, image_bytes, noise_png

pytestmark = pytest.mark.slow
RUN = "inference-tests"


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes) -> dict:
    return {
        "role": "user",
        "content": [
            *({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
            {"type": "text", "text": text},
        ],
    }


@pytest.fixture(scope="module")
def client(store, inference, tiny_qwen2_vl):
    store_client = StoreClient(store.url)
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), store_client)
    with InferenceClient(inference.url) as inf:
        yield store_client, renderer, inf
    store_client.close()


def render(client, messages):
    store_client, renderer, _ = client
    return renderer.render(offload_messages(messages, store_client, RUN))


def generate(client, rendered, **sampling) -> httpx.Response:
    body = GenerateRequest(
        prompt_token_ids=rendered.token_ids,
        descriptors=rendered.descriptors,
        sampling=SamplingOptions(**({"max_tokens": 8, "temperature": 0.0} | sampling)),
    )
    return httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=300)


def test_single_and_multi_image_token_exact(client):
    for images in (
        [image_bytes(100, 140, seed=1)],
        [image_bytes(100, 140, seed=2), image_bytes(300, 200, seed=3)],
    ):
        rendered = render(client, [user("What is this?", *images)])
        r = generate(client, rendered)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prompt_token_ids"] == rendered.token_ids
        (sample,) = body["samples"]
        assert len(sample["token_ids"]) == len(sample["logprobs"]) <= 8
        assert sample["finish_reason"] in ("stop", "length")
        timings = body["timings"]  # vLLM's own processing is a part of the service's
        assert 0 < timings["vllm_process_s"] <= timings["process_s"] < timings["total_s"]


def test_greedy_is_deterministic_and_n_samples(client):
    rendered = render(client, [user("Count.", image_bytes(64, 64, seed=4))])
    a, b = generate(client, rendered).json(), generate(client, rendered).json()
    assert a["samples"][0]["token_ids"] == b["samples"][0]["token_ids"]
    r = generate(client, rendered, n=4, temperature=1.0, seed=7).json()
    assert len(r["samples"]) == 4
    assert len({tuple(s["token_ids"]) for s in r["samples"]}) > 1, "4 sampled completions should differ"
    for s in r["samples"]:
        assert all(lp <= 0 for lp in s["logprobs"])


def test_five_turn_conversation_fetches_each_image_once(client, store):
    store_client, renderer, inf = client
    before = httpx.get(f"{inf.url}/metrics").text
    fetches_before = _metric(before, "mmstore_inference_store_fetches_total")
    images = [noise_png(4000, seed=100 + i) for i in range(5)]
    messages = [user("turn 0", images[0])]
    rendered = renderer.render(offload_messages(messages, store_client, RUN))
    cached = []
    for turn in range(5):
        resp = inf.generate(
            GenerateRequest(
                prompt_token_ids=rendered.token_ids,
                descriptors=rendered.descriptors,
                sampling=SamplingOptions(max_tokens=6, temperature=0.0),
            )
        )
        assert resp.prompt_token_ids == rendered.token_ids
        cached.append(resp.usage.cached_prompt_tokens or 0)
        completion = resp.samples[0].token_ids
        after = rendered.extend(completion, assistant=True)
        after.messages.append({"role": "assistant", "content": renderer.tokenizer.decode(completion)})
        if turn < 4:
            # later turns re-send an earlier image next to a new one
            new = offload_messages([user(f"turn {turn + 1}", images[turn + 1], images[0])], store_client, RUN)
            rendered = renderer.bridge(after, new)
    after_metrics = httpx.get(f"{inf.url}/metrics").text
    assert _metric(after_metrics, "mmstore_inference_store_fetches_total") - fetches_before == 5, (
        "one fetch per digest"
    )
    assert max(cached[1:]) >= 128, f"vLLM's prefix cache should serve earlier turns: {cached}"
    assert "vllm:prefix_cache_hits" in after_metrics


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


# -- errors, provoked for real; the service keeps serving after each -----------------------


def _code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def _still_serving(client):
    r = generate(client, render(client, [user("still there?", image_bytes(32, 32, seed=9))]))
    assert r.status_code == 200, r.text


def test_missing_asset(client):
    rendered = render(client, [user("x", image_bytes(40, 40, seed=10))])
    desc = rendered.descriptors[0].model_copy(update={"digest": compute_digest(b"never stored")})
    body = GenerateRequest(prompt_token_ids=rendered.token_ids, descriptors=[desc])
    r = httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=60)
    assert r.status_code == 422 and _code(r) == "missing_asset"
    assert r.json()["error"]["digest"] == desc.digest
    _still_serving(client)


def test_placeholder_mismatch_named(client):
    rendered = render(client, [user("x", image_bytes(100, 140, seed=11))])
    ids = list(rendered.token_ids)
    span = rendered.image_spans[0]
    del ids[span.start]  # one placeholder short
    body = GenerateRequest(prompt_token_ids=ids, descriptors=rendered.descriptors)
    r = httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=60)
    assert r.status_code == 409 and _code(r) == "placeholder_mismatch"
    err = r.json()["error"]
    assert (err["image"], err["expected"], err["actual"]) == (0, span.length, span.length - 1)
    _still_serving(client)


def test_layout_and_descriptor_mismatch(client):
    rendered = render(client, [user("x", image_bytes(100, 140, seed=12))])
    desc = rendered.descriptors[0]
    wrong_fp = desc.model_copy(update={"fingerprint": "ffffffffffffffff"})
    body = GenerateRequest(prompt_token_ids=rendered.token_ids, descriptors=[wrong_fp])
    r = httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=60)
    assert r.status_code == 409 and _code(r) == "layout_mismatch"
    # a descriptor claiming another size with the same token count: the decoded size gives it away
    swapped = desc.model_copy(update={"width": 101})
    body = GenerateRequest(prompt_token_ids=rendered.token_ids, descriptors=[swapped])
    r = httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=60)
    assert r.status_code == 409 and _code(r) in ("descriptor_mismatch", "layout_mismatch")
    _still_serving(client)


def test_malformed_and_processed_payloads(client):
    r = httpx.post(f"{client[2].url}/v1/generate", json={"prompt_token_ids": "nope"}, timeout=60)
    assert r.status_code == 400 and _code(r) == "invalid_request"
    assert r.json()["error"]["errors"][0]["loc"] == ["body", "prompt_token_ids"]
    for broken in (b"", b"{", b"[1, 2]"):
        r = httpx.post(f"{client[2].url}/v1/generate", content=broken, timeout=60)
        assert r.status_code == 400 and _code(r) == "invalid_request", broken
    rendered = render(client, [user("x", image_bytes(40, 40, seed=13))])
    body = GenerateRequest(prompt_token_ids=rendered.token_ids, descriptors=rendered.descriptors).model_dump(
        mode="json"
    )
    body["descriptors"][0]["pixel_values"] = [[0.5]]
    r = httpx.post(f"{client[2].url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 400 and "processed image payload" in r.text
    _still_serving(client)


def test_image_tokens_are_never_sampled_by_default(client):
    _, renderer, _ = client
    rendered = render(client, [user("x", image_bytes(40, 40, seed=14))])
    r = generate(client, rendered, max_tokens=64, temperature=2.0, seed=1, n=4).json()
    too_hot = generate(client, rendered, temperature=5.0)
    assert too_hot.status_code == 400 and _code(too_hot) == "engine_rejected"
    markup = set(
        renderer.tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)
    )
    for s in r["samples"]:
        assert not markup & set(s["token_ids"])


def test_a_prompt_that_fills_the_context_is_refused_before_vllm_processes_it(client):
    too_long = render(client, [user("word " * 5000, image_bytes(90, 120, seed=22))])
    refused = generate(client, too_long)
    assert refused.status_code == 400 and _code(refused) == "context_length_exceeded", refused.text
    error = refused.json()["error"]
    assert error["param"] == "prompt_token_ids" and f"{len(too_long.token_ids)}" in error["message"]


def test_an_image_of_a_request_vllm_refuses_is_sent_again_with_the_next(client):
    # vLLM processes the image (its processor cache counts it as sent to the engine core), then
    # its own checks refuse the prompt (a token id outside the vocabulary): the next request with
    # that image must carry its data again, not a hash the engine core never got
    picture = image_bytes(90, 120, seed=21)
    rendered = render(client, [user("describe it", picture)])
    ids = list(rendered.token_ids)
    ids.insert(len(ids) - 2, 10**6)
    body = GenerateRequest(
        prompt_token_ids=ids,
        descriptors=rendered.descriptors,
        sampling=SamplingOptions(max_tokens=8, temperature=0.0),
    )
    refused = httpx.post(f"{client[2].url}/v1/generate", json=body.model_dump(mode="json"), timeout=300)
    assert refused.status_code == 400 and _code(refused) == "engine_rejected", refused.text
    assert "vocabulary" in refused.json()["error"]["message"]
    served = generate(client, rendered)
    assert served.status_code == 200, served.text
    (sample,) = served.json()["samples"]
    assert len(sample["token_ids"]) == 8 and sample["finish_reason"] == "length"


def test_health_ready_metrics(client):
    url = client[2].url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["family"] == "qwen2_vl" and ready["status"] == "ready"
    m = httpx.get(f"{url}/metrics").text
    assert "mmstore_inference_requests_total" in m and "mmstore_inference_fetch_seconds" in m
    post = httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/generate"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["title"] == "GenerateRequest"
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["$ref"].endswith("/GenerateResponse")


def test_image_tokens_sampled_when_allowed(client):
    """The ban above is what keeps them out: allowed, the random tiny policy does sample them."""
    _, renderer, _ = client
    rendered = render(client, [user("x", image_bytes(40, 40, seed=14))])
    r = generate(
        client, rendered, max_tokens=64, temperature=2.0, seed=1, n=4, allow_image_tokens=True
    ).json()
    markup = set(
        renderer.tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)
    )
    assert any(markup & set(s["token_ids"]) for s in r["samples"])


def test_corrupt_asset_when_store_serves_rotten_bytes(client, store):
    """A JPEG: the service reads its bytes (the store keeps no pixels of JPEGs, which a PNG would
    be read as instead, decoded at its upload from the verified bytes)."""
    from pathlib import Path

    from mmstore_client.digest import digest_hex

    rendered = render(client, [user("x", image_bytes(64, 48, "JPEG", seed=15))])
    digest = rendered.descriptors[0].digest
    root = Path(store.argv[store.argv.index("--root") + 1])
    h = digest_hex(digest)
    blob = root / "blobs" / h[:2] / h[2:4] / h
    data = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        r = generate(client, rendered)
        assert r.status_code == 502 and _code(r) == "corrupt_asset", r.text
        assert r.json()["error"]["digest"] == digest
    finally:
        blob.write_bytes(data)
    assert generate(client, rendered).status_code == 200, "verified bytes are accepted again"


def test_store_unavailable_then_recovers(client, store):
    rendered = render(client, [user("x", noise_png(3000, seed=16))])
    store.kill()
    try:
        r = generate(client, rendered)
        assert r.status_code == 503 and _code(r) == "store_unavailable"
        assert r.headers["retry-after"]
    finally:
        store.start()
    assert generate(client, rendered).status_code == 200
