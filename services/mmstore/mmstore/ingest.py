"""Upload handling: digest verification, image validation, storing (bodies: :mod:`.bodies`)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from mmstore_client import decode
from mmstore_client.models import BlobInfo

from .errors import DigestMismatchError, from_image_error
from .metrics import StoreMetrics
from .settings import Settings
from .storage.base import PutResult, Storage


@functools.cache  # one pool per process (a pool makes its threads only when used)
def _decode_pool(nice: int) -> ThreadPoolExecutor:
    """The threads that decode uploads for remote backends (PIL releases the GIL while decoding).

    They run ``nice`` levels below the server (Linux sets it per thread), so the threads on the
    request path (the event loop, the bucket's I/O) preempt them: a decode then fills the time the
    bucket's requests are in flight instead of delaying them.
    """

    def lower_priority() -> None:
        if nice and sys.platform == "linux":
            tid = threading.get_native_id()
            with contextlib.suppress(OSError):  # a sandbox that forbids it: the server's priority
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))

    return ThreadPoolExecutor(
        os.cpu_count() or 2, thread_name_prefix="mmstore-verify", initializer=lower_priority
    )


def ingest(
    storage: Storage,
    settings: Settings,
    metrics: StoreMetrics,
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
    refused before any write; the full decode is the storage's ``check``. Locally it runs before
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
        check = functools.partial(decode.check_pixels, data)
        recheck = None  # a re-upload's: only a bucket can hold bytes that never passed a check
        if storage.remote:
            check = recheck = _decode_pool(settings.decode_nice).submit(check).result
        existing = None if absent else storage.link_existing(run, digest, check=recheck)
        if existing is not None:
            metrics.blobs_deduplicated.inc()
            return PutResult(existing, created=False)
        result = storage.put(run, digest, data, BlobInfo.of(digest, len(data), header), check=check)
    except decode.ImageError as exc:
        raise from_image_error(exc) from exc
    (metrics.blobs_created if result.created else metrics.blobs_deduplicated).inc()
    return result
