"""Storage backends behind one interface (:mod:`.base`); :func:`open_storage` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Storage

if TYPE_CHECKING:
    from ..settings import Settings


def open_storage(settings: Settings) -> Storage:
    """``settings.storage`` (``s3://bucket/prefix``) when set, else the local directory ``root``."""
    if settings.storage:
        from .s3 import S3Storage  # obstore is imported only when a bucket is used

        return S3Storage(settings.storage, max_image_pixels=settings.max_image_pixels)
    from .local import LocalStorage

    return LocalStorage(
        settings.root,
        fsync=settings.fsync,
        batch=settings.gc_batch_size,
        min_free_bytes=settings.min_free_bytes,
    )


__all__ = ["Storage", "open_storage"]
