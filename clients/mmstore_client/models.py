"""Wire schemas of the store API, shared by the service (responses) and the clients (parsing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .decode import ImageHeader


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlobInfo(_Model):
    """What the store knows of a blob. Width and height are the raw header size (no EXIF rotation)."""

    digest: str
    size: int = Field(description="bytes")
    mime: str
    format: str = Field(description="PIL format name: PNG, JPEG, WEBP, GIF, BMP, TIFF")
    width: int
    height: int

    @classmethod
    def of(cls, digest: str, size: int, header: ImageHeader) -> BlobInfo:
        """The info of ``size`` bytes under ``digest`` whose header :func:`decode.probe` read."""
        return cls(
            digest=digest,
            size=size,
            mime=header.mime,
            format=header.format,
            width=header.raw_width,
            height=header.raw_height,
        )


class RunInfo(_Model):
    run: str
    blob_count: int
    bytes: int
    created_at: float
    updated_at: float


class RunList(_Model):
    runs: list[RunInfo]


class RunBlobPage(_Model):
    """One page of a run's blobs, in digest order; pass ``next_cursor`` as ``cursor`` for the next."""

    run: str
    blobs: list[BlobInfo]
    next_cursor: str | None = None


class MissingRequest(_Model):
    digests: list[str] = Field(max_length=10_000)


class MissingResponse(_Model):
    missing: list[str]


class LinkResponse(_Model):
    """Result of linking stored blobs to a run: those linked, and those the store lacks."""

    linked: list[BlobInfo]
    missing: list[str]


class RunDeleted(_Model):
    run: str
    unlinked: int
    orphaned: int = Field(
        description="blobs no live run references any more (garbage after the grace period)"
    )


class GcRequest(_Model):
    grace_seconds: float | None = Field(default=None, ge=0)


class GcReport(_Model):
    deleted: int
    bytes_freed: int
    garbage_in_grace: int = Field(
        description="unreferenced blobs kept because they are younger than the grace period"
    )
    grace_seconds: float
