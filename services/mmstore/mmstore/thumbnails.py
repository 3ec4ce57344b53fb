"""Thumbnails for the viewer: made on demand from a blob's bytes, cached by digest and size.

* The stored blob is never touched: a thumbnail is a new, derived image (WebP) made from a
  read of the blob, and lives only in this process's memory. No cache directory: the S3
  backend has no local root, and a thumbnail is cheap to make again (tens of ms).
* Pixels follow the decoding rule that the model sees (EXIF orientation applied, first frame,
  alpha on white, 16-bit scaled; :func:`mmstore_client.decode.to_rgb`), and are never
  upscaled. JPEGs decode at a reduced DCT scale (``draft``), a big photo costs little.
* Bounded: an LRU over the encoded bytes (``max_bytes``); concurrent requests for one key share
  one generation; at most ``workers`` generations run at once, in threads, so a page of 60
  thumbnails cannot take every core from the blob path.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict

import anyio
import PIL
from mmstore_client import decode
from PIL import Image, ImageOps

from .storage.base import Storage

SIZES = (128, 256, 512)  # allowed bounding boxes: a small fixed set keeps the cache keys few
FORMAT, MIME = "WEBP", "image/webp"
VERSION = f"1-pillow{PIL.__version__}"  # in the ETag: a Pillow upgrade may change the bytes


def make_thumbnail(data: bytes, size: int) -> bytes:
    """Encoded thumbnail (WebP) of the image ``data`` fitting in ``size`` x ``size``."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale, still >= size
    img.load()
    img = ImageOps.exif_transpose(img) or img
    img = decode.to_rgb(img)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, FORMAT, quality=82, method=4)
    return out.getvalue()


class ThumbnailCache:
    def __init__(self, storage: Storage, *, max_bytes: int = 64 << 20, workers: int = 2) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self.workers = workers
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        self._limiter: anyio.CapacityLimiter | None = None
        self.hits = self.misses = self.evictions = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._cache)

    async def get(self, digest: str, size: int, blob_size: int) -> bytes:
        """The thumbnail of blob ``digest`` (``blob_size`` bytes) for a ``size`` box.

        Raises FileNotFoundError when the blob is gone, and the decoding rule's ImageError
        when its bytes are not an image this viewer can draw.
        """
        key = (digest, size)
        thumb = self._cache.get(key)
        if thumb is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return thumb
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            thumb = await self._generate(digest, size, blob_size)
            future.set_result(thumb)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]
        self._store(key, thumb)
        return thumb

    async def _generate(self, digest: str, size: int, blob_size: int) -> bytes:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.workers)

        def work() -> bytes:
            data = self.storage.read(digest, 0, blob_size)
            try:
                return make_thumbnail(data, size)
            except decode.ImageError:
                raise
            except Exception as exc:  # PIL raises many types on data it cannot draw
                raise decode.CorruptImage(f"cannot draw a thumbnail: {exc}") from exc

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    def _store(self, key: tuple[str, int], thumb: bytes) -> None:
        if len(thumb) > self.max_bytes or key in self._cache:
            return
        self._cache[key] = thumb
        self._bytes += len(thumb)
        while self._bytes > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= len(old)
            self.evictions += 1
