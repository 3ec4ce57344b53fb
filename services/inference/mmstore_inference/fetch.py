"""Images by digest for one request: fetched concurrently, verified, decoded, size-checked.

Bytes come through :class:`mmstore_client.AsyncStoreClient` (blake3-verified, bounded byte cache,
one in-flight fetch per digest across requests). A new image that is not a JPEG is first asked
of the store as decoded pixels (``store_pixels``): the store decoded it under the same rule to
verify the upload and keeps recent ones (:mod:`mmstore_client.pixels`), so the request reads
width x height x 3 bytes over the network instead of decoding (a 1280x720 PNG: 10-14 ms). Those
pixels are the store's decode, not the service's: the bytes are not hashed here then, and the
trainer's check of the ``pixel_digests`` this service reports against its own decode of the
verified bytes is what catches a store that served wrong pixels. When the store keeps none
(evicted, another worker, a JPEG), the bytes are fetched and decoded here as before.

Decoded images are kept in a second bounded cache keyed by digest (content-addressed, so never
stale) with one decode per digest at a time. Nothing is assumed from earlier requests: every
request names every image it needs.

Store errors become the service's own here and nowhere else (:func:`store_errors`), for the
generate path's pixels and the chat path's headers alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

from mmstore_client import AsyncStoreClient, IntegrityError, NotFoundError, decode
from mmstore_client.cache import AsyncSingleFlight, DecodedCache, LRUCache
from mmstore_client.descriptor import Descriptor
from mmstore_client.errors import ApiError, TransportError
from mmstore_client.pixels import kept_format
from PIL import Image

from .errors import CorruptAsset, DescriptorMismatch, MissingAsset, StoreUnavailable

PIXEL_DIGESTS_KEPT = 100_000


@contextlib.contextmanager
def store_errors(digest: str, image: int | None = None, param: str | None = None) -> Iterator[None]:
    """The store client's errors for ``digest`` as the service's (``image``/``param`` name it)."""
    where = {k: v for k, v in (("image", image), ("param", param)) if v is not None}
    label = f"image {image}: " if image is not None else ""
    try:
        yield
    except NotFoundError:
        raise MissingAsset(f"{label}the store has no blob {digest}", digest=digest, **where) from None
    except IntegrityError as exc:
        message = f"{label}bytes served for {digest} hash to {exc.actual}"
        raise CorruptAsset(message, digest=digest, **where) from None
    except decode.ImageError as exc:
        message = f"{label}{digest} cannot be decoded: {exc}"
        raise CorruptAsset(message, digest=digest, **where) from None
    except (TransportError, ApiError) as exc:
        raise StoreUnavailable(
            f"store unavailable fetching {digest}: {exc}", digest=digest, **where
        ) from None


class ImageFetcher:
    def __init__(self, store: AsyncStoreClient, decoded: DecodedCache, *, store_pixels: bool = True) -> None:
        self.store = store
        self.decoded = decoded
        self.store_pixels = store_pixels
        self._decoding: AsyncSingleFlight[str, Image.Image] = AsyncSingleFlight()
        self._pixel_digests: LRUCache[str, str] = LRUCache(PIXEL_DIGESTS_KEPT)
        self.decodes = 0
        self.pixels_from_store = 0  # new images whose decoded pixels the store served

    @property
    def decoded_hits(self) -> int:
        return self.decoded.hits

    async def images(self, descriptors: list[Descriptor]) -> list[Image.Image]:
        """The decoded images of ``descriptors``, in order; raises the service's errors.

        Cached images are taken without a task each (a request names every image of its
        conversation: 40 tasks cost about 1 ms for what is a dictionary lookup)."""
        out: list[Image.Image | None] = [self.decoded.get(d.digest) for d in descriptors]
        missing = [i for i, img in enumerate(out) if img is None]
        if missing:
            found = await asyncio.gather(*(self._image(i, descriptors[i]) for i in missing))
            for i, img in zip(missing, found, strict=True):
                out[i] = img
        return [self._checked(i, d, img) for i, (d, img) in enumerate(zip(descriptors, out, strict=True))]

    async def headers(
        self, digests: Sequence[str], params: Sequence[str | None]
    ) -> dict[str, decode.ImageHeader]:
        """Each image's header, for the renderer; ``params[i]`` names where ``digests[i]`` is."""

        async def one(digest: str, param: str | None) -> decode.ImageHeader:
            with store_errors(digest, param=param):
                return (await self.store.image_headers([digest]))[digest]

        first: dict[str, str | None] = {}  # each digest named at its first part
        for digest, param in zip(digests, params, strict=True):
            first.setdefault(digest, param)
        known = {d: h for d in first if (h := self.store.header_cache.get(d)) is not None}
        missing = [d for d in first if d not in known]  # only these need a task (and maybe a GET)
        found = await asyncio.gather(*(one(d, first[d]) for d in missing))
        return known | dict(zip(missing, found, strict=True))

    def pixel_digest(self, digest: str, img: Image.Image) -> str:
        """decode.pixel_digest of an image this fetcher decoded (computed in the decode thread)."""
        known = self._pixel_digests.get(digest)
        if known is None:  # forgotten since: recompute
            known = decode.pixel_digest(img)
            self._pixel_digests.put(digest, known)
        return known

    async def _image(self, index: int, desc: Descriptor) -> Image.Image:
        img = self.decoded.get(desc.digest)
        if img is None:
            img = await self._decoding.run(desc.digest, lambda: self._fetch_decode(index, desc))
        return img

    @staticmethod
    def _checked(index: int, desc: Descriptor, img: Image.Image) -> Image.Image:
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

    async def _fetch_decode(self, index: int, desc: Descriptor) -> Image.Image:
        def decode_and_digest() -> tuple[Image.Image, str]:
            img = decode.decode_rgb(data)
            return img, decode.pixel_digest(img)

        digest = desc.digest
        with store_errors(digest, image=index):
            img = await self.store.pixels(digest) if self._ask_pixels(desc) else None
            if img is not None:
                pixels = await asyncio.to_thread(decode.pixel_digest, img)
                self.pixels_from_store += 1
            else:
                data = await self.store.get(digest)
                img, pixels = await asyncio.to_thread(decode_and_digest)
                self.decodes += 1
        self.decoded.put(digest, img)
        self._pixel_digests.put(digest, pixels)
        return img

    def _ask_pixels(self, desc: Descriptor) -> bool:
        """Whether to ask the store for the image's pixels: not for a format it keeps none of, and
        bytes already here (verified) are decoded here."""
        fmt = decode.MIME_FORMAT.get(desc.mime, "")
        return self.store_pixels and kept_format(fmt) and desc.digest not in self.store.cache
