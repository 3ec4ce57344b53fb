"""Upload handling: bounded body reading, digest verification, image validation, storing."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from mmstore_client import decode
from mmstore_client.digest import compute_digest
from mmstore_client.models import BlobInfo

from .errors import DigestMismatchError, PayloadTooLargeError, from_image_error
from .metrics import StoreMetrics
from .settings import Settings
from .storage.base import PutResult, Storage

# decodes that overlap a remote backend's existence check (PIL releases the GIL while decoding)
_verifier = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="mmstore-verify")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (never fully buffered)."""
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
    return b"".join(chunks)  # one copy, no regrowing buffer


def ingest(
    storage: Storage,
    settings: Settings,
    metrics: StoreMetrics,
    run: str,
    data: bytes,
    expected: str | None,
) -> PutResult:
    """Verify and store ``data`` for ``run`` (runs in a worker thread: hashing and decoding).

    The bytes already stored under a digest were verified when first stored, so a re-upload only
    needs its digest checked before it is linked. On a remote backend (a bucket) the existence
    check is a round trip: the decode runs meanwhile, its result used only if the blob is new.
    """
    digest = compute_digest(data)
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            "the body's digest differs from the digest in the URL", expected=expected, actual=digest
        )
    metrics.bytes_in.inc(len(data))
    verify = functools.partial(decode.verify, data, max_pixels=settings.max_image_pixels)
    verifying = _verifier.submit(verify) if storage.remote else None
    existing = storage.link_existing(run, digest)
    if existing is not None:
        if verifying is not None:
            verifying.cancel()  # if it has not started
        metrics.blobs_deduplicated.inc()
        return PutResult(existing, created=False)
    try:
        header = verifying.result() if verifying else verify()
    except decode.ImageError as exc:
        raise from_image_error(exc) from exc
    info = BlobInfo.of(digest, len(data), header)
    result = storage.put(run, digest, data, info)
    (metrics.blobs_created if result.created else metrics.blobs_deduplicated).inc()
    return result
