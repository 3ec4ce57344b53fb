"""Thumbnails for the viewer: made on demand from a blob's bytes, cached by digest and size.

* The stored blob is never touched: a thumbnail is a new, derived image (WebP) made from a
  read of the blob, and lives only in this process's memory. No cache directory: the S3
  backend has no local root, and a thumbnail is cheap to make again (tens of ms).
* Pixels follow the decoding rule that the model sees (:func:`mmstore_client.decode.decode_rgb`:
  EXIF orientation applied, first frame, alpha on white, 16-bit scaled, the same refusals), and
  are never upscaled. They decode scaled down (``fit``): JPEGs at a reduced DCT scale, so a big
  photo never exists at full size; other formats are reduced right after decoding.
* Bounded: the project's LRU over the encoded bytes (``max_bytes``,
  :class:`mmstore_client.cache.LRUCache`); concurrent requests for one key share one generation
  (:class:`~mmstore_client.cache.AsyncSingleFlight`); at most ``workers`` generations run at
  once, and their decodes run on the store's decode threads within its pixel budget
  (:mod:`mmstore.decoding`), so a page of 60 thumbnails cannot take every core or the memory
  from the blob path.
"""

from __future__ import annotations

import functools
import io

import anyio
import PIL
from mmstore_client import decode
from mmstore_client.cache import AsyncSingleFlight, LRUCache
from PIL import Image

from .decoding import Decoder
from .storage.base import Storage

SIZES = (128, 256, 512)  # allowed bounding boxes: a small fixed set keeps the cache keys few
FORMAT, MIME = "WEBP", "image/webp"
VERSION = f"1-pillow{PIL.__version__}"  # in the ETag: a Pillow upgrade may change the bytes


def make_thumbnail(
    data: bytes,
    size: int,
    *,
    max_pixels: int = decode.DEFAULT_MAX_PIXELS,
    max_jpeg_scans: int = decode.DEFAULT_MAX_JPEG_SCANS,
) -> bytes:
    """Encoded thumbnail (WebP) of the image ``data`` fitting in ``size`` x ``size``."""
    img = decode.decode_rgb(data, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans, fit=size)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, FORMAT, quality=82, method=4)
    return out.getvalue()


class ThumbnailCache:
    def __init__(
        self,
        storage: Storage,
        decoder: Decoder,
        *,
        max_bytes: int = 64 << 20,
        workers: int = 2,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
        max_jpeg_scans: int = decode.DEFAULT_MAX_JPEG_SCANS,
    ) -> None:
        self.storage = storage
        self.decoder = decoder
        self.limits = {"max_pixels": max_pixels, "max_jpeg_scans": max_jpeg_scans}
        self.workers = workers
        self._cache: LRUCache[tuple[str, int], bytes] = LRUCache(max_bytes, cost=len)
        self._inflight: AsyncSingleFlight[tuple[str, int], bytes] = AsyncSingleFlight()
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    @property
    def cached_bytes(self) -> int:
        return self._cache.size

    def __len__(self) -> int:
        return len(self._cache)

    async def get(self, digest: str, size: int, blob_size: int) -> bytes:
        """The thumbnail of blob ``digest`` (``blob_size`` bytes) for a ``size`` box.

        Raises FileNotFoundError when the blob is gone, and the decoding rule's ImageError
        when its bytes are not an image this viewer can draw.
        """
        key = (digest, size)
        thumb = self._cache.get(key)
        if thumb is None:
            thumb = await self._inflight.run(key, functools.partial(self._make, key, blob_size))
        return thumb

    async def _make(self, key: tuple[str, int], blob_size: int) -> bytes:
        thumb = await self._generate(*key, blob_size)
        self._cache.put(key, thumb)
        return thumb

    async def _generate(self, digest: str, size: int, blob_size: int) -> bytes:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.workers)

        def read() -> tuple[bytes, int]:
            data = self.storage.read(digest, 0, blob_size)
            header = decode.probe(data, max_pixels=self.limits["max_pixels"])
            return data, header.raw_width * header.raw_height

        async with self._limiter:
            data, pixels = await anyio.to_thread.run_sync(read)
            return await self.decoder.run(
                functools.partial(make_thumbnail, data, size, **self.limits), pixels
            )
