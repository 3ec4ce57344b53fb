"""Decoded pixels of recent uploads, kept so that a reader need not decode them again.

Every upload is decoded in full to verify it (:mod:`.ingest`). For every format but JPEG (whose
check decodes at 1/8 scale in the DCT domain, several times faster than a full decode; the
contract's :func:`mmstore_client.pixels.kept_format` says which) that decode is the decoding
rule itself (:func:`mmstore_client.decode.decode_rgb`), and its 8-bit
RGB pixels are kept here, by digest, in a bounded cache (``MMSTORE_PIXEL_CACHE_BYTES``, least
recently used first out). ``GET /v1/blobs/{digest}/pixels`` serves them: width x height x 3 bytes,
rows top to bottom, with the size in the ``mmstore-width`` and ``mmstore-height`` headers. The
inference service takes a new image's pixels from there, so a screenshot PNG that took 10-14 ms
to decode costs a loopback read of its pixels on the request path instead.

Pixels are kept only by the process that verified the upload (a store of several workers keeps
each worker's own), never for a re-upload that was not decoded again, and are dropped first when
the cache is full: a reader that gets 404 ``pixels_not_kept`` reads the bytes and decodes them.
They are served only while the blob is stored (the read checks it, so a blob that GC removed is
404 ``not_found`` here too).
"""

from __future__ import annotations

from typing import NamedTuple

from mmstore_client import decode
from mmstore_client.cache import LRUCache


class KeptPixels(NamedTuple):
    """An upload's decoded pixels as served: 8-bit RGB, rows top to bottom."""

    width: int
    height: int
    data: bytes


def pixel_cache(max_bytes: int) -> LRUCache[str, KeptPixels] | None:
    """The cache of kept pixels, bounded by their bytes; ``None`` when none are kept."""
    return LRUCache(max_bytes, cost=lambda kept: len(kept.data)) if max_bytes else None


def decode_to_keep(data: bytes, *, max_pixels: int, max_jpeg_scans: int) -> KeptPixels | None:
    """Verify ``data`` by decoding it under the decoding rule; its pixels, or ``None`` when the
    rule's conversion fails on an image the plain check accepts (the check's verdict stands: it
    runs then, and raises what it raises)."""
    try:
        img = decode.decode_rgb(data, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans)
    except decode.ImageError:
        decode.check_pixels(data, max_jpeg_scans=max_jpeg_scans)
        return None
    return KeptPixels(img.width, img.height, img.tobytes())
