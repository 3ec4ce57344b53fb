"""Rollout-worker offload against a real store process."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from mmstore_client import AsyncStoreClient, StoreClient, compute_digest, make_ref
from mmstore_client.offload import OffloadError, OffloadPolicy, aoffload_messages, offload_messages
from support import image_bytes, noise_png


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_offload_nested_parts_files_and_tool_results(store, tmp_path):
    a, b = image_bytes(30, 20, seed=300), image_bytes(20, 30, "JPEG", seed=301)
    path = tmp_path / "b.jpg"
    path.write_bytes(b)
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": data_uri(a)}},
                    {"type": "image_url", "image_url": {"url": data_uri(a)}},  # same bytes again
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"file://{path}"}},
                    {"type": "input_image", "image_url": str(path)},
                ],
            },
        ],
    }
    original = copy.deepcopy(body)
    with StoreClient(store.url) as client:
        out = offload_messages(body, client, "offload-run")
        assert client.uploads == 2, "identical images upload once"
    assert body == original, "the input is never modified"
    parts = out["messages"][1]["content"]
    assert parts[1]["image_url"]["url"] == make_ref(compute_digest(a)) == parts[2]["image_url"]["url"]
    tool = out["messages"][2]["content"]
    assert tool[0]["image_url"]["url"] == make_ref(compute_digest(b))
    assert tool[1]["image_url"] == make_ref(compute_digest(b))
    assert "base64" not in json.dumps(out)
    with StoreClient(store.url) as client:
        assert client.get(compute_digest(b)) == b
        assert client.run("offload-run").blob_count == 2


@pytest.mark.parametrize(
    "url,code,where",
    [
        ("data:image/png;base64,!!!notbase64", "invalid_image", "messages[0].content[1].image_url"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_image", "messages[0].content[1].image_url"),
        (data_uri(b"definitely not an image"), "unsupported_media_type", "messages[0].content[1].image_url"),
        (data_uri(noise_png(20_000, seed=302)[:5000]), "corrupt_image", "messages[0].content[1]"),
        ("/nonexistent/dir/x.png", "unreadable_file", "messages[0].content[1]"),
        ("https://example.com/cat.png", "url_refused", "messages[0].content[1]"),
    ],
)
def test_bad_images_name_the_part_and_change_nothing(store, url, code, where):
    good = data_uri(image_bytes(seed=303))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": good}},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    original = copy.deepcopy(messages)
    with StoreClient(store.url) as client:
        with pytest.raises(OffloadError) as exc:
            offload_messages(messages, client, "offload-bad")
        assert client.uploads <= 1, "only images that passed the local checks are uploaded"
    assert exc.value.code == code and exc.value.where.startswith(where.split(".image_url")[0])
    assert messages == original


def test_layout_check_refuses_at_offload(store):
    from mmstore_client.decode import ImageError

    class Refusal(ImageError):
        code = "image_refused_by_layout"

    def check(w, h):
        if max(w, h) / min(w, h) > 200:
            raise Refusal(f"aspect ratio of {w}x{h} is over 200")

    thin = data_uri(image_bytes(1000, 4, seed=304))
    with StoreClient(store.url) as client, pytest.raises(OffloadError) as exc:
        offload_messages(
            [{"role": "user", "content": [{"image_url": thin}]}], client, "r", OffloadPolicy(check_size=check)
        )
    assert exc.value.code == "image_refused_by_layout" and "aspect ratio" in str(exc.value)


async def test_async_offload(store):
    imgs = [image_bytes(16, 16, seed=310 + i) for i in range(5)]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(x)}} for x in imgs]}
    ]
    async with AsyncStoreClient(store.url) as client:
        out = await aoffload_messages(messages, client, "offload-async")
        assert client.uploads == 5
    assert [p["image_url"]["url"] for p in out[0]["content"]] == [make_ref(compute_digest(x)) for x in imgs]


async def test_offloaded_images_are_kept_by_the_client(store):
    """Every offloaded image, uploaded or only linked (the store had it), is kept with its header:
    reading it back through the same client sends no GET and reads no header again."""
    known, new = image_bytes(24, 16, seed=320), image_bytes(16, 24, seed=321)
    with StoreClient(store.url) as other:
        other.put(known, "offload-kept")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_uri(x)}} for x in (known, new)],
        }
    ]
    digests = [compute_digest(x) for x in (known, new)]
    async with AsyncStoreClient(store.url) as client:
        await aoffload_messages(messages, client, "offload-kept")
        assert client.uploads == 1, "only the image the store lacked is sent"
        headers = await client.image_headers(digests)
        assert [await client.get(d) for d in digests] == [known, new]
        assert client.fetches == 0
    assert [(h.width, h.height) for h in headers.values()] == [(24, 16), (16, 24)]
    with StoreClient(store.url) as client:
        offload_messages(messages, client, "offload-kept-sync")
        assert client.uploads == 0 and client.get(digests[1]) == new and client.fetches == 0
        assert client.run("offload-kept-sync").blob_count == 2
