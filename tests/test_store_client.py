"""The Python clients against a real store process."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mmstore_client import (
    AsyncStoreClient,
    AuthError,
    BadRequestError,
    ByteCache,
    IntegrityError,
    NotFoundError,
    RejectedError,
    StoreClient,
    TransportError,
    compute_digest,
)
from support import image_bytes


# Every test below runs against each storage backend: conftest's `store` / `auth_store` are the
# local ones, `s3_store` / `s3_auth_store` serve a bucket of a real S3-compatible server.
@pytest.fixture(scope="session")
def store(store, store_backend, request):
    return store if store_backend == "local" else request.getfixturevalue("s3_store")


@pytest.fixture(scope="session")
def auth_store(auth_store, store_backend, request):
    return auth_store if store_backend == "local" else request.getfixturevalue("s3_auth_store")


def test_put_skips_upload_when_present_and_links(store):
    data = image_bytes(21, 21, seed=50)
    with StoreClient(store.url) as client:
        info = client.put(data, "client-a")
        assert info.digest == compute_digest(data) and client.uploads == 1
        again = client.put(data, "client-b")
        assert again == info and client.uploads == 1, "second put must not send the bytes"
        assert client.run("client-b").blob_count == 1
        assert client.missing([info.digest, compute_digest(b"x")]) == [compute_digest(b"x")]
        assert client.head(info.digest) and not client.head(compute_digest(b"x"))
        assert client.info(info.digest).width == 21
        assert [b.digest for b in client.iter_run_blobs("client-a")] == [info.digest]


def test_get_verifies_caches_and_single_flights(store):
    data = image_bytes(64, 64, seed=51)
    with StoreClient(store.url) as uploader:
        digest = uploader.put(data, "client-get").digest
        assert digest in uploader.cache, "put caches what it sent"
    with StoreClient(store.url, cache=ByteCache(1 << 20)) as client:
        barrier = threading.Barrier(8)

        def get(_):
            barrier.wait()
            return client.get(digest)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(get, range(8)))
        assert all(r == data for r in results)
        assert client.fetches == 1, "8 concurrent gets of one digest must fetch once"
        assert client.get(digest) == data and client.fetches == 1


async def test_async_get_single_flight_and_errors(store):
    data = image_bytes(64, 64, seed=52)
    async with AsyncStoreClient(store.url) as uploader:
        digest = (await uploader.put(data, "client-async")).digest
    async with AsyncStoreClient(store.url) as client:
        results = await asyncio.gather(*[client.get(digest) for _ in range(10)])
        assert all(r == data for r in results) and client.fetches == 1
        with pytest.raises(NotFoundError) as exc:
            await client.get(compute_digest(b"nope"))
        assert exc.value.code == "not_found" and exc.value.status == 404
        with pytest.raises(RejectedError) as exc:
            await client.put(b"not an image", "client-async")
        assert exc.value.code == "unsupported_media_type"


def _serve_once(handler):
    """A tiny HTTP server on loopback answering with ``handler`` (for faults a real store never makes)."""
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            handler(self)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_integrity_error_on_wrong_bytes_never_cached():
    served = image_bytes(seed=53)
    asked = compute_digest(image_bytes(seed=54))

    def handler(req):
        req.send_response(200)
        req.send_header("content-length", str(len(served)))
        req.end_headers()
        req.wfile.write(served)

    srv = _serve_once(handler)
    try:
        with StoreClient(f"http://127.0.0.1:{srv.server_port}", retries=0) as client:
            with pytest.raises(IntegrityError):
                client.get(asked)
            assert asked not in client.cache
    finally:
        srv.shutdown()


def _counting_server(statuses: list[int], body_ok: bytes):
    """Answers each GET with the next status of ``statuses`` (the last one repeats) and counts requests."""
    calls = {"n": 0}

    def handler(req):
        code = statuses[min(calls["n"], len(statuses) - 1)]
        calls["n"] += 1
        body = body_ok if code == 200 else b'{"error": {"code": "some_code", "message": "said so"}}'
        req.send_response(code)
        req.send_header("content-length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    return _serve_once(handler), calls


def test_retries_5xx_then_succeeds():
    data = image_bytes(seed=55)
    srv, calls = _counting_server([503, 503, 200], data)
    try:
        with StoreClient(f"http://127.0.0.1:{srv.server_port}", retries=3, backoff=0.01) as client:
            assert client.get(compute_digest(data)) == data and calls["n"] == 3
    finally:
        srv.shutdown()


@pytest.mark.parametrize(
    ("status", "error"), [(404, NotFoundError), (401, AuthError), (400, BadRequestError)]
)
def test_4xx_is_raised_after_one_request_never_retried(status, error):
    srv, calls = _counting_server([status], b"")
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        with StoreClient(url, retries=3, backoff=0.01) as client, pytest.raises(error) as exc:
            client.get(compute_digest(b"anything"))
        assert calls["n"] == 1 and exc.value.status == status and exc.value.code == "some_code"
    finally:
        srv.shutdown()


def test_read_token_cannot_write(auth_store):
    with StoreClient(auth_store.url, token="reader") as client, pytest.raises(AuthError) as exc:
        client.put(image_bytes(seed=56), "r")
    assert exc.value.status == 403 and exc.value.code == "forbidden"


def test_transport_error_after_retries():
    with StoreClient("http://127.0.0.1:9", retries=2, backoff=0.01) as client, pytest.raises(TransportError):
        client.info(compute_digest(b"x"))


def test_token_is_sent(auth_store):
    data = image_bytes(seed=57)
    with StoreClient(auth_store.url, token="writer") as client:
        digest = client.put(data, "tok").digest
        assert client.get(digest) == data
    assert httpx.get(f"{auth_store.url}/v1/blobs/{digest}").status_code == 401
