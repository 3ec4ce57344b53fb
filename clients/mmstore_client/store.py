"""HTTP clients for the mmstore service: :class:`StoreClient` (sync) and :class:`AsyncStoreClient`.

Both share :class:`_StoreBase` (URLs, headers, retry policy, response decoding); their I/O
methods are twins kept in step (a test checks they expose the same methods).

* Retries with exponential backoff on connection errors, timeouts and 5xx; never on 4xx
  (every store call is idempotent: blobs are content-addressed, links are sets).
* ``get`` verifies blake3 of what arrives: a mismatch raises :class:`IntegrityError`, the bytes
  are never returned or cached. It follows a store's redirect to its bucket (a presigned URL, see
  ``MMSTORE_REDIRECT_MIN_BYTES``); the bearer token is not sent there (httpx drops it off-origin).
* A bounded byte cache (:class:`ByteCache`) keyed by digest; concurrent gets of one digest
  (threads for the sync client, tasks for the async one) share one fetch.
* ``image_headers`` gives what the renderer needs of each image (its oriented size and type, read
  from the verified bytes' header and kept by digest), so callers fetch for the sans-I/O renderer
  with whichever client they hold.
* ``pixels`` takes an image's decoded pixels from the store when it kept them from verifying
  the upload (``None`` otherwise), instead of its bytes and a decode.
* ``put`` hashes locally and first asks the store to link the digest to the run; only when the
  store lacks it are the bytes sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
from PIL import Image

from . import decode
from .cache import AsyncSingleFlight, ByteCache, LRUCache, SingleFlight
from .digest import compute_digest, validate_digest
from .errors import IntegrityError, NotFoundError, ServerError, TransportError, error_from_response
from .models import (
    BlobInfo,
    GcReport,
    LinkResponse,
    MissingResponse,
    RunBlobPage,
    RunDeleted,
    RunInfo,
    RunList,
)
from .pixels import PIXELS_NOT_KEPT, image_from_wire

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
HEADER_CACHE_ENTRIES = 1 << 16  # ~100 bytes each
_RETRYABLE = (httpx.TransportError,)


class _StoreBase:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.1,
        cache: ByteCache | None = None,
        header_cache: LRUCache[str, decode.ImageHeader] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.cache = cache if cache is not None else ByteCache()
        self.header_cache: LRUCache[str, decode.ImageHeader] = (
            header_cache if header_cache is not None else LRUCache(HEADER_CACHE_ENTRIES)
        )
        self.fetches = 0  # image reads (bytes or pixels) that went to the network, after the caches
        self.fetched_bytes = 0
        self.uploads = 0  # blob bodies the store accepted from this client

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt)

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _verified(self, digest: str, data: bytes) -> bytes:
        actual = compute_digest(data)
        if actual != digest:
            raise IntegrityError(digest, actual)
        self.fetches += 1
        self.fetched_bytes += len(data)
        self.cache.put(digest, data)
        return data

    def _counted_pixels(self, digest: str, response: httpx.Response) -> Image.Image:
        img = image_from_wire(digest, response.headers, response.content)
        self.fetches += 1  # an image read from the store, as pixels instead of bytes
        self.fetched_bytes += len(response.content)
        return img

    def keep_hashed(self, digest: str, data: bytes, header: decode.ImageHeader) -> None:
        """Keep bytes this process hashed itself (``digest == compute_digest(data)``, e.g. an image
        it just offloaded) and their header, as if fetched and verified: a later ``get`` or
        ``image_headers`` of them neither goes to the store nor reads the header again."""
        self.cache.put(digest, data)
        self.header_cache.put(digest, header)

    def _header(self, digest: str, data: bytes) -> decode.ImageHeader:
        header = decode.probe(data)
        self.header_cache.put(digest, header)
        return header

    @staticmethod
    def _retryable(exc: Exception) -> bool:
        return isinstance(exc, _RETRYABLE) or (isinstance(exc, ServerError) and exc.status != 501)


class StoreClient(_StoreBase):
    """Synchronous client. Thread-safe; use one per process."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)
        self._fetching: SingleFlight[str, bytes] = SingleFlight()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                return self._check(self._http.request(method, path, **kwargs))
            except Exception as exc:
                if not self._retryable(exc) or attempt == self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise TransportError(f"{method} {self.url}{path}: {exc!r}") from exc
                    raise
                time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    # -- blobs ------------------------------------------------------------------------------
    def put(self, data: bytes, run: str) -> BlobInfo:
        """Store ``data`` for ``run``; sends the bytes only if the store lacks them."""
        digest = compute_digest(data)
        linked = self.link(run, [digest])
        if linked.linked:
            return linked.linked[0]
        r = self._request("PUT", f"/v1/runs/{run}/blobs/{digest}", content=data)
        self.uploads += 1
        self.cache.put(digest, data)
        return BlobInfo.model_validate_json(r.content)

    def link(self, run: str, digests: list[str]) -> LinkResponse:
        r = self._request("POST", f"/v1/runs/{run}/blobs:link", json={"digests": digests})
        return LinkResponse.model_validate_json(r.content)

    def get(self, digest: str) -> bytes:
        """The blob's bytes, verified; from the cache when present; one fetch per digest at a time."""
        validate_digest(digest)
        data = self.cache.get(digest)
        if data is not None:
            return data

        def fetch() -> bytes:
            r = self._request("GET", f"/v1/blobs/{digest}", follow_redirects=True)
            return self._verified(digest, r.content)

        return self._fetching.run(digest, fetch)

    def pixels(self, digest: str) -> Image.Image | None:
        """The decoded RGB pixels the store kept from verifying the upload (:mod:`.pixels`), or
        ``None`` when it keeps none of it (read the bytes and decode them then)."""
        try:
            r = self._request("GET", f"/v1/blobs/{validate_digest(digest)}/pixels")
        except NotFoundError as exc:
            if exc.code == PIXELS_NOT_KEPT:
                return None
            raise
        return self._counted_pixels(digest, r)

    def image_headers(self, digests: Iterable[str]) -> dict[str, decode.ImageHeader]:
        """Each image's header (oriented size, mime), read from its verified bytes; kept by digest."""
        out = {}
        for digest in dict.fromkeys(digests):
            header = self.header_cache.get(digest)
            out[digest] = header if header is not None else self._header(digest, self.get(digest))
        return out

    def head(self, digest: str) -> bool:
        """Whether the store has the blob."""
        validate_digest(digest)
        r = self._http.head(f"/v1/blobs/{digest}")
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    def info(self, digest: str) -> BlobInfo:
        r = self._request("GET", f"/v1/blobs/{validate_digest(digest)}/info")
        return BlobInfo.model_validate_json(r.content)

    def missing(self, digests: list[str]) -> list[str]:
        r = self._request("POST", "/v1/blobs:missing", json={"digests": digests})
        return MissingResponse.model_validate_json(r.content).missing

    # -- runs -------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        return RunList.model_validate_json(self._request("GET", "/v1/runs").content).runs

    def run(self, run: str) -> RunInfo:
        return RunInfo.model_validate_json(self._request("GET", f"/v1/runs/{run}").content)

    def run_blobs(self, run: str, *, limit: int = 100, cursor: str | None = None) -> RunBlobPage:
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        r = self._request("GET", f"/v1/runs/{run}/blobs", params=params)
        return RunBlobPage.model_validate_json(r.content)

    def iter_run_blobs(self, run: str, *, page_size: int = 500) -> Iterator[BlobInfo]:
        cursor = None
        while True:
            page = self.run_blobs(run, limit=page_size, cursor=cursor)
            yield from page.blobs
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete_run(self, run: str) -> RunDeleted:
        return RunDeleted.model_validate_json(self._request("DELETE", f"/v1/runs/{run}").content)

    def gc(self, grace_seconds: float | None = None) -> GcReport:
        r = self._request("POST", "/v1/gc", json={"grace_seconds": grace_seconds})
        return GcReport.model_validate_json(r.content)


