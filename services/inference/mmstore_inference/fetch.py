"""Images by digest for one request: fetched concurrently, verified, decoded, size-checked.

Bytes come through :class:`mmstore_client.AsyncStoreClient` (blake3-verified, bounded byte cache,
one in-flight fetch per digest across requests). Decoded images are kept in a second bounded
cache keyed by digest (content-addressed, so never stale) with one decode per digest at a time.
Nothing is assumed from earlier requests: every request names every image it needs.
"""

from __future__ import annotations

import asyncio

from mmstore_client import AsyncStoreClient, IntegrityError, NotFoundError, decode
from mmstore_client.cache import DecodedCache, SingleFlight
from mmstore_client.descriptor import Descriptor
from mmstore_client.errors import ApiError, TransportError
from PIL import Image

from .errors import CorruptAsset, DescriptorMismatch, MissingAsset, StoreUnavailable


class ImageFetcher:
    def __init__(self, store: AsyncStoreClient, decoded: DecodedCache) -> None:
        self.store = store
        self.decoded = decoded
        self._decoding: SingleFlight[Image.Image] = SingleFlight()
        self._pixel_digests: dict[str, str] = {}
        self.decoded_hits = 0
        self.decodes = 0

    async def images(self, descriptors: list[Descriptor]) -> list[Image.Image]:
        """The decoded images of ``descriptors``, in order; raises the service's errors."""
        return list(await asyncio.gather(*(self._image(i, d) for i, d in enumerate(descriptors))))

    def pixel_digest(self, digest: str, img: Image.Image) -> str:
        """decode.pixel_digest of an image this fetcher decoded (computed in the decode thread)."""
        known = self._pixel_digests.get(digest)
        if known is None:  # forgotten since: recompute
            known = decode.pixel_digest(img)
            self._remember_pixels(digest, known)
        return known

    def _remember_pixels(self, digest: str, pixels: str) -> None:
        self._pixel_digests[digest] = pixels
        if len(self._pixel_digests) > 100_000:
            self._pixel_digests.pop(next(iter(self._pixel_digests)))

    async def _image(self, index: int, desc: Descriptor) -> Image.Image:
        img = self.decoded.get(desc.digest)
        if img is not None:
            self.decoded_hits += 1
        else:
            img = await self._decoding.run(desc.digest, lambda: self._fetch_decode(index, desc.digest))
        if (img.width, img.height) != (desc.width, desc.height):
            raise DescriptorMismatch(
                f"image {index} ({desc.digest}) decodes to {img.width}x{img.height}, "
                f"its descriptor says {desc.width}x{desc.height}",
                image=index,
                digest=desc.digest,
                expected=[desc.width, desc.height],
                actual=[img.width, img.height],
            )
        return img

    async def _fetch_decode(self, index: int, digest: str) -> Image.Image:
        try:
            data = await self.store.get(digest)
        except NotFoundError:
            raise MissingAsset(
                f"image {index}: the store has no blob {digest}", image=index, digest=digest
            ) from None
        except IntegrityError as exc:
            raise CorruptAsset(
                f"image {index}: bytes served for {digest} hash to {exc.actual}", image=index, digest=digest
            ) from None
        except (TransportError, ApiError) as exc:
            raise StoreUnavailable(f"store unavailable fetching {digest}: {exc}", digest=digest) from None

        def decode_and_digest() -> tuple[Image.Image, str]:
            img = decode.decode_rgb(data)
            return img, decode.pixel_digest(img)

        try:
            img, pixels = await asyncio.to_thread(decode_and_digest)
        except decode.ImageError as exc:
            raise CorruptAsset(
                f"image {index} ({digest}) cannot be decoded: {exc}", image=index, digest=digest
            ) from None
        self.decodes += 1
        self.decoded.put(digest, img)
        self._remember_pixels(digest, pixels)
        return img
