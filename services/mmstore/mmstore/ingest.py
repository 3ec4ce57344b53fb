"""Upload handling: bounded body reading, digest verification, image validation, storing."""

from __future__ import annotations

import functools

from fastapi import Request
from mmstore_client import decode
from mmstore_client.digest import DigestHasher
from mmstore_client.models import BlobInfo

from .decoding import Decoder
from .errors import DigestMismatchError, PayloadTooLargeError, from_image_error
from .metrics import StoreMetrics
from .settings import Settings
from .storage.base import PutResult, Storage


async def read_body(request: Request, limit: int, hasher: DigestHasher | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (never fully buffered).

    ``hasher`` (uploads) is fed each chunk as it arrives, so the digest is ready with the body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit}", limit=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body is over the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
        if hasher is not None:
            hasher.update(chunk)
    return b"".join(chunks)  # one copy, no regrowing buffer


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
    """
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            "the body's digest differs from the digest in the URL", expected=expected, actual=digest
        )
    metrics.bytes_in.inc(len(data))
    try:
        header = decode.probe(data, max_pixels=settings.max_image_pixels)
        pixels = header.raw_width * header.raw_height
        full_decode = functools.partial(decode.check_pixels, data, max_jpeg_scans=settings.max_jpeg_scans)
        recheck = None  # a re-upload's: only a bucket can hold bytes that never passed a check
        if storage.remote:  # started now: it runs while the bucket's requests are in flight
            check = recheck = decoder.submit(full_decode, pixels).result
        else:  # started when the storage asks: a re-upload is not decoded again

            def check() -> None:
                decoder.submit(full_decode, pixels).result()

        existing = None if absent else storage.link_existing(run, digest, check=recheck)
        if existing is not None:
            metrics.blobs_deduplicated.inc()
            return PutResult(existing, created=False)
        result = storage.put(run, digest, data, BlobInfo.of(digest, len(data), header), check=check)
    except decode.ImageError as exc:
        raise from_image_error(exc) from exc
    (metrics.blobs_created if result.created else metrics.blobs_deduplicated).inc()
    return result
