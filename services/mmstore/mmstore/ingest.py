"""Upload handling: digest verification, image validation, storing (bodies: :mod:`.bodies`)."""

from __future__ import annotations

import functools

from mmstore_client import decode
from mmstore_client.cache import LRUCache
from mmstore_client.models import BlobInfo
from mmstore_client.pixels import kept_format

from .decoding import Decoder
from .errors import DigestMismatchError, from_image_error
from .metrics import StoreMetrics
from .pixels import KeptPixels, decode_to_keep
from .settings import Settings
from .storage.base import PutResult, Storage


def ingest(
    storage: Storage,
    settings: Settings,
    metrics: StoreMetrics,
    decoder: Decoder,
    run: str,
    data: bytes,
    digest: str,
    expected: str | None,
    absent: bool = False,
    pixels: LRUCache[str, KeptPixels] | None = None,
) -> PutResult:
    """Verify and store ``data`` (whose digest is ``digest``) for ``run``, in a worker thread.

    ``absent``: the store had no blob under ``expected`` a moment ago (checked while the body
    arrived), so the dedup path's existence check is skipped (``put`` still handles a blob that
    appeared since).

    The header is probed first (format, size, pixel limit: microseconds), so most bad uploads are
    refused before any write; the full decode is the storage's ``check``, on the ``decoder``'s
    threads within its pixel budget (this thread only waits for it). Locally it runs before
    the blob is written, so a stored blob has passed it and a re-upload is not decoded again. On
    a remote backend (a bucket) it runs in another thread while the backend's requests are in
    flight, upload of the bytes included, and answers before the blob is linked; re-uploads are
    checked too (see ``S3Storage._checked`` for what is withdrawn when).

    ``pixels``: where the decoded pixels of a stored upload are kept (:mod:`.pixels`), when its
    check decoded it in full under the decoding rule.
    """
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            "the body's digest differs from the digest in the URL", expected=expected, actual=digest
        )
    metrics.bytes_in.inc(len(data))
    try:
        header = decode.probe(data, max_pixels=settings.max_image_pixels)
        area = header.raw_width * header.raw_height
        decoded: list[KeptPixels] = []
        if pixels is not None and kept_format(header.format):

            def full_decode() -> None:
                kept = decode_to_keep(
                    data, max_pixels=settings.max_image_pixels, max_jpeg_scans=settings.max_jpeg_scans
                )
                if kept is not None:
                    decoded.append(kept)

        else:
            full_decode = functools.partial(decode.check_pixels, data, max_jpeg_scans=settings.max_jpeg_scans)
        recheck = None  # a re-upload's: only a bucket can hold bytes that never passed a check
        if storage.remote:  # started now: it runs while the bucket's requests are in flight
            check = recheck = decoder.submit(full_decode, area).result
        else:  # started when the storage asks: a re-upload is not decoded again

            def check() -> None:
                decoder.submit(full_decode, area).result()

        existing = None if absent else storage.link_existing(run, digest, check=recheck)
        if existing is not None:
            metrics.blobs_deduplicated.inc()
            return PutResult(existing, created=False)
        result = storage.put(run, digest, data, BlobInfo.of(digest, len(data), header), check=check)
    except decode.ImageError as exc:
        raise from_image_error(exc) from exc
    (metrics.blobs_created if result.created else metrics.blobs_deduplicated).inc()
    if decoded and pixels is not None:  # decoded for this upload: its check passed, it is stored
        pixels.put(digest, decoded[0])
        metrics.pixels_kept.inc()
    return result
