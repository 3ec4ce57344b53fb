"""Refs to pixels, once per process: fetch (verified), decode with mmstore's rule, cache.

A new ref is first asked of the store as the pixels it kept from verifying the upload (the same
rule's decode; ``MMSTORE_STORE_PIXELS``), held to the plugin's pixel limit and layout like a
decode; when the store keeps none (JPEGs, evicted), the bytes are fetched and decoded here.

vLLM builds a media connector per request, so everything that must outlive a request lives
here, at module level, one :class:`RefResolver` per process: the store clients (one sync, one per
event loop for async), the bounded byte cache they share (:class:`mmstore_client.ByteCache`,
with the clients' one in-flight fetch per digest) and the bounded decoded-image cache
(:class:`mmstore_client.cache.DecodedCache`), with one fetch-and-decode per digest at a time
(:class:`mmstore_client.cache.AsyncSingleFlight`). Nothing here imports vLLM: the connector maps
these errors onto vLLM's.

Errors::

    RefError                   names the digest and a machine-readable ``code``
    ├── RefRejected            the ref is the request's fault: vLLM answers 4xx
    │                          (malformed_ref, missing_blob, digest_mismatch, image_too_large,
    │                          corrupt_image, unsupported_media_type, image_refused_by_layout)
    └── StoreUnavailable       the store could not answer (store_unavailable, store_unauthorized):
                               vLLM answers 5xx; nothing is cached, the next request retries
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

from mmstore_client import (
    ApiError,
    AsyncStoreClient,
    AuthError,
    ByteCache,
    IntegrityError,
    InvalidRef,
    NotFoundError,
    StoreClient,
    TransportError,
    decode,
    parse_ref,
)
from mmstore_client.cache import AsyncSingleFlight, DecodedCache
from mmstore_client.layouts import Layout
from PIL import Image
from prometheus_client import Counter

from .settings import PluginSettings

# Counters in the process's default registry, which vLLM's /metrics serves (and, with
# PROMETHEUS_MULTIPROC_DIR, collects from every API process).
REFS = Counter(
    "mmstore_vllm_refs",
    "mmstore refs resolved to an image, by where the image came from (decoded: the decoded-image "
    "cache; bytes: the byte cache, then decoded; store: fetched from the store and decoded, or "
    "joined such a fetch; pixels: the pixels the store kept from verifying the upload)",
    ["source"],
)
REF_ERRORS = Counter("mmstore_vllm_ref_errors", "mmstore refs refused or not resolved, by code", ["code"])
STORE_BYTES = Counter("mmstore_vllm_store_bytes", "image bytes received from the store for refs")
DECODE_SECONDS = Counter("mmstore_vllm_decode_seconds", "time spent decoding ref images")


class RefError(Exception):
    def __init__(self, message: str, *, code: str, digest: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.digest = digest


class RefRejected(RefError):
    """The ref cannot be served, whatever the retries: a 4xx for the client."""


class StoreUnavailable(RefError):
    """The store did not answer (or refused the plugin's token): a 5xx, worth retrying."""


class RefResolver:
    def __init__(self, settings: PluginSettings) -> None:
        self.settings = settings
        self.byte_cache = ByteCache(settings.byte_cache_bytes)
        self.decoded = DecodedCache(settings.decoded_cache_bytes)
        self._client_options = {
            "token": settings.token,
            "timeout": settings.timeout_s,
            "retries": settings.retries,
            "cache": self.byte_cache,
        }
        self.store = StoreClient(settings.url, **self._client_options)
        self.layout = Layout.from_pretrained(settings.model) if settings.model else None
        self._async: (
            tuple[asyncio.AbstractEventLoop, AsyncStoreClient, AsyncSingleFlight[str, Image.Image]] | None
        )
        self._async = None

    def _for_loop(self) -> tuple[AsyncStoreClient, AsyncSingleFlight[str, Image.Image]]:
        """The running loop's async client and decode single-flight (both bound to one loop;
        vLLM's API server has one loop, tests may have more)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (
                loop,
                AsyncStoreClient(self.settings.url, **self._client_options),
                AsyncSingleFlight(),
            )
        return self._async[1], self._async[2]

    def image(self, url: str) -> tuple[str, Image.Image]:
        """The digest and RGB image of ref ``url`` (blocking)."""
        digest = self._digest(url)
        img = self.decoded.get(digest)
        if img is not None:
            REFS.labels("decoded").inc()
            return digest, img
        cached = digest in self.byte_cache
        with self._store_errors(digest):
            kept = self.store.pixels(digest) if self._ask_pixels(cached) else None
            if kept is None:
                data = self.store.get(digest)
        if kept is not None:
            return digest, self._checked(digest, kept)
        return digest, self._decode(digest, data, cached)

    async def image_async(self, url: str) -> tuple[str, Image.Image]:
        """The digest and RGB image of ref ``url``; one fetch and decode per digest at a time,
        decoding in a worker thread."""
        digest = self._digest(url)
        img = self.decoded.get(digest)
        if img is not None:
            REFS.labels("decoded").inc()
            return digest, img
        store, decoding = self._for_loop()

        async def fetch_decode() -> Image.Image:
            cached = digest in self.byte_cache
            with self._store_errors(digest):
                kept = await store.pixels(digest) if self._ask_pixels(cached) else None
                if kept is None:
                    data = await store.get(digest)
            if kept is not None:
                return self._checked(digest, kept)
            return await asyncio.to_thread(self._decode, digest, data, cached)

        return digest, await decoding.run(digest, fetch_decode)

    @staticmethod
    def _digest(url: str) -> str:
        try:
            return parse_ref(url)
        except InvalidRef as exc:
            REF_ERRORS.labels("malformed_ref").inc()
            raise RefRejected(str(exc), code="malformed_ref", digest=None) from None

    def _ask_pixels(self, cached: bool) -> bool:
        """Whether to ask the store for an image's kept pixels first: bytes already here are
        decoded here. The store keeps none of JPEGs (a 404 it answers at once), and a ref does
        not say its type: a JPEG costs that one round trip, a screenshot PNG saves its decode."""
        return self.settings.store_pixels and not cached

    def _checked(self, digest: str, img: Image.Image) -> Image.Image:
        """The store's kept pixels of ``digest``, held to the plugin's pixel limit (the decode's)."""
        try:
            decode.check_area(img.width, img.height, self.settings.max_image_pixels)
        except decode.ImageError as exc:
            raise self._refused(digest, exc) from None
        self._keep(digest, img)
        REFS.labels("pixels").inc()
        STORE_BYTES.inc(img.width * img.height * 3)
        return img

    def _keep(self, digest: str, img: Image.Image) -> None:
        """Keep a decoded image once the model's layout places it (else it is refused)."""
        if self.layout is not None:
            try:
                self.layout.place(img.width, img.height)  # raises LayoutRefusal, an ImageError
            except decode.ImageError as exc:
                raise self._refused(digest, exc) from None
        self.decoded.put(digest, img)

    @staticmethod
    def _refused(digest: str, exc: decode.ImageError) -> RefRejected:
        REF_ERRORS.labels(exc.code).inc()
        return RefRejected(f"mmstore image {digest} is refused: {exc}", code=exc.code, digest=digest)

    def _decode(self, digest: str, data: bytes, cached: bool) -> Image.Image:
        start = time.perf_counter()
        try:
            img = decode.decode_rgb(data, max_pixels=self.settings.max_image_pixels)
        except decode.ImageError as exc:
            raise self._refused(digest, exc) from None
        finally:
            DECODE_SECONDS.inc(time.perf_counter() - start)
        self._keep(digest, img)
        if cached:
            REFS.labels("bytes").inc()
        else:
            REFS.labels("store").inc()
            STORE_BYTES.inc(len(data))
        return img

    @contextlib.contextmanager
    def _store_errors(self, digest: str) -> Iterator[None]:
        """Maps the store client's errors to :class:`RefRejected` / :class:`StoreUnavailable`."""
        url = self.settings.url
        error: RefError
        try:
            yield
        except NotFoundError:
            error = RefRejected(
                f"the store at {url} has no blob {digest}: upload it first (StoreClient.put or "
                "PUT /v1/runs/<run>/blobs/<digest>)",
                code="missing_blob",
                digest=digest,
            )
        except IntegrityError as exc:
            error = RefRejected(
                f"the store served bytes for {digest} that hash to {exc.actual}: refused, never decoded",
                code="digest_mismatch",
                digest=digest,
            )
        except AuthError as exc:
            error = StoreUnavailable(
                f"the store at {url} refused the plugin's token ({exc.status} {exc.code}) fetching "
                f"{digest}: set MMSTORE_TOKEN to a token with the read scope",
                code="store_unauthorized",
                digest=digest,
            )
        except (TransportError, ApiError) as exc:
            error = StoreUnavailable(
                f"the store at {url} is unavailable fetching {digest}: {exc} (retry; check MMSTORE_URL)",
                code="store_unavailable",
                digest=digest,
            )
        else:
            return
        REF_ERRORS.labels(error.code).inc()
        raise error from None


_lock = threading.Lock()
_resolver: RefResolver | None = None


def resolver() -> RefResolver:
    """The process's resolver, built on first use from the environment."""
    global _resolver
    with _lock:
        if _resolver is None:
            _resolver = RefResolver(PluginSettings())
        return _resolver
