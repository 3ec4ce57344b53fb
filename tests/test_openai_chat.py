"""The OpenAI-compatible endpoint, driven by the official ``openai`` client (sync, async, streaming)
against the session's real mmstore and real `mmstore-inference serve` (vLLM CPU, tiny Qwen2-VL)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
from pathlib import Path

import httpx
import openai
import pytest
from mmstore_client import StoreClient, compute_digest, make_ref
from mmstore_client.descriptor import Descriptor, ImageSpan
from mmstore_client.inference import GenerateRequest, InferenceClient, SamplingOptions
from mmstore_client.render import Rendered, Renderer
from mmstore_client.samples import Sample, sample_from_rendered
from support import FetchingRenderer, free_port, image_bytes, noise_png

pytestmark = pytest.mark.slow
RUN = "openai-tests"


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def store_client(store):
    with StoreClient(store.url) as c:
        yield c


@pytest.fixture(scope="module")
def renderer(tiny_qwen2_vl, store_client):
    return FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), store_client)


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl) -> str:
    return tiny_qwen2_vl.name  # the served model name defaults to the folder's name


@pytest.fixture(scope="module")
def client(inference):
    with openai.OpenAI(base_url=f"{inference.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def ref(store_client: StoreClient, data: bytes) -> str:
    return make_ref(store_client.put(data, RUN).digest)


def create(client, model, messages, **kw):
    return client.chat.completions.create(
        model=model, messages=messages, **({"max_tokens": 8, "temperature": 0.0} | kw)
    )


def check_against_renderer(resp, rendered) -> None:
    """The response alone carries the prompt exactly as the client-side renderer builds it."""
    assert resp.prompt_token_ids == rendered.token_ids
    mm = resp.mmstore
    assert [Descriptor.model_validate(d) for d in mm["descriptors"]] == rendered.descriptors
    assert [ImageSpan.model_validate(s) for s in mm["image_spans"]] == rendered.image_spans
    assert mm["fingerprint"] == resp.system_fingerprint == rendered.descriptors[0].fingerprint


def test_models_and_model_check(client, model, tiny_qwen2_vl, store_client):
    (served,) = client.models.list().data
    assert served.id == model and served.owned_by == "mmstore"
    assert served.mmstore["family"] == "qwen2_vl"
    with pytest.raises(openai.NotFoundError) as err:
        create(client, "gpt-4o", [user("hi")])
    assert err.value.code == "model_not_found" and err.value.param == "model"
    by_path = create(client, str(tiny_qwen2_vl), [user("hi", ref(store_client, image_bytes(40, 40, seed=1)))])
    assert by_path.model == model


def test_single_and_multi_image_refs(client, model, store_client, renderer):
    a, b, c = (
        ref(store_client, image_bytes(w, h, seed=s))
        for w, h, s in ((100, 140, 2), (300, 200, 3), (64, 64, 4))
    )
    for messages in (
        [user("What is this?", a)],
        [
            {"role": "system", "content": "Count the shapes."},
            user("Two pictures:", a, b),
            {"role": "assistant", "content": "Let me zoom in."},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [
                    {"type": "image_url", "image_url": {"url": c}},
                    {"type": "text", "text": "zoomed"},
                ],
            },
            user("And now?"),
        ],
    ):
        resp = create(client, model, messages, logprobs=True, top_logprobs=1)
        check_against_renderer(resp, renderer.render(messages))
        (choice,) = resp.choices
        assert 1 <= len(choice.token_ids) <= 8 and choice.finish_reason in ("stop", "length")
        assert choice.message.role == "assistant"
        assert choice.message.content == renderer.tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        entries = choice.logprobs.content
        assert len(entries) == len(choice.token_ids)
        for e in entries:  # top_logprobs lists the sampled token only (documented)
            assert e.logprob <= 0 and [(t.token, t.logprob) for t in e.top_logprobs] == [(e.token, e.logprob)]
        assert resp.usage.prompt_tokens == len(resp.prompt_token_ids)
        assert resp.usage.completion_tokens == len(choice.token_ids)
        assert resp.mmstore["render"] == {"mode": "render", "previous_tokens": None, "extends_previous": None}


def test_n_samples_and_greedy_determinism_match_generate(client, model, store_client, renderer, inference):
    messages = [user("Count.", ref(store_client, image_bytes(64, 64, seed=5)))]
    greedy = [create(client, model, messages, logprobs=True) for _ in range(2)]
    assert greedy[0].choices[0].token_ids == greedy[1].choices[0].token_ids
    rendered = renderer.render(messages)
    with InferenceClient(inference.url) as inf:
        direct = inf.generate(
            GenerateRequest(
                prompt_token_ids=rendered.token_ids,
                descriptors=rendered.descriptors,
                sampling=SamplingOptions(max_tokens=8, temperature=0.0),
            )
        )
    assert greedy[0].choices[0].token_ids == direct.samples[0].token_ids
    assert [e.logprob for e in greedy[0].choices[0].logprobs.content] == direct.samples[0].logprobs
    sampled = create(client, model, messages, n=4, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in sampled.choices}) > 1, "4 sampled completions should differ"
    again = create(client, model, messages, n=4, temperature=1.0, seed=7, max_tokens=12)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in sampled.choices], "seeded"
    assert again.choices[0].logprobs is None, "logprobs only when asked for"


def test_async_client_and_streaming(inference, model, store_client):
    messages = [user("Stream it.", ref(store_client, image_bytes(80, 60, seed=6)))]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{inference.url}/v1", api_key="unused", max_retries=0) as ac:
            kw = {"model": model, "messages": messages, "max_tokens": 10, "temperature": 0.0}
            plain = await asyncio.gather(*(ac.chat.completions.create(**kw, logprobs=True) for _ in range(3)))
            stream = await ac.chat.completions.create(
                **kw, logprobs=True, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
            sampled = await ac.chat.completions.create(**kw | {"temperature": 1.0}, n=3, seed=3, stream=True)
            sampled_chunks = [c async for c in sampled]
            return plain, chunks, sampled_chunks

    plain, chunks, sampled_chunks = asyncio.run(main())
    want = plain[0].choices[0]
    assert all(p.choices[0].token_ids == want.token_ids for p in plain)
    assert chunks[0].prompt_token_ids == plain[0].prompt_token_ids
    assert chunks[0].mmstore["descriptors"] == plain[0].mmstore["descriptors"]
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == want.message.content
    assert [t for c in body for t in (getattr(c.choices[0], "token_ids", None) or [])] == want.token_ids
    lps = [e.logprob for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert lps == [e.logprob for e in want.logprobs.content]
    assert body[-1].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    by_index: dict[int, list[int]] = {}
    for c in sampled_chunks:
        for ch in c.choices:
            by_index.setdefault(ch.index, []).extend(getattr(ch, "token_ids", None) or [])
    assert sorted(by_index) == [0, 1, 2] and all(by_index.values())
    assert all(c.usage is None for c in sampled_chunks), "no usage chunk unless asked for"


def sample_from_responses(responses, sample_id: str) -> Sample:
    """A training sample from the chat responses of one conversation (choice 0 of each turn):
    the last turn's prompt and completion, each turn's completion trained on, with its logprobs."""
    last = responses[-1]
    ids = [*last.prompt_token_ids, *last.choices[0].token_ids]
    mask, logprobs = [False] * len(ids), [0.0] * len(ids)
    for r in responses:
        c, start = r.choices[0], len(r.prompt_token_ids)
        assert ids[start : start + len(c.token_ids)] == c.token_ids
        for k, e in enumerate(c.logprobs.content):
            mask[start + k], logprobs[start + k] = True, e.logprob
    rendered = Rendered(
        ids,
        [Descriptor.model_validate(d) for d in last.mmstore["descriptors"]],
        [ImageSpan.model_validate(s) for s in last.mmstore["image_spans"]],
        mask,
    )
    return sample_from_rendered(rendered, sample_id=sample_id, advantages=1.0, logprobs=logprobs)


def test_five_turns_bridged_equal_the_renderer_and_train(
    client, model, store_client, renderer, store, tiny_qwen2_vl, inference
):
    from mmstore_trainer import Materializer

    images = [image_bytes(90 + 10 * t, 70, seed=20 + t) for t in range(5)]
    messages = [{"role": "system", "content": "Describe."}, user("turn 0", ref(store_client, images[0]))]
    rendered = renderer.render(messages)
    responses, previous = [], None
    for turn in range(5):
        extra = {"mmstore": {"previous_token_ids": previous}} if previous else {}
        resp = create(client, model, messages, max_tokens=6, logprobs=True, extra_body=extra)
        check_against_renderer(resp, rendered)
        if previous:
            assert resp.prompt_token_ids[: len(previous)] == previous, "each turn extends the last"
            assert resp.mmstore["render"] == {
                "mode": "bridge",
                "previous_tokens": len(previous),
                "extends_previous": True,
            }
        responses.append(resp)
        choice = resp.choices[0]
        previous = [*resp.prompt_token_ids, *choice.token_ids]
        after = rendered.extend(choice.token_ids, assistant=True)
        after.messages.append({"role": "assistant", "content": choice.message.content})
        # later turns re-send turn 0's picture (as a data URI: offloaded again, same digest)
        new = user(f"turn {turn + 1}", ref(store_client, images[(turn + 1) % 5]), data_uri(images[0]))
        messages += [{"role": "assistant", "content": choice.message.content}, new]
        if turn < 4:
            client_side = [
                user(f"turn {turn + 1}", ref(store_client, images[turn + 1]), ref(store_client, images[0]))
            ]
            rendered = renderer.bridge(after, client_side)
    assert len(responses[-1].mmstore["descriptors"]) == 9
    # the same conversation rendered from scratch: reported, and counted when it does not extend
    metrics = httpx.get(f"{inference.url}/metrics").text
    before = _metric(metrics, "mmstore_inference_openai_non_extending_renders_total")
    prev = responses[-1].prompt_token_ids[:-3]  # not a prefix of anything the template renders
    scratch = create(
        client,
        model,
        messages[:-2],
        extra_body={"mmstore": {"previous_token_ids": [*prev, 7], "bridge": False}},
    )
    assert scratch.mmstore["render"]["mode"] == "render"
    assert scratch.mmstore["render"]["extends_previous"] is False
    after_metrics = httpx.get(f"{inference.url}/metrics").text
    assert _metric(after_metrics, "mmstore_inference_openai_non_extending_renders_total") == before + 1
    assert 'mmstore_inference_openai_renders_total{mode="bridge"}' in after_metrics
    # a training sample from the responses alone passes the trainer's materialization checks
    sample = sample_from_responses(responses, "openai-5-turns")
    with StoreClient(store.url) as fresh:
        materialized = Materializer.from_pretrained(tiny_qwen2_vl, fresh)(sample)
    assert materialized.grids == [tuple(d.grid) for d in sample.descriptors]
    assert sum(sample.loss_mask) == sum(len(r.choices[0].token_ids) for r in responses)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


class _ImageServer:
    """An http server on loopback serving one image (the service fetches http(s) image URLs)."""

    def __init__(self, data: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/picture.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_inline_images_offloaded_by_the_service(client, model, store_client, renderer):
    png, jpeg, served = (
        image_bytes(120, 90, seed=30),
        image_bytes(96, 64, "JPEG", seed=31),
        noise_png(5000, 32),
    )
    digests = [compute_digest(x) for x in (png, jpeg, served)]
    assert not any(store_client.head(d) for d in digests)
    server = _ImageServer(served)
    try:
        messages = [user("three pictures", data_uri(png), data_uri(jpeg, "image/jpeg"), server.url)]
        run = "openai-offload"
        resp = create(client, model, messages, extra_body={"mmstore": {"run": run}})
    finally:
        server.server.shutdown()
    assert resp.mmstore["offloaded"] == digests and resp.mmstore["run"] == run
    assert all(store_client.head(d) for d in digests), "the store holds them afterwards"
    assert {b.digest for b in store_client.iter_run_blobs(run)} == set(digests)
    as_refs = [user("three pictures", *(make_ref(d) for d in digests))]
    check_against_renderer(resp, renderer.render(as_refs))
    again = create(client, model, as_refs)
    assert again.prompt_token_ids == resp.prompt_token_ids and again.mmstore["offloaded"] == []


def test_inline_images_are_not_fetched_back_and_decoded_once(client, model, store_client, inference):
    """After the offload the service holds the bytes it hashed: neither the headers nor the generate
    path GETs them from the store, also for an image the store already had (linked, not uploaded),
    and each new image is decoded once."""
    known, new = image_bytes(110, 70, seed=40), image_bytes(70, 110, seed=41)
    store_client.put(known, RUN)  # in the store, never seen by the service
    counters = ("mmstore_inference_store_fetches_total", "mmstore_inference_decodes_total")
    before = httpx.get(f"{inference.url}/metrics").text
    messages = [user("two pictures", data_uri(known), data_uri(new))]
    resp = create(client, model, messages)
    after = httpx.get(f"{inference.url}/metrics").text
    fetches, decodes = (_metric(after, c) - _metric(before, c) for c in counters)
    assert (fetches, decodes) == (0, 2)
    assert resp.mmstore["offloaded"] == [compute_digest(known), compute_digest(new)]


def test_stop_strings_and_stop_token_ids(client, model, store_client, renderer):
    messages = [user("Talk.", ref(store_client, image_bytes(50, 50, seed=40)))]
    full = create(client, model, messages, max_tokens=24).choices[0]
    text, ids = full.message.content, full.token_ids
    start = next(
        i
        for i in range(len(text) // 3, len(text) - 2)
        if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i
    )
    stop = text[start : start + 2]
    cut = create(client, model, messages, max_tokens=24, stop=[stop, "never-there"]).choices[0]
    assert cut.message.content == text[:start] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.token_ids == ids[: len(cut.token_ids)] and len(cut.token_ids) < len(ids)
    decode = lambda ids: renderer.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert stop in decode(cut.token_ids) and stop not in decode(cut.token_ids[:-1]), "through its token"
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    by_id = create(client, model, messages, max_tokens=24, extra_body={"stop_token_ids": [ids[k]]}).choices[0]
    assert by_id.token_ids == ids[: k + 1] and by_id.finish_reason == "stop" and by_id.stop_reason == ids[k]


# -- errors: OpenAI's shape, our codes, the right status; the service keeps serving ----------------


def _raises(exc_type, fn, code: str, param: str | None = "any"):
    with pytest.raises(exc_type) as err:
        fn()
    e = err.value
    assert e.code == code, e.body
    assert {"message", "type", "param", "code"} <= set(e.body)
    assert e.type == ("server_error" if e.status_code >= 500 else "invalid_request_error")
    if param != "any":
        assert e.param == param, e.body
    return e


def test_request_errors(client, model, store_client):
    img = ref(store_client, image_bytes(40, 40, seed=50))
    never = make_ref(compute_digest(b"never stored"))
    e = _raises(
        openai.UnprocessableEntityError,
        lambda: create(client, model, [user("x", img), user("y", never)]),
        "missing_asset",
        "messages[1].content[0].image_url.url",
    )
    assert e.body["digest"] == never.removeprefix("mmstore://blobs/")
    _raises(
        openai.ConflictError,
        lambda: create(client, model, [user("smuggled <|image_pad|> token", img)]),
        "placeholder_mismatch",
    )
    good = create(client, model, [user("x", img)])
    previous = [*good.prompt_token_ids, *good.choices[0].token_ids]
    del previous[good.mmstore["image_spans"][0]["start"]]  # one placeholder short
    _raises(
        openai.ConflictError,
        lambda: create(
            client,
            model,
            [user("x", img), {"role": "assistant", "content": "a"}, user("more")],
            extra_body={"mmstore": {"previous_token_ids": previous}},
        ),
        "placeholder_mismatch",
        "mmstore.previous_token_ids",
    )
    for url in ("/etc/hostname", "file:///etc/hostname"):
        _raises(
            openai.BadRequestError,
            lambda url=url: create(client, model, [user("x", url)]),
            "url_refused",
            "messages[0].content[0].image_url.url",
        )
    _raises(
        openai.BadRequestError,
        lambda: create(client, model, [user("x", data_uri(b"not an image at all"))]),
        "unsupported_media_type",
        "messages[0].content[0].image_url.url",
    )
    _raises(
        openai.BadRequestError, lambda: create(client, model, [user("x", img)], n=0), "invalid_request", "n"
    )
    _raises(
        openai.BadRequestError,
        lambda: create(client, model, [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]),
        "invalid_request",
    )
    _raises(
        openai.BadRequestError,
        lambda: create(client, model, [user("x", img)], presence_penalty=0.5),
        "unsupported_parameter",
        "presence_penalty",
    )
    _raises(
        openai.BadRequestError,
        lambda: create(client, model, [user("x", img)], max_tokens=10_000),
        "context_length_exceeded",
        "max_tokens",
    )
    _raises(
        openai.BadRequestError,
        lambda: create(client, model, [user("x", img)], extra_body={"mmstore": {"run": "../etc"}}),
        "invalid_request",
        "mmstore.run",
    )
    click = {
        "type": "function",
        "function": {"name": "click", "parameters": {"type": "object", "properties": {}}},
    }
    _raises(  # Qwen2-VL's template ignores tools: refused, never silently dropped
        openai.BadRequestError,
        lambda: create(client, model, [user("x", img)], tools=[click]),
        "tools_unsupported",
        "tools",
    )
    r = httpx.post(f"{client.base_url}chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert create(client, model, [user("still serving", img)]).choices


def test_long_tool_output_is_text_and_a_base64_image_is_refused(client, model):
    """Free text of any alphabet is a prompt; an image written out as base64 text is not."""
    numbers = " ".join(str(i) for i in range(1, 1100))  # 4,387 characters of [0-9 ]
    resp = create(client, model, [user("count"), {"role": "assistant", "content": "ok"}, user(numbers)])
    assert resp.choices[0].finish_reason in ("stop", "length")
    b64 = base64.b64encode(image_bytes(40, 40, seed=51)).decode()
    refused = lambda: create(client, model, [user(b64)])  # noqa: E731
    _raises(openai.BadRequestError, refused, "processed_payload", "messages")


def test_corrupt_asset_and_store_unavailable(client, model, store_client, store):
    from mmstore_client.digest import digest_hex

    data = noise_png(3000, seed=60)
    img = ref(store_client, data)
    h = digest_hex(compute_digest(data))
    blob = Path(store.argv[store.argv.index("--root") + 1]) / "blobs" / h[:2] / h[2:4] / h
    blob.chmod(0o644)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        _raises(
            openai.InternalServerError,
            lambda: create(client, model, [user("x", img)]),
            "corrupt_asset",
            "messages[0].content[0].image_url.url",
        )
    finally:
        blob.write_bytes(data)
    other = ref(store_client, noise_png(3000, seed=61))
    store.kill()
    try:
        e = _raises(
            openai.InternalServerError, lambda: create(client, model, [user("x", other)]), "store_unavailable"
        )
        assert e.status_code == 503 and e.response.headers["retry-after"]
    finally:
        store.start()
    assert create(client, model, [user("x", img)]).choices, "verified bytes are accepted again"
