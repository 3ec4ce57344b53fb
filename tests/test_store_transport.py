"""The async store client over aiohttp (mmstore_client.transport) behaves as over httpx's own transport:
the same answers and errors from a real store, httpx's exceptions for network faults (so the
client's retries apply), and bodies that stream instead of arriving whole."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import httpx
import pytest
from mmstore_client import (
    AsyncStoreClient,
    AuthError,
    NotFoundError,
    RejectedError,
    TransportError,
    compute_digest,
    decode,
)
from mmstore_client.transport import AiohttpTransport
from support import image_bytes


async def everything_a_reader_sees(url: str, transport: httpx.AsyncBaseTransport | None) -> dict:
    png, jpeg = image_bytes(64, 48, "PNG", seed=70), image_bytes(40, 30, "JPEG", seed=71)
    async with AsyncStoreClient(url, token="writer") as writer:
        digests = [(await writer.put(data, "transport")).digest for data in (png, jpeg)]
    async with AsyncStoreClient(url, token="writer", transport=transport) as client:
        got = [await client.get(d) for d in digests]
        pixels = await client.pixels(digests[0])
        headers = await client.image_headers(digests)
        errors = []
        for call in (lambda: client.get(compute_digest(b"absent")), lambda: client.put(b"not an image", "t")):
            try:
                await call()
            except (NotFoundError, RejectedError) as exc:
                errors.append((type(exc).__name__, exc.status, exc.code))
    async with AsyncStoreClient(url, token="nobody", transport=transport) as stranger:
        try:
            await stranger.get(digests[0])
        except AuthError as exc:
            errors.append((type(exc).__name__, exc.status, exc.code))
    return {
        "bytes": got == [png, jpeg],
        "pixels": decode.pixel_digest(pixels),
        "headers": headers,
        "errors": errors,
    }


def test_a_real_store_answers_the_same_over_aiohttp_as_over_httpx(auth_store):
    over_httpx = asyncio.run(everything_a_reader_sees(auth_store.url, None))
    over_aiohttp = asyncio.run(everything_a_reader_sees(auth_store.url, AiohttpTransport()))
    assert over_aiohttp == over_httpx
    assert over_aiohttp["bytes"] and over_aiohttp["pixels"].startswith("blake3:")
    assert over_aiohttp["errors"] == [
        ("NotFoundError", 404, "not_found"),
        ("RejectedError", 415, "unsupported_media_type"),
        ("AuthError", 401, "unauthorized"),
    ]


def serve_raw(answer: Callable[[socket.socket, int], None]) -> tuple[str, list[bytes]]:
    """A loopback server that reads each request's head (kept, in order) and calls ``answer(conn, n)``
    for the n-th (from 0); for faults a real store never makes."""
    listener = socket.create_server(("127.0.0.1", 0))
    calls: list[bytes] = []

    def loop() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                calls.append(head)
                answer(conn, len(calls) - 1)

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", calls


def ok(body: bytes, *, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (n, body)


def test_a_truncated_body_is_a_transport_error_and_is_retried():
    data = image_bytes(seed=72)

    def answer(conn: socket.socket, n: int) -> None:  # the first answer stops half-way
        conn.sendall(ok(data[: len(data) // 2], length=len(data)) if n == 0 else ok(data))

    url, calls = serve_raw(answer)

    async def read(retries: int) -> bytes:
        async with AsyncStoreClient(url, retries=retries, backoff=0.01, transport=AiohttpTransport()) as c:
            return await c.get(compute_digest(data))

    assert asyncio.run(read(retries=1)) == data and len(calls) == 2
    calls.clear()
    with pytest.raises(TransportError) as exc:
        asyncio.run(read(retries=0))
    assert isinstance(exc.value.__cause__, httpx.RemoteProtocolError) and len(calls) == 1


def test_refused_connections_and_silent_servers_raise_httpx_errors():
    async def info(url: str, **options) -> None:
        async with AsyncStoreClient(
            url, retries=1, backoff=0.01, transport=AiohttpTransport(), **options
        ) as c:
            await c.info(compute_digest(b"x"))

    with pytest.raises(TransportError) as refused:
        asyncio.run(info("http://127.0.0.1:9"))
    assert isinstance(refused.value.__cause__, httpx.ConnectError)

    silent, _ = serve_raw(lambda conn, n: threading.Event().wait(5))
    with pytest.raises(TransportError) as timed_out:
        asyncio.run(info(silent, timeout=httpx.Timeout(0.3)))
    assert isinstance(timed_out.value.__cause__, httpx.ReadTimeout)


def test_a_body_streams_as_it_arrives():
    rest_may_follow = threading.Event()

    def answer(conn: socket.socket, n: int) -> None:
        conn.sendall(ok(b"first part;", length=len(b"first part;second part")))
        rest_may_follow.wait(10)
        conn.sendall(b"second part")

    url, _ = serve_raw(answer)

    async def stream() -> list[bytes]:
        chunks = []
        async with (
            httpx.AsyncClient(transport=AiohttpTransport()) as client,
            client.stream("GET", url) as response,
        ):
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                rest_may_follow.set()  # only once the first part reached us
        return chunks

    assert asyncio.run(stream()) == [b"first part;", b"second part"]


def test_the_url_goes_out_as_httpx_encoded_it():
    """A presigned URL (the store's redirect to its bucket) is signed over its exact encoding."""
    url, calls = serve_raw(lambda conn, n: conn.sendall(ok(b"")))
    target = "/bucket/key?X-Amz-Credential=a%2F20261204%2Fus-east-1&X-Amz-Signature=ab%3D"

    async def get() -> int:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            return (await client.get(url + target)).status_code

    assert asyncio.run(get()) == 200
    assert calls[0].split(b"\r\n")[0] == f"GET {target} HTTP/1.1".encode()
