"""An httpx transport on aiohttp: :class:`AiohttpTransport`, for async clients that read large bodies.

httpx's own async transport (httpcore over anyio) hands a response body up in pieces of at most
64 KiB, each through several layers of Python; reading the 2.8 MB of a 1280x720 screenshot's
pixels from a store on loopback takes it 8-10 ms, aiohttp's parser 3-5 ms (see ``bench/``). This
transport keeps httpx's client (its API, auth headers, redirects, timeouts and exception tree, all
of which the store clients build on) and moves the bytes with aiohttp, which a vLLM installation
carries anyway (install ``mmstore-client[aiohttp]`` elsewhere). Pass it to
:class:`~mmstore_client.AsyncStoreClient` or :class:`~mmstore_client.inference.AsyncInferenceClient`
(``transport=AiohttpTransport()``), as the inference service and the rollout loop do.

What it maps, so that callers see httpx's behaviour:

* aiohttp's exceptions, raised while connecting or while the body streams, become httpx's
  (:class:`httpx.ConnectError`, :class:`httpx.ConnectTimeout`, :class:`httpx.ReadTimeout`,
  :class:`httpx.ReadError`, :class:`httpx.RemoteProtocolError`), so retry policies written for
  httpx apply unchanged;
* httpx's per-request timeouts (connect, read, pool) become aiohttp's;
* aiohttp neither follows redirects nor decodes content-encodings here: httpx does both, as it
  does over its own transport;
* the URL goes out as httpx encoded it (re-quoting would break a presigned URL's signature);
* the body streams as aiohttp receives it (``iter_any``), never buffered whole by the transport,
  so ``client.stream(...)`` keeps its meaning.

One instance belongs to one event loop (its aiohttp session is made on the first request);
``aclose`` closes the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport"]

# Most specific first: the first match wins.
_EXCEPTIONS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (asyncio.TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.ReadError),
    (OSError, httpx.ReadError),
)


@contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except Exception as exc:
        for source, target in _EXCEPTIONS:
            if isinstance(exc, source):
                raise target(f"{type(exc).__name__}: {exc}", request=request) from exc
        raise


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()  # back to the pool when read in full, else the connection is closed


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An :class:`httpx.AsyncBaseTransport` that sends requests with an :class:`aiohttp.ClientSession`.

    ``max_connections`` bounds the open connections (aiohttp's ``limit``);
    ``keepalive_expiry`` is how long an idle one is kept, in seconds.
    """

    def __init__(self, *, max_connections: int = 100, keepalive_expiry: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive_expiry
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        try:
            body: bytes | httpx.AsyncByteStream | None = request.content or None
        except httpx.RequestNotRead:  # a streamed body: aiohttp reads the async iterator
            body = request.stream  # type: ignore[assignment]
        with _as_httpx_errors(request):
            response = await self._client().request(
                request.method,
                URL(str(request.url), encoded=True),  # as httpx encoded it: a presigned URL's signature holds
                headers=request.headers.multi_items(),
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
