"""The store serves the pixels it decoded to verify an upload (GET /v1/blobs/{digest}/pixels):
exactly the decoding rule's RGB pixels, through both clients, on both storage backends; never for
a JPEG (its check does not decode in full), nor for a blob GC removed."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from mmstore_client import AsyncStoreClient, StoreClient, decode
from mmstore_client.digest import compute_digest
from mmstore_client.pixels import PIXEL_HEIGHT, PIXEL_WIDTH
from PIL import Image
from support import image_bytes
from test_store_api import error_code, put


@pytest.fixture(scope="session")
def store(store, store_backend, request):
    return store if store_backend == "local" else request.getfixturevalue("s3_store")


def rgba_png_with_orientation() -> bytes:
    """A PNG that the rule must composite (alpha) and rotate (EXIF orientation 6): the served
    pixels are the rule's, not the file's."""
    img = Image.new("RGBA", (30, 20))
    img.putdata(
        [(x * 8 % 256, y * 12 % 256, (x + y) % 256, (x * y) % 256) for y in range(20) for x in range(30)]
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def metric(store, name: str) -> float:
    text = httpx.get(f"{store.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_served_pixels_are_the_decoding_rules_and_both_clients_read_them(store):
    data = rgba_png_with_orientation()
    digest = compute_digest(data)
    kept, served = metric(store, "mmstore_pixels_kept_total"), metric(store, "mmstore_pixels_served_total")
    assert put(store, data, run="pixels").status_code == 201
    assert metric(store, "mmstore_pixels_kept_total") == kept + 1
    rule = decode.decode_rgb(data)
    assert rule.size == (20, 30)  # rotated by the orientation

    r = httpx.get(f"{store.url}/v1/blobs/{digest}/pixels")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert (int(r.headers[PIXEL_WIDTH]), int(r.headers[PIXEL_HEIGHT])) == rule.size
    assert r.content == rule.tobytes()
    assert metric(store, "mmstore_pixels_served_total") == served + 1

    with StoreClient(store.url) as client:
        img = client.pixels(digest)
    assert img.mode == "RGB" and img.size == rule.size and img.tobytes() == rule.tobytes()
    assert decode.pixel_digest(img) == decode.pixel_digest(rule)

    async def read() -> Image.Image | None:
        async with AsyncStoreClient(store.url) as client:
            return await client.pixels(digest)

    assert asyncio.run(read()).tobytes() == rule.tobytes()


def test_jpegs_and_unknown_digests_have_no_pixels_and_the_client_says_none(store):
    jpeg = image_bytes(40, 30, "JPEG", seed=900)
    assert put(store, jpeg, run="pixels").status_code == 201
    unknown = compute_digest(b"never uploaded")
    with StoreClient(store.url) as client:
        for digest in (compute_digest(jpeg), unknown):
            r = httpx.get(f"{store.url}/v1/blobs/{digest}/pixels")
            assert r.status_code == 404 and error_code(r) == "pixels_not_kept"
            assert client.pixels(digest) is None
        assert client.get(compute_digest(jpeg)) == jpeg  # the fallback: the bytes
    r = httpx.get(f"{store.url}/v1/blobs/blake3:abc/pixels")
    assert r.status_code == 400 and error_code(r) == "invalid_digest"


def test_pixels_of_a_blob_gc_removed_are_not_served(store):
    data = image_bytes(16, 16, seed=901)
    digest = compute_digest(data)
    assert put(store, data, run="pixels-gone").status_code == 201
    assert httpx.get(f"{store.url}/v1/blobs/{digest}/pixels").status_code == 200
    assert httpx.delete(f"{store.url}/v1/runs/pixels-gone").status_code == 200
    assert httpx.post(f"{store.url}/v1/gc", json={"grace_seconds": 0}).json()["deleted"] >= 1
    r = httpx.get(f"{store.url}/v1/blobs/{digest}/pixels")
    assert r.status_code == 404 and error_code(r) == "not_found"