class AsyncStoreClient(_StoreBase):
    """Asynchronous twin of :class:`StoreClient`; use one per event loop."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> None:
        """``transport``: httpx's own by default; :class:`~mmstore_client.transport.AiohttpTransport`
        reads large bodies (pixels) in half the time."""
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self._fetching: AsyncSingleFlight[str, bytes] = AsyncSingleFlight()

    async def __aenter__(self) -> AsyncStoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                return self._check(await self._http.request(method, path, **kwargs))
            except Exception as exc:
                if not self._retryable(exc) or attempt == self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise TransportError(f"{method} {self.url}{path}: {exc!r}") from exc
                    raise
                await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    # -- blobs ------------------------------------------------------------------------------
    async def put(self, data: bytes, run: str) -> BlobInfo:
        """Store ``data`` for ``run``; sends the bytes only if the store lacks them."""
        digest = compute_digest(data)
        linked = await self.link(run, [digest])
        if linked.linked:
            return linked.linked[0]
        r = await self._request("PUT", f"/v1/runs/{run}/blobs/{digest}", content=data)
        self.uploads += 1
        self.cache.put(digest, data)
        return BlobInfo.model_validate_json(r.content)

    async def link(self, run: str, digests: list[str]) -> LinkResponse:
        r = await self._request("POST", f"/v1/runs/{run}/blobs:link", json={"digests": digests})
        return LinkResponse.model_validate_json(r.content)

    async def get(self, digest: str) -> bytes:
        """The blob's bytes, verified; from the cache when present; one fetch per digest at a time."""
        validate_digest(digest)
        data = self.cache.get(digest)
        if data is not None:
            return data

        async def fetch() -> bytes:
            r = await self._request("GET", f"/v1/blobs/{digest}", follow_redirects=True)
            return self._verified(digest, r.content)

        return await self._fetching.run(digest, fetch)

    async def pixels(self, digest: str) -> Image.Image | None:
        """The decoded RGB pixels the store kept from verifying the upload (:mod:`.pixels`), or
        ``None`` when it keeps none of it (read the bytes and decode them then)."""
        try:
            r = await self._request("GET", f"/v1/blobs/{validate_digest(digest)}/pixels")
        except NotFoundError as exc:
            if exc.code == PIXELS_NOT_KEPT:
                return None
            raise
        return self._counted_pixels(digest, r)

    async def image_headers(self, digests: Iterable[str]) -> dict[str, decode.ImageHeader]:
        """Each image's header (oriented size, mime), read from its verified bytes; kept by digest."""

        async def header(digest: str) -> decode.ImageHeader:
            cached = self.header_cache.get(digest)
            return cached if cached is not None else self._header(digest, await self.get(digest))

        unique = list(dict.fromkeys(digests))
        return dict(zip(unique, await asyncio.gather(*map(header, unique)), strict=True))

    async def head(self, digest: str) -> bool:
        """Whether the store has the blob."""
        validate_digest(digest)
        r = await self._http.head(f"/v1/blobs/{digest}")
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    async def info(self, digest: str) -> BlobInfo:
        r = await self._request("GET", f"/v1/blobs/{validate_digest(digest)}/info")
        return BlobInfo.model_validate_json(r.content)

    async def missing(self, digests: list[str]) -> list[str]:
        r = await self._request("POST", "/v1/blobs:missing", json={"digests": digests})
        return MissingResponse.model_validate_json(r.content).missing

    # -- runs -------------------------------------------------------------------------------
    async def runs(self) -> list[RunInfo]:
        return RunList.model_validate_json((await self._request("GET", "/v1/runs")).content).runs

    async def run(self, run: str) -> RunInfo:
        return RunInfo.model_validate_json((await self._request("GET", f"/v1/runs/{run}")).content)

    async def run_blobs(self, run: str, *, limit: int = 100, cursor: str | None = None) -> RunBlobPage:
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        r = await self._request("GET", f"/v1/runs/{run}/blobs", params=params)
        return RunBlobPage.model_validate_json(r.content)

    async def iter_run_blobs(self, run: str, *, page_size: int = 500) -> AsyncIterator[BlobInfo]:
        cursor = None
        while True:
            page = await self.run_blobs(run, limit=page_size, cursor=cursor)
            for blob in page.blobs:
                yield blob
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def delete_run(self, run: str) -> RunDeleted:
        r = await self._request("DELETE", f"/v1/runs/{run}")
        return RunDeleted.model_validate_json(r.content)

    async def gc(self, grace_seconds: float | None = None) -> GcReport:
        r = await self._request("POST", "/v1/gc", json={"grace_seconds": grace_seconds})
        return GcReport.model_validate_json(r.content)
